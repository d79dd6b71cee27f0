"""The probe contract as a new probe meets it: declared tables between probes, the executor's
detail stage (exact whatever the chunking), and a consumer skipped with its producer's reason."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from audit.execution.local import DetailStage
from audit.metrics.declarations import ColumnSpec, MetricSpec, TableSpec
from audit.probes.base import (
    Consumes,
    DetailBatch,
    DetailOutput,
    DetailPlan,
    Evidence,
    Probe,
    ProbeData,
    ProbeInputs,
    Taps,
)
from audit.probes.registry import _REGISTRY, register
from audit.store import ArrayTable


class ConfidenceMargin(Probe):
    """Reads the predictions probe's table (never its attributes), makes its own model passes on
    the samples it selects, and reports one metric a rule in this test judges."""

    name = "margin"
    title = "Confidence margin under a flipped image"
    question = "Does flipping an image change how sure the model is?"
    consumes = (Consumes("predictions"),)
    metrics = (MetricSpec("margin.low_confidence", ("global", "class"), "percent", "predictions made with confidence below 0.9"),
               MetricSpec("margin.flip_change", ("global",), "number", "mean change of the top probability when flipped"))
    provides = (TableSpec("margin_flips", "detail", "top probability before and after a horizontal flip", (
        ColumnSpec("before", "percent", "top probability"), ColumnSpec("after", "percent", "after flipping"))),
        TableSpec("margin_flipped", "detail", "the flipped inputs' probabilities", kind="array"))

    def map(self, batch, taps: Taps) -> pd.DataFrame:  # type: ignore[no-untyped-def]
        return pd.DataFrame({"id": batch.ids})

    def select(self, rows: pd.DataFrame, inputs: ProbeInputs) -> DetailPlan:
        predictions = inputs.table("predictions")
        assert predictions is not None
        self._predictions = predictions
        return DetailPlan.of(predictions["id"].astype(str).tolist()[::2], 7)

    def detail(self, batch: DetailBatch) -> DetailOutput:
        assert batch.x is not None
        model, interpretation = self.context.model, self.context.interpretation
        before = interpretation.probabilities(model.forward(batch.x)["output"])
        after = interpretation.probabilities(model.forward(np.ascontiguousarray(batch.x[..., ::-1]))["output"])
        frame = pd.DataFrame({"id": batch.ids, "before": before.max(axis=1), "after": after.max(axis=1)})
        return DetailOutput({"margin_flips": frame}, {"margin_flipped": ArrayTable(frame[["id"]], {"probabilities": after})})

    def reduce(self, data: ProbeData) -> Evidence:
        evidence = Evidence()
        predictions = self._predictions
        low = predictions["confidence"] < 0.9
        evidence.add("margin.low_confidence", float(low.mean()), n=len(predictions))
        for cls, group in predictions.assign(low=low).groupby("class"):
            evidence.add("margin.low_confidence", float(group["low"].mean()), f"class:{cls}", len(group))
        table = data.tables["margin_flips"]
        evidence.add("margin.flip_change", float((table["after"] - table["before"]).mean()), n=len(table))
        flipped = data.arrays("margin_flipped")
        assert flipped is not None and len(flipped) == len(table)
        evidence.details = {"flipped": len(flipped)}
        return evidence


class MaskedShare(Probe):
    """Consumes the background probe's table: skipped, with the reason, when background is."""

    name = "masked"
    title = "Share judged on the background"
    question = "How many samples did the background probe judge?"
    consumes = (Consumes("background"),)

    def map(self, batch, taps: Taps) -> pd.DataFrame:  # type: ignore[no-untyped-def]
        return pd.DataFrame({"id": batch.ids})

    def reduce(self, data: ProbeData) -> Evidence:
        return Evidence()


@pytest.fixture
def margin_probe():  # type: ignore[no-untyped-def]
    register(ConfidenceMargin)
    register(MaskedShare)
    yield ConfidenceMargin
    _REGISTRY.pop(ConfidenceMargin.name)
    _REGISTRY.pop(MaskedShare.name)


RULE = """schema: model-audit/rule/v1
id: low-confidence
title: Many predictions are unsure
metric: margin.low_confidence
thresholds: [{op: gt, value: 0.05, status: warn, severity: medium}]
aggregate: {per: class}
message: '{scope}: {value:.0%} of the predictions below 90% confidence'
remedy: look at the unsure samples
---
schema: model-audit/rule/v1
id: flip-confidence
title: Flipped images are predicted with little confidence
metric: margin_flips.after
aggregate: {stat: mean}
thresholds: [{op: lt, value: 0.01, status: fail, severity: high}]
message: 'mean top probability after flipping {value:.0%}'
remedy: augment with flips
"""


