"""End to end: the CLI on a hand-set torch model and its ONNX export, checked against direct inference."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from audit.cli import main
from tests.conftest import CLASSES, load_user_model, run_cli, set_weights


def direct_predictions(dataset) -> dict[str, int]:  # type: ignore[no-untyped-def]
    """The same model on the same images, without model-audit: PIL -> [0, 1] -> forward -> argmax."""
    from PIL import Image

    model = load_user_model(dataset.model_py).build()
    set_weights(model)
    preds = {}
    for line in dataset.manifest.read_text().splitlines()[1:]:
        sample_id, path = line.split(",")[:2]
        try:
            img = np.asarray(Image.open(dataset.root / path).convert("RGB"), np.float32) / 255.0
        except (FileNotFoundError, OSError):
            continue
        with torch.no_grad():
            logits = model(torch.from_numpy(img.transpose(2, 0, 1))[None])
        preds[sample_id] = int(logits.argmax())
    return preds


@pytest.mark.parametrize("which", ["torch_run", "onnx_run"])
def test_run_writes_every_artifact(which: str, request: pytest.FixtureRequest) -> None:
    run = request.getfixturevalue(which)
    for name in ("results.json", "report.html", "report.pdf", "junit.xml", "samples/predictions.parquet"):
        assert (run.out / name).is_file(), name
    assert run.stderr == ""


@pytest.mark.parametrize("which", ["torch_run", "onnx_run"])
def test_accuracy_equals_direct_inference(which: str, request: pytest.FixtureRequest, dataset) -> None:  # type: ignore[no-untyped-def]
    run = request.getfixturevalue(which)
    preds = direct_predictions(dataset)
    expected = np.mean([preds[i] == dataset.labels[i] for i in preds])
    assert expected == pytest.approx(54 / 60)  # the six tinted images are the model's mistakes
    assert run.results["metrics"]["predictions.accuracy"] == pytest.approx(expected, abs=1e-12)
    import pandas as pd

    table = pd.read_parquet(run.out / "samples" / "predictions.parquet")
    assert dict(zip(table["id"], table["pred"], strict=True)) == preds


def test_torch_and_onnx_runs_agree(torch_run, onnx_run) -> None:  # type: ignore[no-untyped-def]
    t, o = torch_run.results, onnx_run.results
    assert t["model"]["format"] == "python" and o["model"]["format"] == "onnx"
    for key in ("predictions.accuracy", "predictions.ece", "predictions.accuracy@domain:data"):
        assert t["metrics"][key] == pytest.approx(o["metrics"][key], abs=1e-6)
    # The randomisation test re-draws weights; onnx2torch registers parameters differently (Gemm as its own
    # module), so its random draws, and with them the sanity findings, may differ. Everything else must agree.
    def statuses(run):  # type: ignore[no-untyped-def]
        return {(f["rule"], f["scope"]): f["status"] for f in run["findings"] if f["rule"] != "attribution-sanity"}

    assert statuses(t) == statuses(o)


def test_skipped_rows_are_listed_and_counted(torch_run) -> None:  # type: ignore[no-untyped-def]
    skipped = {row["id"]: row for row in torch_run.results["manifest"]["skipped"]}
    assert set(skipped) == {"missing", "corrupt"}
    assert skipped["missing"]["reason"] == "file not found"
    assert skipped["corrupt"]["reason"].startswith("unreadable")
    html = (torch_run.out / "report.html").read_text()
    assert "img/not-there.png" in html and "img/corrupt.png" in html
    finding = next(f for f in torch_run.results["findings"] if f["rule"] == "samples-skipped")
    assert finding["status"] == "warn" and finding["n"] == 62


def test_model_fingerprints(torch_run, onnx_run, dataset) -> None:  # type: ignore[no-untyped-def]
    import hashlib

    files = {f["path"]: f["sha256"] for f in torch_run.results["model"]["files"]}
    assert files[str(dataset.weights)] == hashlib.sha256(dataset.weights.read_bytes()).hexdigest()
    assert str(dataset.model_py) in files
    assert onnx_run.results["model"]["files"][0]["sha256"] == hashlib.sha256(dataset.onnx.read_bytes()).hexdigest()


def test_capabilities_reported(torch_run, onnx_run) -> None:  # type: ignore[no-untyped-def]
    for run in (torch_run, onnx_run):
        caps = run.results["model"]["capabilities"]
        assert all(c["available"] for c in caps.values()), caps


@pytest.mark.parametrize(
    ("fail_on", "expected"),
    [("critical", 0), ("high", 0), ("medium", 1), ("low", 1), ("never", 0)],
)
def test_exit_code_follows_fail_on(fail_on: str, expected: int, run_factory, dataset, tmp_path) -> None:  # type: ignore[no-untyped-def]
    config = tmp_path / "audit.yaml"
    config.write_text(
        "rules:\n"
        "  domain-accuracy-gap: {enabled: false}\n"
        "  accuracy-floor:\n"
        "    thresholds:\n"
        "      - {op: lt, value: 0.95, status: fail, severity: medium}\n"
    )
    run = run_factory(["--model", str(dataset.onnx), "--config", str(config)], ["--fail-on", fail_on])
    failing = [(f["rule"], f["severity"]) for f in run.results["findings"] if f["status"] in ("fail", "error")]
    assert failing == [("accuracy-floor", "medium")]
    assert run.code == expected


def test_default_gate_fails_on_the_domain_gap(torch_run) -> None:  # type: ignore[no-untyped-def]
    """The six tinted `data` images drop data accuracy to 80% against 100% on sim: a high-severity fail."""
    gap = next(f for f in torch_run.results["findings"] if f["rule"] == "domain-accuracy-gap")
    assert (gap["status"], gap["severity"], gap["scope"]) == ("fail", "high", "domain:data")
    assert gap["value"] == pytest.approx(0.2)
    assert gap["evidence"][:6] and set(gap["evidence"]) <= {f"s{i:03d}" for i in range(54, 60)}
    assert torch_run.code == 1
    assert torch_run.results["run"]["verdict"] == "FAIL"


def test_script_in_class_name_is_escaped(run_factory, dataset, tmp_path) -> None:  # type: ignore[no-untyped-def]
    hostile = tmp_path / "classes.txt"
    hostile.write_text("red\n<script>alert(1)</script>\nblue\n")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(dataset.manifest.read_text().replace(",green,", ",1,"))
    for line in dataset.manifest.read_text().splitlines()[1:3]:
        assert "img/" in line
    (tmp_path / "img").symlink_to(dataset.root / "img")
    (tmp_path / "mask.png").symlink_to(dataset.root / "mask.png")
    run = run_factory(["--model", str(dataset.onnx)], ["--classes", str(hostile), "--manifest", str(manifest),
                                                        "--data-root", str(dataset.root)])  # the links' real folder
    html = (run.out / "report.html").read_text()
    assert "<script>alert(1)</script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert html.count("<script>") == 1  # only the report's own filter/lightbox script


def test_input_error_is_one_line_exit_2(capsys: pytest.CaptureFixture[str], dataset, tmp_path) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "m.csv"
    bad.write_text("id,path,label\na,x.png,red\na,y.png,blue\n")
    code = main(["run", "--model", str(dataset.onnx), "--manifest", str(bad), "--classes", str(dataset.classes_file), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "row 2" in err and "'id'" in err and "duplicate" in err


def test_unknown_probe_and_usage_errors(capsys: pytest.CaptureFixture[str], dataset) -> None:  # type: ignore[no-untyped-def]
    assert main(["run", "--model", str(dataset.onnx), "--manifest", str(dataset.manifest), "--probes", "nope"]) == 2
    assert "unknown probe 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["run", "--layout", "sideways"])
    assert exc.value.code == 2


def test_render_from_saved_run_only(torch_run, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import shutil

    copy = tmp_path / "copied-run"
    shutil.copytree(torch_run.out, copy)
    for name in ("report.html", "report.pdf", "junit.xml"):
        (copy / name).unlink()
    code = subprocess.run([sys.executable, "-m", "audit", "render", str(copy)], capture_output=True, text=True, check=False)
    assert code.returncode == 0, code.stderr
    assert (copy / "report.html").read_text() == (torch_run.out / "report.html").read_text()
    probe = subprocess.run([sys.executable, "-c", "import sys, audit.api; audit.api.render(sys.argv[1]); "
                            "print('torch' in sys.modules)", str(copy)], capture_output=True, text=True, check=True)
    assert probe.stdout.strip() == "False"


def test_no_sample_images_keeps_pixels_out(run_factory, dataset) -> None:  # type: ignore[no-untyped-def]
    run = run_factory(["--model", str(dataset.onnx)], ["--no-sample-images"])
    html = (run.out / "report.html").read_text()
    assert "data:image/png" not in html
    assert run.results["thumbnails"] == {}
    assert not any((run.out / "artifacts").iterdir())


def test_thumbnails_embedded_for_evidence(torch_run) -> None:  # type: ignore[no-untyped-def]
    """Every thumbnail the run wrote is shown in the self-contained HTML (none is written in vain)."""
    import base64

    html = (torch_run.out / "report.html").read_text()
    assert torch_run.results["thumbnails"]
    missing = [i for i, path in torch_run.results["thumbnails"].items()
               if base64.b64encode((torch_run.out / path).read_bytes()).decode("ascii") not in html]
    assert not missing, missing


def test_default_out_is_deterministic(dataset, monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from audit.config import build_config

    config = build_config({}, {"model": str(dataset.onnx), "manifest": str(dataset.manifest)})
    assert str(config.resolved_out()) == "reports/colour-manifest"
    factory = build_config({}, {"model": f"{dataset.model_py}:build", "manifest": str(dataset.manifest)})
    assert str(factory.resolved_out()) == "reports/colour_model.build-manifest"


def test_rules_list_and_probes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rules", "list"]) == 0
    out = capsys.readouterr().out
    for rule in ("accuracy-floor", "class-recall-floor", "calibration-error", "domain-accuracy-gap", "samples-skipped"):
        assert rule in out
    assert main(["probes"]) == 0
    assert "predictions" in capsys.readouterr().out


def test_junit_has_one_case_per_finding(torch_run) -> None:  # type: ignore[no-untyped-def]
    import xml.etree.ElementTree as ET

    suites = ET.parse(torch_run.out / "junit.xml").getroot()
    cases = [case for suite in suites for case in suite.findall("testcase")]
    assert len(cases) == len(torch_run.results["findings"])
    gate = torch_run.results["gate"]
    assert int(suites.get("failures")) + int(suites.get("errors")) == len(gate["gating"]) and torch_run.code == gate["exit_code"]


def test_classes_count_must_match_model(capsys: pytest.CaptureFixture[str], dataset, tmp_path) -> None:  # type: ignore[no-untyped-def]
    two = tmp_path / "two.txt"
    two.write_text("red\ngreen\n")
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"path,label\n{dataset.root / 'img' / '000.png'},0\n")
    code = main(["run", "--model", str(dataset.onnx), "--manifest", str(manifest), "--classes", str(two),
                 "--data-root", str(dataset.root), "--out", str(tmp_path / "o"), "--quiet"])
    assert code == 2
    assert (f"--classes: 2 class names were given (red, green) but {dataset.onnx} outputs 3 classes; "
            "the names must list the model's outputs in order") in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path / ".o.model-audit" / "staging").exists()  # no half-made run


def test_a_new_user_gets_the_usage_of_the_command_they_typed(capsys: pytest.CaptureFixture[str], dataset, tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--modle", "m.onnx"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("usage: model-audit run ") and "unrecognized arguments: --modle m.onnx" in err
    code = main(["run", "--model", f"{dataset.model_py}:build", "--weights", str(dataset.weights), "--manifest", str(dataset.manifest),
                 "--classes", str(dataset.classes_file), "--mean", "0.5", "0.5", "--workers", "0", "--out", str(tmp_path / "o"), "--quiet"])
    assert code == 2
    assert capsys.readouterr().err == ("model-audit: error: --mean 0.5 0.5: the model takes 3 channel(s), so give 1 or 3 values, "
                                       "not 2\n")


def test_results_json_is_valid_and_sorted(torch_run) -> None:  # type: ignore[no-untyped-def]
    from audit.findings import STATUS_RANK

    order = [STATUS_RANK[f["status"]] for f in torch_run.results["findings"]]
    assert order == sorted(order)
    assert json.loads((torch_run.out / "results.json").read_text()) == torch_run.results
    assert torch_run.results["model"]["classes"] == CLASSES


def test_rules_check_refuses_a_misspelled_metric_naming_file_key_and_closest(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """Against the probes' real declarations: a typo would otherwise come out `skipped` in every run."""
    from audit.rules.catalogue import builtin_rule_files

    source = next(p for p in builtin_rule_files() if p.name == "class-recall-floor.yaml")
    bad = tmp_path / "recall.yaml"
    bad.write_text(source.read_text().replace("metric: predictions.recall", "metric: predictions.recal"))
    code, _, err = run_cli(["rules", "check", str(bad)], capsys)
    assert code == 2
    assert err.strip() == f"model-audit: error: {bad}: metric: 'predictions.recal' is not declared by any probe (closest: predictions.recall)"
    code, out, _ = run_cli(["rules", "check", *map(str, builtin_rule_files())], capsys)
    assert code == 0 and out.count("valid") == len(builtin_rule_files())


