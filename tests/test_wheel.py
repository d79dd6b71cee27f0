"""The wheel ships templates, rules and the schema: build it, install it in a fresh venv, render from it."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_installed_wheel_renders_a_saved_run(torch_run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(ROOT)],
                   check=True, capture_output=True, text=True)
    (wheel,) = dist.glob("model_audit-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for required in ("audit/_data/templates/report.html.j2", "audit/_data/templates/sections/predictions.html.j2",
                     "audit/_data/rules/accuracy-floor.yaml", "audit/_data/results.schema.json"):
        assert required in names

    env_dir = tmp_path / "fresh"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    # Dependencies come from the test environment (no network); the package itself only from the wheel.
    (site / "test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--quiet", str(wheel)],
                   check=True, capture_output=True, text=True)

    run = tmp_path / "run"
    shutil.copytree(torch_run.out, run)
    for name in ("report.html", "report.pdf", "junit.xml"):
        (run / name).unlink()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    where = subprocess.run([str(python), "-c", "import audit; print(audit.__file__)"], cwd=outside,
                           check=True, capture_output=True, text=True).stdout.strip()
    assert where.startswith(str(env_dir)), where
    rendered = subprocess.run([str(env_dir / "bin" / "model-audit"), "render", str(run)], cwd=outside,
                              capture_output=True, text=True, check=False)
    assert rendered.returncode == 0, rendered.stderr
    assert (run / "report.pdf").stat().st_size > 10_000
    assert (run / "report.html").read_text() == (torch_run.out / "report.html").read_text()
    listed = subprocess.run([str(env_dir / "bin" / "model-audit"), "rules", "list"], cwd=outside,
                            capture_output=True, text=True, check=True)
    assert "domain-accuracy-gap" in listed.stdout
