"""The corpus of bad inputs: each case with the exact error or skip it must produce.

Loader, parser and model cases are tested at their own level (milliseconds each); the cases that only
show in a whole audit share one audit (`corpus_run`), which must complete around all of them."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from audit.data import Preprocessing, load_sample, mask_problem, read_input
from audit.errors import ModelLoadError, SampleError
from audit.manifest import Sample
from tests import corpus
from tests.conftest import SIZE, colour_image, run_cli

# ---------------------------------------------------------------- one file at a time (the loader)

LOADER_CASES = {
    "missing file": (lambda d: d / "nothing-here.png", r"^file not found$"),
    "not an image": (lambda d: _write(d / "text.png", b"hello, I am text"), r"^unreadable: cannot identify image file"),
    "corrupt PNG": (lambda d: _write(d / "c.png", b"\x89PNG\r\n\x1a\n" + b"junk" * 10), r"^unreadable: "),
    "truncated PNG": (lambda d: corpus.truncated_png(d / "t.png"), r"^unreadable: "),
    "decompression bomb header": (lambda d: corpus.png_declaring(d / "bomb.png", 100_000, 100_000),
                                  r"^image declares 100000 x 100000 = 10,000,000,000 pixels, over the limit of 50,000,000 "
                                  r"\(--max-image-pixels\); not decoded$"),
    "empty npy": (lambda d: _npy(d / "e.npy", np.zeros((0,), np.float32)), r"^array is empty \(shape \(0,\)\)$"),
    "zero-sized npy": (lambda d: _npy(d / "z.npy", np.zeros((3, 0, 5), np.float32)), r"^array is empty \(shape \(3, 0, 5\)\)$"),
    "over-large npy header": (lambda d: corpus.npy_declaring(d / "h.npy", (1, 100_000, 100_000)),
                              r"^array has shape \(1, 100000, 100000\): 10,000,000,000 pixels, over the limit"),
    "pickled npy": (lambda d: corpus.pickled_npy(d / "p.npy"), r"^unreadable: Object arrays cannot be loaded when allow_pickle=False"),
    "4-d npy": (lambda d: _npy(d / "4.npy", np.zeros((1, 2, 3, 4), np.float32)), r"^array has shape \(1, 2, 3, 4\); expected"),
    "NaN npy": (lambda d: _npy(d / "n.npy", np.full((4, 4), np.nan, np.float32)), r"^array contains NaN or infinite values$"),
    "string npy": (lambda d: _npy(d / "s.npy", np.array([["a", "b"]])), r"^unsupported array dtype <U1$"),
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _npy(path: Path, array: np.ndarray) -> Path:
    np.save(path, array)
    return path


@pytest.mark.parametrize("case", list(LOADER_CASES))
def test_loader_refuses_each_bad_file_with_its_reason(case: str, tmp_path: Path) -> None:
    build, reason = LOADER_CASES[case]
    with pytest.raises(SampleError, match=reason):
        read_input(build(tmp_path))


def test_a_real_image_over_the_configured_pixel_limit_is_not_decoded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = corpus.png(tmp_path / "big.png", np.zeros((300, 400), np.uint8))
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded an image over the limit"))
    with pytest.raises(SampleError, match=r"^image declares 400 x 300 = 120,000 pixels, over the limit of 100,000"):
        read_input(path, max_pixels=100_000)


def test_running_out_of_memory_on_one_sample_skips_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = corpus.png(tmp_path / "ok.png", np.zeros((4, 4, 3), np.uint8))

    def exhausted(self):  # type: ignore[no-untyped-def]
        raise MemoryError

    monkeypatch.setattr(Image.Image, "load", exhausted)
    with pytest.raises(SampleError, match=r"^out of memory while decoding it$"):
        load_sample(Sample("ok", path, 1), Preprocessing.create((4, 4), 3, None, None))


def test_mask_problems_are_said_unreadable_drops_the_mask_other_size_keeps_it(tmp_path: Path) -> None:
    image = corpus.png(tmp_path / "i.png", np.zeros((16, 16, 3), np.uint8))
    broken = _write(tmp_path / "m.png", b"not a mask")
    small = corpus.png(tmp_path / "s.png", np.full((8, 12), 255, np.uint8))
    reason, kept = mask_problem(Sample("a", image, 1, mask=broken), (16, 16))  # type: ignore[misc]
    assert (reason.startswith("mask unreadable (unreadable: cannot identify image file") and reason.endswith("sample kept without mask")
            and kept is False)
    assert mask_problem(Sample("b", image, 2, mask=small), (16, 16)) == (
        "mask is 12 x 8 but the image is 16 x 16; both are resized to the model input (nearest neighbour for the mask)", True)
    assert mask_problem(Sample("c", image, 3, mask=image), (16, 16)) is None


# ---------------------------------------------------------------- model files

@pytest.fixture(scope="module")
def clean_program(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return corpus.export_program(tmp_path_factory.mktemp("pt2") / "clean.pt2")


@pytest.mark.parametrize("variant", ["sample inputs", "weight"])
def test_a_pt2_carrying_a_pickle_is_refused_and_its_code_never_runs(variant: str, clean_program: Path, tmp_path: Path) -> None:
    from audit.models import InputSpec, load_model

    marker = tmp_path / "MARKER"
    build = corpus.pt2_with_pickled_inputs if variant == "sample inputs" else corpus.pt2_with_pickled_weight
    evil = build(clean_program, tmp_path / "evil.pt2", marker)
    expected = "sample inputs data/sample_inputs/model.pt hold pickled objects" if variant == "sample inputs" else "weight 'conv.weight' is pickled"
    with pytest.raises(ModelLoadError, match=f"refused: loading it would unpickle or run code it carries: {expected}.*--trust-pickle"):
        load_model(evil, InputSpec(size=(16, 16)), "cpu")
    assert not marker.exists()


def test_the_pickle_check_is_what_stops_the_payload(clean_program: Path, tmp_path: Path) -> None:
    """Loaded plainly, the same file does run its payload: the refusal above is not an accident of a broken file."""
    import torch

    marker = tmp_path / "MARKER"
    evil = corpus.pt2_with_pickled_inputs(clean_program, tmp_path / "evil.pt2", marker)
    try:
        torch.export.load(str(evil))
    except Exception:  # noqa: BLE001, S110 - what happens after the payload ran does not matter
        pass
    assert marker.exists()


def test_a_pt2_with_compiled_code_is_refused_and_a_clean_one_loads(clean_program: Path, tmp_path: Path) -> None:
    from audit.models import InputSpec, load_model

    with pytest.raises(ModelLoadError, match="compiled AOTInductor code under data/aotinductor/"):
        load_model(corpus.pt2_with_aoti(clean_program, tmp_path / "aoti.pt2"), InputSpec(size=(16, 16)), "cpu")
    adapter = load_model(clean_program, InputSpec(size=(16, 16)), "cpu")
    assert adapter.format == "torch.export"
    assert adapter.forward(np.zeros((3, 3, 16, 16), np.float32))["output"].shape == (3, 3)
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") is None  # the guard is scoped to the load


def test_trust_pickle_is_the_one_way_to_load_such_a_file(clean_program: Path, tmp_path: Path) -> None:
    from audit.models import InputSpec, load_model

    marker = tmp_path / "MARKER"
    evil = corpus.pt2_with_pickled_inputs(clean_program, tmp_path / "evil.pt2", marker)
    with pytest.raises(ModelLoadError):  # trusted, the payload runs; the program it leaves behind is broken
        load_model(evil, InputSpec(size=(16, 16)), "cpu", trust_pickle=True)
    assert marker.exists()


MODEL_CASES = {
    "factory calls sys.exit(0)": ("import sys\nsys.exit(0)\n", r"importing failed \(it called sys\.exit\(0\)\)"),
    "factory() calls sys.exit(3)": ("import sys\ndef build():\n    sys.exit(3)\n", r"calling build\(\) failed \(it called sys\.exit\(3\)\)"),
    "factory raises": ("def build():\n    raise RuntimeError('no GPU here')\n", r"calling build\(\) failed \(RuntimeError: no GPU here\)"),
    "factory returns no module": ("def build():\n    return 42\n", r"build returned int, not a torch.nn.Module"),
    "syntax error": ("def build(:\n", r"importing failed \(SyntaxError"),
}


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_user_code_failing_during_loading_is_an_input_error(case: str, dataset, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    source, message = MODEL_CASES[case]
    factory = tmp_path / "factory.py"
    factory.write_text(source)
    code, out, err = run_cli(["run", "--model", f"{factory}:build", "--manifest", str(dataset.manifest),
                              "--classes", str(dataset.classes_file), "--out", str(tmp_path / "run"), "--quiet"], capsys)
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith(f"model-audit: error: {factory}" if "importing" in message else "model-audit: error: --model")
    import re

    assert re.search(message, err), err
    assert not (tmp_path / "run").exists()


def test_other_model_files(dataset, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """Truncated ONNX, a pickled whole-model .pt, weights that do not fit: one line each, exit 2."""
    import torch

    truncated = tmp_path / "cut.onnx"
    truncated.write_bytes(dataset.onnx.read_bytes()[:300])
    pickled = tmp_path / "whole.pt"
    torch.save(torch.nn.Linear(2, 2), pickled)
    wrong = tmp_path / "wrong.pt"
    torch.save({"fc.weight": torch.zeros(1)}, wrong)
    cases = [
        (["--model", str(truncated)], f"{truncated}: "),
        (["--model", str(pickled)], "pickled nn.Module files are refused because loading them runs arbitrary code"),
        (["--model", f"{dataset.model_py}:build", "--weights", str(wrong)], "weights do not fit the model"),
    ]
    for args, expected in cases:
        code, _, err = run_cli(["run", *args, "--manifest", str(dataset.manifest), "--classes", str(dataset.classes_file),
                                "--out", str(tmp_path / "run"), "--quiet"], capsys)
        assert code == 2 and expected in err and err.count("\n") == 1, err


# ---------------------------------------------------------------- configuration checked before the compute

CONFIG_CASES = {
    "seed -1": ("seed: -1\n", r"key 'seed': Input should be greater than or equal to 0"),
    "unknown key": ("batchsize: 8\n", r"unknown key 'batchsize'"),
    "malformed YAML": ("probes: [a, b\n", r"not valid YAML"),
    "std zero": ("std: [0]\n", r"key 'std': Value error, std must not contain 0"),
    "unknown reference domain": ("reference_domain: simulation\n",
                                 r"reference_domain 'simulation' is not a domain of .*manifest.csv \(domains: data, sim\)"),
    "unknown probe": ("probes: [predictons]\n", r"unknown probe 'predictons'"),
    "NaN threshold": ("rules: {accuracy-floor: {thresholds: [{op: lt, value: .nan, status: fail, severity: high}]}}\n",
                      r"key 'rules.accuracy-floor.thresholds.0.value': Value error, must be a finite number, not nan"),
    "waiver of an unknown rule": ("waivers: [{rule: acuracy-floor, reason: r, by: me}]\n",
                                  r"config key 'waivers.0.rule': no rule 'acuracy-floor' \(closest: accuracy-floor"),
    "waiver of a scope that cannot exist": ("waivers: [{rule: class-recall-floor, scope: 'class:purple', reason: r, by: me}]\n",
                                            r"config key 'waivers.0.scope': 'purple' is not one of the run's classes"),
    "message format width": ("rule_files: [evil.yaml]\n",
                             r"evil.yaml: rule 'evil-floor': key 'message': placeholder \{value:>99999999\}: width 99999999 is over the limit of 50"),
    "YAML that crashes PyYAML": ("when: 2001-13-01\n", r"not valid YAML"),
    "classes file is a folder": ("classes: .\n", r"cannot read the classes file \(Is a directory\)"),
}

EVIL_RULE = """schema: model-audit/rule/v1
id: evil-floor
title: A rule whose message would fill a disk
metric: predictions.accuracy
thresholds: [{op: lt, value: 0.5, status: fail, severity: high}]
message: "accuracy is {value:>99999999}"
remedy: none
"""


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_config_problems_stop_the_run_before_any_work(case: str, dataset, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    import re

    text, message = CONFIG_CASES[case]
    config = tmp_path / "audit.yaml"
    (tmp_path / "evil.yaml").write_text(EVIL_RULE)
    classes = "" if text.startswith("classes:") else f"classes: {dataset.classes_file}\n"
    config.write_text(f"model: {dataset.onnx}\nmanifest: {dataset.manifest}\n{classes}{text}")
    code, _, err = run_cli(["run", "--config", str(config), "--out", str(tmp_path / "run"), "--quiet"], capsys)
    assert code == 2 and err.count("\n") == 1 and re.search(message, err), err
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- one audit around every bad row

HOSTILE_CLASSES = ["red $x^2$", "<b>green</b> & co", "blue {n:>9} \\frac{1}{2}"]


@pytest.fixture(scope="module")
def corpus_run(dataset, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A torch audit (no --input-size: inferred) of a data set whose first image has an odd size, with
    every kind of bad row and mask, hostile class names, and a symlink out of the data folder."""
    from tests.conftest import _run

    root = tmp_path_factory.mktemp("corpus")
    outside = tmp_path_factory.mktemp("outside")
    rng = np.random.default_rng(1)
    (root / "img").mkdir()
    full = np.zeros((SIZE, SIZE), np.uint8)
    full[4:12, 4:12] = 255
    corpus.png(root / "mask.png", full)
    corpus.png(root / "mask-small.png", full[::2, ::2])
    _write(root / "mask-broken.png", b"not a mask")
    rows = ["id,path,label,mask,domain"]
    odd = np.zeros((20, 24, 3), np.uint8)
    odd[..., 0] = 200
    corpus.png(root / "img" / "odd.png", odd)
    rows.append("odd,img/odd.png,0,,sim")
    for i in range(24):
        corpus.png(root / "img" / f"{i:02d}.png", colour_image(rng, i % 3))
        mask = {0: "mask-broken.png", 1: "mask-small.png"}.get(i, "mask.png")
        rows.append(f"s{i:02d},img/{i:02d}.png,{i % 3},{mask},{'sim' if i % 2 else 'data'}")
    bad = {
        "bomb": corpus.png_declaring(root / "img" / "bomb.png", 100_000, 100_000),
        "truncated": corpus.truncated_png(root / "img" / "truncated.png"),
        "empty": _npy(root / "img" / "empty.npy", np.zeros((0,), np.float32)),
        "huge": corpus.npy_declaring(root / "img" / "huge.npy", (1, 100_000, 100_000)),
        "pickled": corpus.pickled_npy(root / "img" / "pickled.npy"),
    }
    for name, path in bad.items():
        rows.append(f"{name},img/{path.name},1,,data")
    secret = corpus.png(outside / "secret.png", colour_image(rng, 2))
    (root / "img" / "link.png").symlink_to(secret)
    rows.append("link,img/link.png,2,,data")
    rows.append(f"climb,../{outside.name}/secret.png,2,,data")
    rows.append("missing,img/gone.png,0,,sim")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    (root / "classes.txt").write_text("\n".join(HOSTILE_CLASSES) + "\n")
    data = type(dataset)(root, root / "manifest.csv", root / "classes.txt", dataset.model_py, dataset.weights, dataset.onnx, {})
    return _run(tmp_path_factory.mktemp("corpus-run") / "run",
                ["--model", f"{dataset.model_py}:build", "--weights", str(dataset.weights)], data)