def test_probes_listing_comes_from_the_declarations(capsys: pytest.CaptureFixture[str]) -> None:
    from audit.probes.registry import all_probes

    assert main(["probes"]) == 0
    out = capsys.readouterr().out
    sections = {}
    for line in out.splitlines():
        if not line.startswith(" "):
            sections[line.split(":")[0]] = []
        sections[next(reversed(sections))].append(line)
    assert list(sections) == list(all_probes())
    for name, cls in all_probes().items():
        params = [line for line in sections[name] if line.startswith("  param ")]
        assert [line.split(":")[0] for line in params] == [f"  param {f}" for f in cls.Params.model_fields]
        for line, field in zip(params, cls.Params.model_fields.values(), strict=True):
            assert field.description and f": {field.description} (default " in line, f"{name}: {line}"
            assert line.endswith(" in every profile)") or all(f"{p}: " in line for p in ("smoke", "standard", "thorough")), line
    assert ("  param bootstrap: bootstrap replicates for confidence intervals (default smoke: 200; standard: 1000; thorough: 2000)"
            in sections["predictions"])
    assert "  param confidence_level: level of the bootstrap intervals (default 0.95 in every profile)" in sections["predictions"]
    attribution = "\n".join(sections["attribution"])
    assert attribution.startswith("attribution: Attributions (needs a forward pass; its methods use more when the model has it)")
    assert "    integrated_gradients: gradients\n" in attribution and "    guided_backprop: gradients, hooks, relu_modules\n" in attribution
    assert "    without gradients: feature_ablation, kernel_shap" in attribution
    assert ("(default smoke: saliency, gradient_x_input, integrated_gradients, gradcam, guided_backprop, deconvolution; "
            "standard: unset; thorough: unset)") in attribution


