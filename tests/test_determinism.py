"""Two seeded runs of the same audit write the same run folder: results.json, report.html, the PDF's
text and every stored file agree, except what must differ (the clock, the durations and the run's own
out folder, and the results.json sha256 the report prints, which follows from them).

The two runs are the smallest there are (the tiny colour data set, the smoke profile) and run in this
process, each in its own folder; in between, the global random generators (random, numpy, torch) are
reseeded to different values, so an audit that draws from them instead of its own seed shows up here.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import random
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import CliRun

SEED = "3"
RENDERED = {"results.json", "report.html", "report.pdf", "junit.xml"}


@dataclass
class Run:
    cli: CliRun
    sha256: str

    @property
    def out(self) -> Path:
        return self.cli.out

    @property
    def results(self) -> dict[str, Any]:
        return self.cli.results


@pytest.fixture(scope="module")
def runs(run_factory, dataset) -> tuple[Run, Run]:  # type: ignore[no-untyped-def]
    import torch

    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    made = []
    try:
        for global_seed in (11, 12345):
            random.seed(global_seed)
            np.random.seed(global_seed)
            torch.manual_seed(global_seed)
            cli = run_factory(["--model", f"{dataset.model_py}:build", "--weights", str(dataset.weights)], ["--seed", SEED])
            assert (cli.out / "results.json").exists(), cli.stderr
            made.append(Run(cli, hashlib.sha256((cli.out / "results.json").read_bytes()).hexdigest()))
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])
    first, second = made
    assert first.out != second.out
    assert first.cli.code == second.cli.code
    return first, second


def _masked_json(value: Any, out: str, path: tuple[str, ...] = ()) -> Any:
    """results.json without the clock, the durations, what this machine measured (pass costs, peak
    memory) and the out folder."""
    if isinstance(value, dict):
        return {k: _masked_json(v, out, (*path, k)) for k, v in value.items()
                if not (k in ("seconds", "peak_memory", "pass_costs") or k.endswith("_seconds")
                        or (path == ("run",) and k in ("started", "finished")))}
    if isinstance(value, list):
        return [_masked_json(v, out, path) for v in value]
    if isinstance(value, str):
        return value.replace(out, "<out>")
    return value


def _masked_text(text: str, run: Run) -> str:
    """Rendered text (HTML or the PDF's) with this run's own out folder, times, durations and
    results.json sha256 replaced by placeholders."""
    r = run.results["run"]
    finished = dt.datetime.fromisoformat(r["finished"])
    for value, mark in ((str(run.out), "<out>"), (run.sha256, "<sha256>"), (run.sha256[:12], "<sha256>"),
                        (r["started"], "<time>"), (r["finished"], "<time>"), (finished.strftime("%Y-%m-%d %H:%M UTC"), "<time>")):
        text = text.replace(value, mark)
    return re.sub(r"\b\d+\.\d+ (m?s)\b", r"<n> \1", text)  # durations: "3.3 s", "predictions 0.10 s", pass costs "41.8 ms"


def _first_difference(a: str, b: str) -> str:
    for i, (x, y) in enumerate(zip(a.splitlines(), b.splitlines(), strict=False)):
        if x != y:
            return f"line {i + 1}:\n  {x[:300]}\n  {y[:300]}"
    return f"{len(a.splitlines())} lines against {len(b.splitlines())}"


def test_results_json_differs_only_in_times_durations_and_out_folder(runs: tuple[Run, Run]) -> None:
    a, b = runs
    assert a.results["run"]["started"] and a.results["run"]["finished"]
    assert str(a.out) in (a.out / "results.json").read_text(), "the masking below would mask nothing"
    left, right = _masked_json(a.results, str(a.out)), _masked_json(b.results, str(b.out))
    if left != right:
        raise AssertionError(_first_difference(json.dumps(left, indent=1, sort_keys=True), json.dumps(right, indent=1, sort_keys=True)))


def test_html_differs_only_in_the_lines_showing_times_durations_out_folder_and_sha(runs: tuple[Run, Run]) -> None:
    a, b = runs
    html_a, html_b = ((r.out / "report.html").read_text() for r in runs)
    assert a.sha256 in html_a and str(a.out) in html_a, "the masking below would mask nothing"
    left, right = _masked_text(html_a, a), _masked_text(html_b, b)
    assert left == right, _first_difference(left, right)


def test_pdf_has_the_same_text_page_by_page(runs: tuple[Run, Run]) -> None:
    import pypdfium2 as pdfium

    pages = []
    for run in runs:
        doc = pdfium.PdfDocument(run.out / "report.pdf")
        try:
            pages.append([_masked_text(doc[i].get_textpage().get_text_range(), run) for i in range(len(doc))])
        finally:
            doc.close()
    assert len(pages[0]) == len(pages[1]) and pages[0]
    for number, (left, right) in enumerate(zip(*pages, strict=True), start=1):
        assert left == right, f"page {number}: " + _first_difference(left, right)


def test_junit_differs_only_in_time_and_timestamp(runs: tuple[Run, Run]) -> None:
    left, right = (re.sub(r'\b(time|timestamp)="[^"]*"', r'\1="?"', (r.out / "junit.xml").read_text()) for r in runs)
    assert left == right, _first_difference(left, right)


def test_every_stored_file_has_the_same_name_and_bytes(runs: tuple[Run, Run]) -> None:
    """Artifacts are named by their content (artifacts/<sha>.<ext>): same name means same bytes.
    Tables, array chunks and step files must be byte for byte the same too."""
    a, b = runs
    files = [sorted(p.relative_to(r.out).as_posix() for p in r.out.rglob("*") if p.is_file()) for r in runs]
    assert files[0] == files[1]
    artifacts = [f for f in files[0] if f.startswith("artifacts/")]
    assert any(f.endswith(".npz") for f in artifacts) and any(f.endswith(".jpg") for f in artifacts)
    differing = [f for f in files[0] if f not in RENDERED and (a.out / f).read_bytes() != (b.out / f).read_bytes()]
    assert not differing


def test_gallery_npz_artifacts_carry_a_fixed_zip_time_and_load_without_pickles(runs: tuple[Run, Run]) -> None:
    a, _ = runs
    galleries = a.results["probes"]["background"]["details"]["galleries"]
    names = [e["artifact"] for entries in galleries.values() for e in entries]
    assert names and all(n.endswith(".npz") for n in names)
    for name in names:
        path = a.out / name
        assert hashlib.sha256(path.read_bytes()).hexdigest()[:20] == Path(name).stem
        with zipfile.ZipFile(path) as archive:
            assert {info.date_time for info in archive.infolist()} == {(1980, 1, 1, 0, 0, 0)}
        with np.load(path, allow_pickle=False) as arrays:
            assert arrays.files and all(arrays[k].size for k in arrays.files)