EXPECTED_SKIPS = {
    "bomb": "image declares 100000 x 100000 = 10,000,000,000 pixels, over the limit of 50,000,000 (--max-image-pixels); not decoded",
    "empty": "array is empty (shape (0,))",
    "huge": "array has shape (1, 100000, 100000): 10,000,000,000 pixels, over the limit of 50,000,000 (--max-image-pixels); not read",
    "pickled": "unreadable: Object arrays cannot be loaded when allow_pickle=False",
    "link": "refused: path is outside the manifest folder and every --data-root",
    "climb": "refused: path is outside the manifest folder and every --data-root",
    "missing": "file not found",
}


def test_the_audit_completes_around_every_bad_row(corpus_run) -> None:  # type: ignore[no-untyped-def]
    assert corpus_run.code in (0, 1), corpus_run.stderr
    for name in ("results.json", "report.html", "report.pdf", "junit.xml"):
        assert (corpus_run.out / name).is_file(), name
    skipped = {row["id"]: row["reason"] for row in corpus_run.results["manifest"]["skipped"]}
    for sample_id, reason in EXPECTED_SKIPS.items():
        assert skipped[sample_id].startswith(reason), (sample_id, skipped[sample_id])
    assert skipped["truncated"].startswith("unreadable: ")
    assert set(skipped) == {*EXPECTED_SKIPS, "truncated"}
    assert corpus_run.results["manifest"]["samples"] == 25
    statuses = {name: probe["status"] for name, probe in corpus_run.results["probes"].items()}
    assert "error" not in statuses.values(), statuses