def test_a_run_says_each_stage_then_the_gate_the_preprocessing_and_the_files(capsys: pytest.CaptureFixture[str], dataset,  # type: ignore[no-untyped-def]
                                                                             tmp_path) -> None:
    out = tmp_path / "o"
    model = f"{dataset.model_py}:build"
    code = main(["run", "--model", model, "--weights", str(dataset.weights), "--manifest", str(dataset.manifest),
                 "--classes", str(dataset.classes_file), "--probes", "predictions", "--profile", "smoke", "--fail-on", "never",
                 "--out", str(out)])
    captured = capsys.readouterr()
    results = json.loads((out / "results.json").read_text())
    stages = [line for line in captured.err.splitlines() if line.startswith("model-audit: ")]
    passed = int(stages[1].removeprefix("model-audit: forward pass: ").removesuffix(" samples"))
    assert stages[2].startswith("model-audit: forward pass: expected ") and stages[2].endswith(f" for {passed} samples")  # from its first batch
    del stages[2]
    assert results["manifest"]["samples"] <= passed <= results["manifest"]["rows"]  # rows the manifest check let through
    assert stages == [f"model-audit: loading the model ({model})", f"model-audit: forward pass: {passed} samples",
                      f"model-audit: judging {len(results['rules'])} rules", "model-audit: writing thumbnails of the findings' evidence",
                      "model-audit: rendering the report (figures and sample images)",
                      "model-audit: writing report.pdf (the longest step of rendering)", "model-audit: writing junit.xml"]
    lines = captured.out.splitlines()
    assert code == results["gate"]["exit_code"] == 0
    assert "preprocessing: mean 0, std 1 on pixels in [0, 1] (assumed: no --mean/--std was given)" in lines
    assert "gate: fail_on never: exit code 0" in lines
    assert lines[-4:] == [f"html: {out / 'report.html'}", f"pdf: {out / 'report.pdf'}", f"junit: {out / 'junit.xml'}",
                          f"results: {out / 'results.json'}"]


