"""The preprocessing probe and the preprocessing-mismatch rule: an audit run with the wrong
normalisation says so, naming the flags that select the right one (issue 10).

Tiny models whose right answer is known: the demo CNN (trained on [-1, 1]), a linear model on the
mean colour of 8 x 8 images trained with ImageNet's statistics (it tells dark, mid and bright apart,
which only the normalisation it was trained with keeps apart), and logistic regression on
scikit-learn's digits trained with MNIST's 0.1307 / 0.3081, which scores as well at [0, 1].
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from audit.api import RunOutcome, run_audit
from audit.config import build_config
from audit.probes.preprocessing import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Convention,
    conventions,
    flags_text,
    paired_accuracy,
)

RULE = "preprocessing-mismatch"
PROBES = ["predictions", "preprocessing"]
IMAGENET_FLAGS = "--mean 0.485 0.456 0.406 --std 0.229 0.224 0.225"
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def findings(outcome: RunOutcome, status: str | None = None) -> list[dict[str, Any]]:
    return [f for f in outcome.results["findings"] if f["rule"] == RULE and (status is None or f["status"] == status)]


def by_title(outcome: RunOutcome) -> dict[str, dict[str, Any]]:
    return {c["title"]: c for c in outcome.results["probes"]["preprocessing"]["details"]["conventions"]}


# --- the convention list and the interval -------------------------------------------------------


def test_the_given_convention_is_listed_once_and_marked() -> None:
    listed = conventions([0.5] * 3, [0.5] * 3, 3)
    assert [c.title for c in listed] == ["[0, 1]", "[-1, 1]", "ImageNet", "0-255", "BGR"]
    assert [c.title for c in listed if c.is_given] == ["[-1, 1]"]
    assert listed[1].name == "[-1, 1] (--mean 0.5 --std 0.5)"
    assert listed[2].flags == IMAGENET_FLAGS and listed[3].flags == "--mean 0 --std 0.00392157"
    assert listed[4].flags == "channels reversed, then --mean 0.5 --std 0.5"
    stated_imagenet = conventions([0.485, 0.456, 0.406], [0.229, 0.224, 0.225], 3)
    assert [c.title for c in stated_imagenet if c.is_given] == ["ImageNet"] and len(stated_imagenet) == 5


def test_one_channel_has_no_imagenet_and_no_bgr_and_an_uncommon_one_is_added() -> None:
    assert [c.title for c in conventions([0.0], [1.0], 1)] == ["[0, 1]", "[-1, 1]", "0-255"]
    listed = conventions([MNIST_MEAN], [MNIST_STD], 1)
    assert [(c.title, c.is_given) for c in listed] == [("as given", True), ("[0, 1]", False), ("[-1, 1]", False), ("0-255", False)]
    assert listed[0].flags == "--mean 0.1307 --std 0.3081"
    assert [c.title for c in conventions([0.5] * 4, [0.5] * 4, 4)] == ["[0, 1]", "[-1, 1]", "0-255"]  # RGBA: no ImageNet, no swap


def test_a_convention_normalises_the_pixels_it_names() -> None:
    raw = np.stack([np.full((2, 2), v, np.float32) for v in (0.2, 0.4, 0.6)])[None]
    imagenet = next(c for c in conventions([0.0], [1.0], 3) if c.title == "ImageNet")
    assert np.allclose(imagenet.normalise(raw)[0, :, 0, 0], (np.array([0.2, 0.4, 0.6]) - IMAGENET_MEAN) / IMAGENET_STD, atol=1e-6)
    bgr = Convention("BGR", "", (0.5,) * 3, (0.5,) * 3, reverse_channels=True)
    assert np.allclose(bgr.normalise(raw)[0, :, 0, 0], [0.2, -0.2, -0.6])
    assert flags_text((0.0, 0.0), (1.0, 1.0)) == "--mean 0 --std 1"


def test_the_gain_interval_is_paired() -> None:
    """100 samples; B is right wherever A is and on 10 more. Every resample's gain is the share of
    those 10 in it, never negative, so the paired interval sits around 0.10 and above 0, while
    each accuracy's own interval is some 18 points wide. An identical column gains exactly 0."""
    n = 100
    a = np.arange(n) < 50
    b = np.arange(n) < 60
    result = paired_accuracy(np.stack([a, b, a], axis=1), 0, 2000, 0, 0.95)
    assert result["accuracy"].tolist() == [0.5, 0.6, 0.5]
    assert result["gain"][1] == pytest.approx(0.1) and result["gain"][2] == 0
    lo, hi = result["gain_interval"][1]
    assert 0.03 <= lo <= 0.06 and 0.14 <= hi <= 0.17  # normal approximation: 0.10 +- 1.96 * sqrt(0.1 * 0.9 / 100)
    assert result["gain_interval"][2].tolist() == [0.0, 0.0]
    acc_lo, acc_hi = result["accuracy_interval"][0]
    assert acc_hi - acc_lo > 0.15
    assert result["best"] == 1 and result["tied"].tolist() == [False, True, False]
    assert paired_accuracy(np.stack([b, a], axis=1), 0, 2000, 0, 0.95)["best"] == 0
    assert paired_accuracy(np.stack([a, a | (np.arange(n) == 99)], axis=1), 0, 2000, 0, 0.95)["best"] == 0  # one more right: not clear
    assert np.isnan(paired_accuracy(np.zeros((1, 2), bool), 0, 100, 0, 0.95)["gain_interval"]).all()  # one sample: no interval


