"""Run folders are transactions: the earlier complete run survives any interrupt, kill or error; a
second concurrent run on the same folder is refused; the tool deletes no file it did not write."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from audit.run_folder import MARKER, RunFolder, RunFolderError


def _fake_run(folder: Path, text: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER).write_text("model-audit run folder\n")
    (folder / "results.json").write_text(text)
    (folder / "samples").mkdir(exist_ok=True)
    (folder / "samples" / "predictions.parquet").write_text(text)


def _tree(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_commit_replaces_the_earlier_run_and_keeps_files_the_tool_did_not_write(tmp_path: Path) -> None:
    out = tmp_path / "run"
    _fake_run(out, "old")
    (out / "notes.txt").write_text("the reviewer's notes")
    with RunFolder(out) as folder:
        _fake_run(folder.staging, "new")
        folder.commit()
    assert (out / "results.json").read_text() == "new" and (out / "notes.txt").read_text() == "the reviewer's notes"
    assert not folder.previous.exists() and not folder.staging.exists() and not (out / "STAGING.json").exists()


def test_an_error_before_commit_leaves_the_earlier_run_as_it_was(tmp_path: Path) -> None:
    out = tmp_path / "run"
    _fake_run(out, "old")
    before = _tree(out)
    with pytest.raises(RuntimeError), RunFolder(out) as folder:
        _fake_run(folder.staging, "half")
        raise RuntimeError("late error")
    assert _tree(out) == before


def test_a_folder_that_is_not_a_run_is_refused_unless_forced_and_then_nothing_in_it_is_lost(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(RunFolderError, match=r"mine: folder is not empty and is not a model-audit run; .*--force"):
        RunFolder(out).__enter__()
    with RunFolder(out, force=True) as folder:
        _fake_run(folder.staging, "new")
        folder.commit()
    assert (out / "thesis.tex").read_text() == "years of work" and (out / "results.json").read_text() == "new"
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunFolderError, match="must be a folder"):
        RunFolder(tmp_path / "file").__enter__()


def test_a_second_run_on_the_same_folder_is_refused_while_the_first_holds_it(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with RunFolder(out):
        with pytest.raises(RunFolderError, match=r"run: another model-audit run is writing this folder \(pid \d+"):
            RunFolder(out).__enter__()
    with RunFolder(out):  # released on exit
        pass


@pytest.mark.parametrize("stage", ["renamed aside", "swapped in", "staging half written"])
def test_a_run_that_finds_a_half_done_swap_repairs_it(stage: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    _fake_run(out, "old")
    folder = RunFolder(out)
    folder.home.mkdir()
    _fake_run(folder.staging, "new")
    (out / "notes.txt").write_text("kept")
    complete = stage != "staging half written"
    (folder.staging / "STAGING.json").write_text('{"state": "complete"}' if complete else '{"state": "running"}')
    if stage in ("renamed aside", "staging half written"):
        os.rename(out, folder.previous)
    else:
        os.rename(out, folder.previous)
        os.rename(folder.staging, out)
    with RunFolder(out):
        pass
    assert (out / "results.json").read_text() == ("new" if complete else "old")
    assert (out / "notes.txt").read_text() == "kept" and not folder.previous.exists()


# ---------------------------------------------------------------- real processes, killed part way

def _start(dataset, out: Path) -> subprocess.Popen[str]:  # type: ignore[no-untyped-def]
    command = [sys.executable, "-m", "audit.cli", "run", "--model", f"{dataset.model_py}:build", "--weights", str(dataset.weights),
               "--manifest", str(dataset.manifest), "--classes", str(dataset.classes_file), "--profile", "smoke",
               "--out", str(out), "--quiet"]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1])


def _wait_for(path: Path, process: subprocess.Popen[str], seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_killed_and_terminated_runs_leave_the_earlier_run_intact_and_concurrent_runs_cannot_both_succeed(
        torch_run, dataset, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "run"
    shutil.copytree(torch_run.out, out)
    before = _tree(out)
    staging = RunFolder(out).staging

    first = _start(dataset, out)
    _wait_for(staging / "samples", first)  # the audit is under way: model loaded, run store laid out
    second = _start(dataset, out)
    _, err = second.communicate(timeout=120)
    assert second.returncode == 2 and "another model-audit run is writing this folder" in err, err
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=60)
    assert first.returncode == 143 and err.strip().splitlines()[-1] == (
        "model-audit: terminated (SIGTERM); an earlier run in the output folder is intact"), err
    assert _tree(out) == before

    killed = _start(dataset, out)
    _wait_for(staging / "samples", killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=60)
    assert _tree(out) == before