def test_a_probe_defined_in_a_test_consumes_another_probes_table_and_its_rule_runs(
        margin_probe, run_factory, dataset, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rule = tmp_path / "low-confidence.yaml"
    rule.write_text(RULE)
    run = run_factory(["--model", str(dataset.onnx)], ["--rules", str(rule), "--probes", "predictions,margin,masked"])
    assert run.results["probes"]["margin"]["status"] == "ok", run.results["probes"]["margin"]
    predictions = pd.read_parquet(run.out / "samples" / "predictions.parquet")
    expected = (predictions["confidence"] < 0.9).groupby(predictions["class"]).mean()
    findings = {f["scope"]: f for f in run.results["findings"] if f["rule"] == "low-confidence"}
    assert set(findings) == {f"class:{c}" for c in expected.index}
    for cls, share in expected.items():
        assert findings[f"class:{cls}"]["value"] == pytest.approx(share)
        assert findings[f"class:{cls}"]["status"] == ("warn" if share > 0.05 else "pass")
    flip = next(f for f in run.results["findings"] if f["rule"] == "flip-confidence")
    margin = pd.read_parquet(run.out / "samples" / "margin_flips.parquet")
    assert (flip["status"], flip["value"]) == ("pass", pytest.approx(margin["after"].mean()))
    assert len(margin) == (len(predictions) + 1) // 2 and run.results["probes"]["margin"]["detail_samples"] == len(margin)
    assert run.results["probes"]["margin"]["units"]["margin.low_confidence"] == "percent"
    masked = run.results["probes"]["masked"]
    assert masked["status"] == "skipped"
    assert masked["reason"].startswith("needs background's 'background'; the background probe was not run")


def test_a_detail_stage_cut_into_many_chunks_run_backwards_gives_the_same_rows(
        torch_run, run_factory, dataset, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """One chunk (the default on 60 samples) against one chunk per batch run last to first."""
    original = DetailStage.run
    chunk_counts = []

    def backwards(self, chunks=None):  # type: ignore[no-untyped-def]
        chunk_counts.append(len(self.chunks))
        return original(self, reversed(range(len(self.chunks))))

    monkeypatch.setattr(DetailStage, "run", backwards)
    run = run_factory(["--model", f"{dataset.model_py}:build", "--weights", str(dataset.weights)], ["--chunk-samples", "1"])
    assert max(chunk_counts) > 1
    assert run.results["metrics"] == torch_run.results["metrics"]
    assert [f["evidence"] for f in run.results["findings"]] == [f["evidence"] for f in torch_run.results["findings"]]
    for name, probe in torch_run.results["probes"].items():
        assert probe["tables"] == run.results["probes"][name]["tables"]
        for table in probe["tables"].values():
            pd.testing.assert_frame_equal(pd.read_parquet(torch_run.out / table), pd.read_parquet(run.out / table))
        for array in probe["arrays"].values():
            one, many = (np.load(path) for path in (_single(torch_run.out / array), _single(run.out / array)))
            assert one.files == many.files
            for key in one.files:
                np.testing.assert_array_equal(one[key], many[key])


def _single(folder: Path) -> Path:
    """The array table's chunks joined as one file, so one and many chunks compare directly."""
    from audit.store import RunStore

    table = RunStore(folder.parent.parent).read_array(folder.name)
    assert table is not None
    path = folder.parent.parent / f"{folder.name}-joined.npz"
    np.savez(path, **{f"key:{c}": table.keys[c].to_numpy().astype(str) for c in table.keys.columns}, **table.values)
    return path


class EmbeddingTap(Probe):
    """Records the embedding tap (the classifier head's input) and a layer tap of every sample."""

    name = "embed"
    title = "Embedding tap"
    question = "What does the head see?"
    layer: str = "relu"  # the ColourNet module; the ONNX graph's tensor is found by the test

    def taps(self) -> frozenset[str]:
        return frozenset({"embedding", f"layer:{self.layer}"})

    def map(self, batch, taps: Taps) -> pd.DataFrame:  # type: ignore[no-untyped-def]
        layer = taps[f"layer:{self.layer}"]
        return pd.DataFrame({"id": batch.ids, "embedding": list(taps["embedding"].astype(np.float64)),
                             "layer": list(layer.reshape(len(layer), -1).astype(np.float64))})

    def reduce(self, data: ProbeData) -> Evidence:
        return Evidence(details={"rows": data.rows[["id"]].assign(
            embedding=data.rows["embedding"].map(list), layer=data.rows["layer"].map(list)).to_dict("records")})


class MissingLayerTap(Probe):
    name = "missing_tap"
    title = "A tap on a layer that is not there"
    question = "Is a probe whose tap cannot be served skipped, and the audit completed?"

    def taps(self) -> frozenset[str]:
        return frozenset({"layer:nowhere"})

    def map(self, batch, taps: Taps) -> pd.DataFrame:  # type: ignore[no-untyped-def]
        raise AssertionError("a probe whose tap the plan refused must never be called")

    def reduce(self, data: ProbeData) -> Evidence:
        raise AssertionError("never called")


def _onnx_relu_tensor(path: Path) -> str:
    import onnx

    graph = onnx.load(str(path)).graph
    return next(node.output[0] for node in graph.node if node.op_type == "Relu")


def test_onnx_taps_equal_the_torch_model_and_a_missing_layer_skips_only_its_probe(
        run_factory, dataset, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    import audit.models.onnx_adapter as onnx_adapter

    def no_conversion(*args, **kwargs):  # type: ignore[no-untyped-def]
        return None, "onnx2torch switched off by the test: taps must come from onnxruntime"

    register(EmbeddingTap)
    register(MissingLayerTap)
    try:
        probes = ["--probes", "predictions,embed,missing_tap"]
        torch_run = run_factory(["--model", f"{dataset.model_py}:build", "--weights", str(dataset.weights)], probes)
        monkeypatch.setattr(EmbeddingTap, "layer", _onnx_relu_tensor(dataset.onnx))
        monkeypatch.setattr(onnx_adapter, "convert_to_torch", no_conversion)
        onnx_run = run_factory(["--model", str(dataset.onnx)], probes)
    finally:
        _REGISTRY.pop(EmbeddingTap.name)
        _REGISTRY.pop(MissingLayerTap.name)
    for run, why in ((torch_run, "no module named 'nowhere'"), (onnx_run, "no tensor named 'nowhere'")):
        assert run.results["probes"]["embed"]["status"] == "ok", run.results["probes"]["embed"]
        skipped = run.results["probes"]["missing_tap"]
        assert skipped["status"] == "skipped" and skipped["reason"].startswith("needs tap layer:nowhere: ") and why in skipped["reason"]
        assert run.results["probes"]["predictions"]["status"] == "ok" and (run.out / "report.pdf").is_file()
    assert onnx_run.results["model"]["capabilities"]["gradients"]["available"] is False
    torch_rows = {r["id"]: r for r in torch_run.results["probes"]["embed"]["details"]["rows"]}
    onnx_rows = {r["id"]: r for r in onnx_run.results["probes"]["embed"]["details"]["rows"]}
    assert set(torch_rows) == set(onnx_rows) and len(torch_rows) == 60
    for sample_id, row in torch_rows.items():
        assert len(row["embedding"]) == 3
        np.testing.assert_allclose(onnx_rows[sample_id]["embedding"], row["embedding"], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(onnx_rows[sample_id]["layer"], row["layer"], rtol=1e-5, atol=1e-5)


def test_a_tap_that_fails_during_the_pass_fails_only_the_probes_that_need_it(
        torch_run, run_factory, dataset, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """The plan's trial on the probe batch passes; the third tapped call raises. The probe that needs
    the tap is marked error at `forward`, the batch is run again without it, nothing else is lost."""
    from audit.models.torch_adapter import TorchAdapter

    original = TorchAdapter.forward
    tapped_calls = []

    def flaky(self, x, taps=frozenset()):  # type: ignore[no-untyped-def]
        if taps:
            tapped_calls.append(len(x))
            if len(tapped_calls) == 3:
                raise RuntimeError("simulated CUDA error in a hook")
        return original(self, x, taps)

    monkeypatch.setattr(TorchAdapter, "forward", flaky)
    register(EmbeddingTap)
    try:
        run = run_factory(["--model", f"{dataset.model_py}:build", "--weights", str(dataset.weights)],
                          ["--probes", "predictions,embed", "--batch-size", "16"])
    finally:
        _REGISTRY.pop(EmbeddingTap.name)
    assert run.results["probes"]["embed"]["status"] == "error"
    assert run.results["probes"]["embed"]["error"] == "forward: RuntimeError: simulated CUDA error in a hook"
    assert run.results["probes"]["predictions"]["status"] == "ok" and run.results["metrics"]["predictions.n"] == 60
    assert run.results["manifest"]["skipped"] == torch_run.results["manifest"]["skipped"]  # no sample lost, same reasons