# --- tiny models -------------------------------------------------------------------------------


def _export(model, path: Path, shape: tuple[int, ...]) -> Path:  # type: ignore[no-untyped-def]
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.zeros(1, *shape),), str(path), dynamo=False, opset_version=17,
                          input_names=["image"], output_names=["logits"], dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
    return path


def _train(x: np.ndarray, y: np.ndarray, model, steps: int = 300):  # type: ignore[no-untyped-def]
    import torch

    torch.manual_seed(0)
    optimiser = torch.optim.Adam(model.parameters(), lr=0.05)
    inputs, targets = torch.from_numpy(x), torch.from_numpy(y).long()
    for _ in range(steps):
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(model(inputs), targets).backward()
        optimiser.step()
    return model.eval()


def _write(root: Path, images: np.ndarray, labels: list[str] | None, mode: str) -> Path:
    """uint8 images (N x H x W [x 3]) as PNGs and a manifest (without a label column when `labels` is None)."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, image in enumerate(images):
        Image.fromarray(image, mode).save(root / "img" / f"{i:04d}.png")
        rows.append({"id": f"s{i:04d}", "path": f"img/{i:04d}.png", **({"label": labels[i]} if labels is not None else {})})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root / "manifest.csv"


BRIGHTNESS = ["dark", "mid", "bright"]


@pytest.fixture(scope="module")
def imagenet_model(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Grey-ish 8 x 8 images at three brightness levels; a linear model on their mean colour,
    trained on ImageNet-normalised inputs (100% right under them, about a third at [0, 1])."""
    from torch import nn

    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    n = 240
    labels = np.arange(n) % 3
    level = np.array([0.15, 0.5, 0.85])[labels] + rng.uniform(-0.1, 0.1, n)
    pixels = level[:, None, None, None] + rng.normal(0, 0.05, (n, 8, 8, 3)) + rng.uniform(-0.05, 0.05, (n, 1, 1, 3))
    images = np.round(np.clip(pixels, 0, 1) * 255).astype(np.uint8)
    x = (images.transpose(0, 3, 1, 2) / 255.0 - np.reshape(IMAGENET_MEAN, (1, 3, 1, 1))) / np.reshape(IMAGENET_STD, (1, 3, 1, 1))
    model = _train(x.astype(np.float32), labels, nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 3)))
    manifest = _write(root, images, [BRIGHTNESS[i] for i in labels], "RGB")
    unlabelled = _write(root / "unlabelled", images[:60], None, "RGB")
    return {"model": _export(model, root / "brightness.onnx", (3, 8, 8)), "manifest": manifest, "unlabelled": unlabelled,
            "classes": BRIGHTNESS}


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Logistic regression on scikit-learn's 8 x 8 digits scaled to [0, 1], trained with MNIST's
    normalisation on 1400 of them; the other 397 are the audit set."""
    from sklearn.datasets import load_digits
    from torch import nn

    root = tmp_path_factory.mktemp("digits")
    digits = load_digits()
    images = np.round(digits.images / 16.0 * 255).astype(np.uint8)
    x = ((images / 255.0 - MNIST_MEAN) / MNIST_STD).astype(np.float32)[:, None]
    model = _train(x[:1400], digits.target[:1400], nn.Sequential(nn.Flatten(), nn.Linear(64, 10)))
    classes = [str(d) for d in range(10)]
    manifest = _write(root, images[1400:], [classes[t] for t in digits.target[1400:]], "L")
    return {"model": _export(model, root / "digits.onnx", (1, 8, 8)), "manifest": manifest, "classes": classes}


def audit(setup: dict[str, Any], out: Path, manifest: Path | None = None, **options: Any) -> RunOutcome:
    values = {"model": setup["model"], "manifest": manifest or setup["manifest"], "classes": setup["classes"], "probes": PROBES,
              "profile": "smoke", "out": out, "quiet": True, **options}
    return run_audit(build_config({}, values, source="test"))


@pytest.fixture(scope="module")
def imagenet_runs(imagenet_model: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, RunOutcome]:
    root = tmp_path_factory.mktemp("imagenet-runs")
    return {"assumed": audit(imagenet_model, root / "assumed"),
            "given": audit(imagenet_model, root / "given", mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))}


# --- the demo ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_runs(demo_audit) -> dict[str, RunOutcome]:  # type: ignore[no-untyped-def]
    return {"assumed": demo_audit(PROBES, mean=None, std=None), "given": demo_audit(PROBES)}


def test_the_demo_audited_without_its_normalisation_fails_naming_mean_and_std_05(demo_runs: dict[str, RunOutcome]) -> None:
    run = demo_runs["assumed"]
    assert run.results["preprocessing"]["stated"] is False
    failed = {f["scope"]: f for f in findings(run, "fail")}
    right = failed["convention:[-1, 1] (--mean 0.5 --std 0.5)"]  # ImageNet's statistics, close to 0.5 / 0.25, may fail too
    assert right["severity"] == "high" and "convention:[0, 1] (--mean 0 --std 1)" not in failed
    assert right["message"].startswith("convention [-1, 1] (--mean 0.5 --std 0.5) scores ")
    conventions_ = by_title(run)
    details = run.results["probes"]["preprocessing"]["details"]
    assert conventions_["[0, 1]"]["is_given"] and "[-1, 1] (--mean 0.5 --std 0.5)" in [details["best"], *details["tied"]]
    assert conventions_["[-1, 1]"]["gain_lo"] > 0.10


def test_the_demo_audited_with_its_normalisation_passes(demo_runs: dict[str, RunOutcome]) -> None:
    run = demo_runs["given"]
    assert run.results["preprocessing"]["stated"] is True
    assert findings(run) and all(f["status"] == "pass" for f in findings(run))
    assert by_title(run)["[-1, 1]"]["is_given"]
    assert run.results["probes"]["preprocessing"]["details"]["best"] == "[-1, 1] (--mean 0.5 --std 0.5)"  # ImageNet's is no clearer


def test_the_given_convention_is_the_shared_pass_itself(demo_runs: dict[str, RunOutcome]) -> None:
    """The detail stage's variant equal to the given preprocessing predicts what the shared pass did."""
    run = demo_runs["given"]
    table = pd.read_parquet(run.out / run.results["probes"]["preprocessing"]["tables"]["preprocessing"])
    given = table[table["convention"] == "[-1, 1] (--mean 0.5 --std 0.5)"]
    shared = pd.read_parquet(run.out / run.results["probes"]["predictions"]["tables"]["predictions"]).set_index("id")
    assert len(given) == 256 and given["class"].value_counts().min() >= 80  # stratified: 3 classes share 256
    assert (given["pred"].to_numpy() == shared.loc[given["id"], "pred"].to_numpy()).all()
    assert np.allclose(given["confidence"], shared.loc[given["id"], "confidence"], atol=1e-5)