def test_the_summary_reads_the_saved_gate_and_says_stated_preprocessing(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from types import SimpleNamespace

    from audit.cli import _print_summary
    from audit.findings import gate

    findings = [{"rule": "accuracy-floor", "scope": "global", "status": "fail", "severity": "high", "message": "accuracy 40%"},
                {"rule": "calibration-error", "scope": "global", "status": "warn", "severity": "medium", "message": "ECE 9%"}]
    results = {"findings": findings, "gate": gate(findings, "high"), "run": {"verdict": "FAIL", "fail_on": "high"},
               "model": {"fingerprint": "0123456789abcdef" * 4}, "manifest": {"skipped": []},
               "preprocessing": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.5, 0.5], "stated": True, "inferred": None}}
    _print_summary(SimpleNamespace(results=results, reports={"html": tmp_path / "report.html"}, out=tmp_path))
    assert capsys.readouterr().out.splitlines() == [
        "preprocessing: mean 0.5, std 0.25 0.5 0.5 on pixels in [0, 1] (as given)",
        "model fingerprint: 0123456789abcdef",
        "verdict: FAIL (1 fail, 1 warn)",
        "gate: fail_on high: exit code 1 (1 finding(s) at high or above)",
        "  FAIL  high     accuracy-floor [global]: accuracy 40%",
        "  WARN  medium   calibration-error [global]: ECE 9%",
        f"html: {tmp_path / 'report.html'}",
        f"results: {tmp_path / 'results.json'}",
    ]


def test_a_sigterm_that_a_callback_swallowed_is_delivered_again() -> None:
    """Python ignores an exception raised in __del__ (or a weakref callback): a SIGTERM landing there
    must still end the run (CI saw one exit 1 after the audit ran on to its end)."""
    import time

    from audit import cli

    class Collected:
        def __del__(self) -> None:
            cli._on_sigterm(signal.SIGTERM, None)

    with cli.termination_signals(), pytest.raises(cli.Terminated):
        Collected()  # dropped at once: __del__ raises Terminated, which Python reports and ignores
        time.sleep(10)
    assert signal.getsignal(signal.SIGTERM) is not cli._on_sigterm