def test_mask_problems_are_listed_and_the_dropped_mask_is_not_counted(corpus_run) -> None:  # type: ignore[no-untyped-def]
    warnings = {row["id"]: row["reason"] for row in corpus_run.results["manifest"]["warnings"]}
    assert warnings["s00"].startswith("mask unreadable (unreadable: cannot identify image file")
    assert warnings["s01"] == "mask is 8 x 8 but the image is 16 x 16; both are resized to the model input (nearest neighbour for the mask)"
    assert corpus_run.results["manifest"]["with_mask"] == 23  # 24 masked rows, one mask unreadable
    import pandas as pd

    rows = pd.read_parquet(corpus_run.out / "samples" / "predictions.parquet").set_index("id")
    if "has_mask" in rows:
        assert not rows.loc["s00", "has_mask"] and rows.loc["s01", "has_mask"]


def test_input_geometry_is_inferred_from_the_most_common_size_and_said(corpus_run) -> None:  # type: ignore[no-untyped-def]
    inferred = corpus_run.results["preprocessing"]["inferred"]
    assert corpus_run.results["preprocessing"]["input_size"] == [SIZE, SIZE]  # not the odd first image's 20 x 24
    assert inferred["size"] == [SIZE, SIZE] and inferred["from_samples"] == 25
    assert inferred["other_sizes"] == 1 and inferred["other_size_samples"] == [{"id": "odd", "size": [20, 24]}]
    html = (corpus_run.out / "report.html").read_text()
    assert "input size 16 x 16 inferred from the most common among the first 25 readable samples" in html
    assert '<td class="mono">odd</td><td>20 x 24</td>' in html