def test_the_report_states_the_preprocessing_and_the_conventions(demo_runs: dict[str, RunOutcome]) -> None:
    html = demo_runs["assumed"].reports["html"].read_text(encoding="utf-8")
    section = html[html.index('id="probe-preprocessing"'):]
    section = section[: section.index("</section>")]
    assert "assumed" in section and "--mean 0.5 --std 0.5" in section and "best" in section
    assert section.count("<tr>") == 1 + 5  # header and five conventions


# --- ImageNet and MNIST normalisations ---------------------------------------------------------


def test_an_imagenet_model_audited_at_0_1_fails_naming_the_imagenet_flags(imagenet_runs: dict[str, RunOutcome]) -> None:
    run = imagenet_runs["assumed"]
    failed = {f["scope"]: f for f in findings(run, "fail")}
    imagenet = f"convention:ImageNet ({IMAGENET_FLAGS})"
    assert imagenet in failed and IMAGENET_FLAGS in failed[imagenet]["message"]
    details = run.results["probes"]["preprocessing"]["details"]
    assert details["best"] == f"ImageNet ({IMAGENET_FLAGS})" and by_title(run)["ImageNet"]["accuracy"] == 1.0
    assert by_title(run)["[0, 1]"]["accuracy"] < 0.5


def test_an_imagenet_model_audited_with_imagenet_statistics_passes(imagenet_runs: dict[str, RunOutcome]) -> None:
    run = imagenet_runs["given"]
    assert findings(run) and all(f["status"] == "pass" for f in findings(run))
    assert by_title(run)["ImageNet"]["is_given"]


