"""The redesign changes no value: the demo's smoke audit, repeated on the model and data the golden
run used, gives the golden results and tables (issue 8), and batching changes nothing.

The golden run (`tests/fixtures/golden-demo-smoke/`) was written before the probe contract was
redesigned. Its ONNX model is committed; its data set is regenerated from the seed. On the kind of
CPU it ran on (`machine.txt`) every value must agree to a relative 1e-6; elsewhere onnxruntime and
torch pick other kernels, so values must agree to 1e-3 and every finding's status must be the same.
"""

from __future__ import annotations

import json
import math
import platform
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from audit.api import RunOutcome, run_audit
from audit.config import build_config
from audit.demo import MEAN, STD, generate_dataset, model_card

GOLDEN = Path(__file__).parent / "fixtures" / "golden-demo-smoke"
IGNORED = {"artifact", "seconds", "started", "finished", "model_load_seconds", "forward_seconds", "load_seconds"}


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


SAME_CPU = (GOLDEN / "machine.txt").read_text().split(":", 1)[1].strip() == _cpu()
RTOL, ATOL = (1e-6, 1e-9) if SAME_CPU else (1e-3, 1e-4)


def differences(old: Any, new: Any, path: str = "", exact_text: bool = True) -> list[str]:
    """Where `new` differs from `old`: numbers beyond the tolerance, anything else unequal; keys
    `new` adds are allowed (later versions may say more), keys it drops are not."""
    if isinstance(old, dict):
        if not isinstance(new, dict):
            return [f"{path}: {type(new).__name__} instead of an object"]
        out = []
        for key, value in old.items():
            if key in IGNORED:
                continue
            if key not in new:
                out.append(f"{path}/{key}: missing")
            else:
                out.extend(differences(value, new[key], f"{path}/{key}", exact_text))
        return out
    if isinstance(old, list):
        if not isinstance(new, list) or len(old) != len(new):
            return [f"{path}: {len(old)} items, now {len(new) if isinstance(new, list) else type(new).__name__}"]
        return [d for i, (a, b) in enumerate(zip(old, new, strict=True)) for d in differences(a, b, f"{path}[{i}]", exact_text)]
    if isinstance(old, float) and isinstance(new, (int, float)) and not isinstance(new, bool):
        if math.isnan(old) and math.isnan(new):
            return []
        return [] if math.isclose(old, new, rel_tol=RTOL, abs_tol=ATOL) else [f"{path}: {old!r} -> {new!r}"]
    if isinstance(old, str) and not exact_text:
        return []
    return [] if old == new else [f"{path}: {old!r} -> {new!r}"]


def _audit(out: Path, data_root: Path, batch_size: int) -> RunOutcome:
    data = generate_dataset(data_root, seed=0)
    model = out.parent / f"{out.name}.onnx"
    shutil.copy(GOLDEN / "demo.onnx", model)
    config = build_config({}, {
        "model": model, "manifest": data.audit_manifest, "classes": list(data.classes), "mean": list(MEAN), "std": list(STD),
        "out": out, "profile": "smoke", "seed": 0, "quiet": True, "fail_on": "never", "model_card": model_card(data, 0),
        "batch_size": batch_size,
    }, source="test")
    return run_audit(config)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, RunOutcome]:
    root = tmp_path_factory.mktemp("golden")
    return {size: _audit(root / f"batch{size}", root / "data", size) for size in (64, 8)}


def test_demo_smoke_audit_equals_the_golden_run(runs: dict[int, RunOutcome]) -> None:
    golden = json.loads((GOLDEN / "results.json").read_text())
    new = runs[64].results
    text = SAME_CPU  # messages carry formatted numbers: compared exactly only where the numbers are
    problems = differences(golden["metrics"], new["metrics"], "metrics")
    assert set(new["metrics"]) == set(golden["metrics"]), "the redesign must neither drop nor invent metrics"
    problems += differences([(f["rule"], f["scope"], f["status"]) for f in golden["findings"]],
                            [(f["rule"], f["scope"], f["status"]) for f in new["findings"]], "findings")
    problems += differences(golden["findings"], new["findings"], "findings", exact_text=text)
    for name, probe in golden["probes"].items():
        mine = new["probes"][name]
        assert mine["status"] == probe["status"], name
        problems += differences({k: probe[k] for k in ("details", "notes", "references", "title", "question")},
                                mine, f"probes/{name}", exact_text=text)
        problems += differences(probe["units"], mine["units"], f"probes/{name}/units")
        for table in probe["tables"]:
            problems += table_differences(GOLDEN / "samples" / f"{table}.parquet", runs[64].out / mine["tables"][table])
    problems += differences({k: v for k, v in golden["manifest"].items() if k != "path"}, new["manifest"], "manifest")
    problems += differences(golden["preprocessing"], new["preprocessing"], "preprocessing")
    problems += differences({k: golden["model"][k] for k in ("output_kind", "num_classes", "classes")}, new["model"], "model")
    problems += differences(sorted(golden["thumbnails"]), sorted(new["thumbnails"]), "thumbnails")
    assert new["run"]["verdict"] == golden["run"]["verdict"]
    assert not problems, "\n".join(problems[:40])


def table_differences(old_path: Path, new_path: Path) -> list[str]:
    old, new = pd.read_parquet(old_path), pd.read_parquet(new_path)
    name = old_path.stem
    missing = [c for c in old.columns if c not in new.columns]
    if missing or len(old) != len(new):
        return [f"samples/{name}: columns {missing} missing or {len(old)} rows -> {len(new)}"]
    return differences(_records(old), _records(new[old.columns]), f"samples/{name}", exact_text=SAME_CPU)


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return json.loads(frame.to_json(orient="records", double_precision=15))


def test_batch_size_changes_no_finding_and_no_metric(runs: dict[int, RunOutcome]) -> None:
    """--batch-size 8 against 64: the model sees other batch shapes, so kernels may round
    differently; metrics agree to 1e-5 (relative, or absolute near 0), findings are the same."""
    small, large = runs[8].results, runs[64].results
    assert [(f["rule"], f["scope"], f["status"], f["evidence"]) for f in small["findings"]] == \
        [(f["rule"], f["scope"], f["status"], f["evidence"]) for f in large["findings"]]
    assert set(small["metrics"]) == set(large["metrics"])
    off = {k: (large["metrics"][k], v) for k, v in small["metrics"].items()
           if not math.isclose(v, large["metrics"][k], rel_tol=1e-5, abs_tol=1e-6)}
    assert not off, off
