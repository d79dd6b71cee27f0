"""A probe that raises marks itself `error`; its rules come out `error`; everything else completes."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from audit.metrics.declarations import MetricSpec
from audit.probes.base import Evidence, Probe, ProbeData, Taps
from audit.probes.registry import _REGISTRY, register


class Exploding(Probe):
    name = "exploding"
    title = "A probe that fails"
    question = "Does a failing probe take the audit down with it?"
    metrics = (MetricSpec("exploding.value", ("global",), "number", "a value the probe never gets to report"),)

    def map(self, batch, taps: Taps) -> pd.DataFrame:  # type: ignore[no-untyped-def]
        if len(batch) and batch.ids[0] >= "s030":
            raise RuntimeError("simulated out-of-memory in batch")
        return pd.DataFrame({"id": batch.ids, "value": 1.0})

    def reduce(self, data: ProbeData) -> Evidence:
        return Evidence(metrics={"exploding.value": 1.0})


@pytest.fixture
def exploding_probe():  # type: ignore[no-untyped-def]
    register(Exploding)
    yield Exploding
    _REGISTRY.pop(Exploding.name)


def test_failing_probe_is_contained(exploding_probe, run_factory, dataset, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rule = tmp_path / "exploding.yaml"
    rule.write_text(
        "schema: model-audit/rule/v1\nid: exploding-value\ntitle: Exploding value\nmetric: exploding.value\n"
        "thresholds: [{op: gt, value: 2, status: fail, severity: high}]\nmessage: '{value}'\nremedy: none\n"
    )
    run = run_factory(["--model", str(dataset.onnx)], ["--rules", str(rule), "--batch-size", "16"])
    probe = run.results["probes"]["exploding"]
    assert probe["status"] == "error"
    assert probe["error"] == "map: RuntimeError: simulated out-of-memory in batch"
    finding = next(f for f in run.results["findings"] if f["rule"] == "exploding-value")
    assert (finding["status"], finding["severity"]) == ("error", "high")
    assert "simulated out-of-memory" in finding["message"]
    assert run.results["probes"]["predictions"]["status"] == "ok"
    assert run.results["metrics"]["predictions.n"] == 60
    assert run.results["run"]["verdict"] == "ERROR" and run.code == 1
    html = (run.out / "report.html").read_text()
    assert "This probe failed" in html and (run.out / "report.pdf").is_file()