def test_an_mnist_normalised_model_audited_at_0_1_stays_quiet(digits_model: dict[str, Any], tmp_path: Path) -> None:
    run = audit(digits_model, tmp_path / "run")
    assert [c["title"] for c in run.results["probes"]["preprocessing"]["details"]["conventions"]] == ["[0, 1]", "[-1, 1]", "0-255"]
    assert findings(run) and all(f["status"] == "pass" for f in findings(run))
    assert run.results["metrics"]["preprocessing.given_accuracy"] > 0.85  # nearly what MNIST's own normalisation gives (0.90)


def test_without_labels_nothing_is_judged(imagenet_model: dict[str, Any], tmp_path: Path) -> None:
    run = audit(imagenet_model, tmp_path / "run", manifest=imagenet_model["unlabelled"])
    assert [f["status"] for f in findings(run)] == ["skipped"]
    details = run.results["probes"]["preprocessing"]["details"]
    assert details["labelled"] is False and details["best"] is None and details["samples"] == 60
    assert all(c["accuracy"] is None and c["confidence"] is not None for c in details["conventions"])
    assert "no sampled input has a label" in " ".join(run.results["probes"]["preprocessing"]["notes"]).lower()


def test_the_demo_runs_from_the_audit_yaml_it_writes(demo_run) -> None:  # type: ignore[no-untyped-def]
    from audit.config import read_config_file

    inputs, outcome = demo_run
    values = read_config_file(inputs / "audit.yaml")
    assert values["mean"] == [0.5] * 3 and values["std"] == [0.5] * 3
    assert Path(values["model"]) == inputs / "model" / "demo.onnx" and Path(values["out"]) == outcome.out
    assert outcome.results["config"]["mean"] == [0.5] * 3 and outcome.results["preprocessing"]["stated"] is True
    assert findings(outcome) and all(f["status"] == "pass" for f in findings(outcome))