def test_hostile_class_names_render_literally_in_html_and_pdf(corpus_run) -> None:  # type: ignore[no-untyped-def]
    import pypdfium2 as pdfium

    html = (corpus_run.out / "report.html").read_text()
    assert "red $x^2$" in html and "&lt;b&gt;green&lt;/b&gt; &amp; co" in html and "<b>green</b>" not in html
    document = pdfium.PdfDocument(corpus_run.out / "report.pdf")
    text = "".join(page.get_textpage().get_text_range() for page in document)
    flat = " ".join(text.split())
    assert "red $x^2$" in flat and "<b>green</b> & co" in flat and "blue {n:>9} \\frac{1}{2}" in flat


def test_every_figure_draws_hostile_labels_as_typed() -> None:
    from audit.report import figures

    labels = [*HOSTILE_CLASSES, "$\\alpha$", "100% $", "_{x}"]
    k = len(labels)
    assert "<svg" in figures.bars(labels, [0.5] * k, [0.4] * k, [0.6] * k, xlabel="$x$", limit=0.5, limit_label="$lim$")
    assert "<svg" in figures.reliability({label: [{"confidence": 0.5, "accuracy": 0.4, "count": 3}] for label in labels})
    assert "<svg" in figures.histogram([0, 0.5, 1], {label: [1, 2] for label in labels}, xlabel="$p$")
    assert "<svg" in figures.matrix(np.eye(k).tolist(), labels, labels)
    strip = figures.sample_strip([{"image": np.zeros((8, 8), np.uint8), "caption": label} for label in labels])
    assert strip.data.startswith(b"\x89PNG") and strip.mime == "image/png" and strip.width_mm > 0


def test_render_of_a_saved_run_with_hostile_names_succeeds(corpus_run, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    copy = tmp_path / "copy"
    shutil.copytree(corpus_run.out, copy)
    code, out, err = run_cli(["render", str(copy), "--format", "html"], capsys)
    assert code == 0 and "html:" in out, err


def test_a_report_that_cannot_render_exits_4_and_keeps_the_results(torch_run, tmp_path: Path, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    copy = tmp_path / "copy"
    shutil.copytree(torch_run.out, copy)
    import audit.report.html

    def broken(view):  # type: ignore[no-untyped-def]
        raise RuntimeError("font cache is gone")

    monkeypatch.setattr(audit.report.html, "render_html", broken)
    code, _, err = run_cli(["render", str(copy)], capsys)
    # the stage lines come first; the error is the one line that ends the run
    assert code == 4 and err.endswith("\nmodel-audit: error: the reports could not be rendered (RuntimeError: font cache is gone)\n")
    assert json.loads((copy / "results.json").read_text()) == torch_run.results
