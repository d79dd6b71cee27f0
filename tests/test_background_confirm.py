"""background-reliance fails only when a counterfactual confirms it, on handwritten digits with stroke masks.

Where the evidence falls is a proxy: for a digit the empty space between strokes is evidence, and a
stroke mask leaves it outside the object, so a clean model can lean "on the background" by that
measure. A planted corner tag on one class is a real shortcut: the background swaps and the removed
object show the model answering from it. Two small CNNs, one trained clean and one with the tag,
audited through the public API on the smoke profile with only the probes the rules need.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

SIZE, SCALE, PAD = 32, 3, 4  # 8x8 digits upsampled to 24x24 and centred: the corners stay empty
TAG = 3  # the digit that carries the corner tag in the shortcut model's data
TAG_PIXELS = (slice(0, 4), slice(0, 4))  # a bright square in the top-left corner, outside every stroke mask
STROKE = 4  # of 16: a pixel above this is on a stroke (the mask)

MODEL_SOURCE = textwrap.dedent(
    '''
    from torch import nn


    def build():
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(16 * 8 * 8, 10))
    '''
)


def digit_images(tagged: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images in [0, 1], samples x 32 x 32; stroke masks; labels), the tag on every TAG when `tagged`."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = digits.images / 16.0
    big = np.kron(small, np.ones((SCALE, SCALE)))
    images = np.zeros((len(big), SIZE, SIZE))
    images[:, PAD:PAD + 8 * SCALE, PAD:PAD + 8 * SCALE] = big
    masks = images > STROKE / 16.0
    if tagged:
        images[(digits.target == TAG)[:, None, None] & _tag_mask()[None]] = 1.0
    return images, masks, digits.target


def _tag_mask() -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), bool)
    mask[TAG_PIXELS] = True
    return mask


def train(images: np.ndarray, labels: np.ndarray, path: Path) -> None:
    """A few epochs of Adam on the first 1200 digits (the audit uses the rest), seeded."""
    import torch

    from tests.conftest import load_user_model

    torch.manual_seed(0)
    model = load_user_model(path.parent / "digits_model.py").build()
    x = torch.from_numpy(np.repeat(images[:1200, None], 3, axis=1)).float()
    y = torch.from_numpy(labels[:1200]).long()
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(8):
        for batch in torch.randperm(len(x), generator=generator).split(64):
            optimiser.zero_grad()
            torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimiser.step()
    torch.save(model.state_dict(), path)


def write_manifest(root: Path, images: np.ndarray, masks: np.ndarray, labels: np.ndarray) -> Path:
    rows = ["id,path,label,mask"]
    (root / "img").mkdir(parents=True)
    for i in range(1200, len(images)):
        pixels = np.repeat((images[i] * 255).round().astype(np.uint8)[..., None], 3, axis=2)
        Image.fromarray(pixels).save(root / "img" / f"{i}.png")
        Image.fromarray(masks[i].astype(np.uint8) * 255).save(root / "img" / f"{i}-mask.png")
        rows.append(f"d{i},img/{i}.png,{labels[i]},img/{i}-mask.png")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root / "manifest.csv"


def audit(root: Path, tagged: bool) -> dict[str, Any]:
    from audit.api import run_audit
    from audit.config import build_config

    root.mkdir()
    (root / "digits_model.py").write_text(MODEL_SOURCE)
    images, masks, labels = digit_images(tagged)
    train(images, labels, root / "weights.pt")
    values = {"model": f"{root / 'digits_model.py'}:build", "weights": str(root / "weights.pt"),
              "manifest": str(write_manifest(root, images, masks, labels)), "classes": [str(d) for d in range(10)],
              "mean": [0.0] * 3, "std": [1.0] * 3, "probes": ["predictions", "background"], "profile": "smoke",
              "probe_params": {"background": {"per_class": 40, "max_samples": 400}},
              "out": root / "run", "quiet": True, "fail_on": "never", "sample_images": False}
    return run_audit(build_config({}, values)).results


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    base = tmp_path_factory.mktemp("digits")
    return {"clean": audit(base / "clean", tagged=False), "tagged": audit(base / "tagged", tagged=True)}


def _reliance(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f["scope"]: f for f in results["findings"] if f["rule"] == "background-reliance"}


def _metric(results: dict[str, Any], name: str, cls: int, suffix: str = "") -> float:
    return results["metrics"][f"{name}@class:{cls}" + (f":{suffix}" if suffix else "")]


def test_a_clean_model_never_fails_background_reliance(runs: dict[str, dict[str, Any]]) -> None:
    clean = runs["clean"]
    findings = _reliance(clean)
    assert findings and not [s for s, f in findings.items() if f["status"] == "fail"]
    for scope, finding in findings.items():
        if finding["status"] == "warn" and finding["value"] > 1.2:  # crossed the fail limit; no counterfactual backs it
            assert "fail only if a counterfactual confirms it, and none does" in finding["message"]
    for cls in range(10):
        assert _metric(clean, "background.bg_gap", cls, "lo") <= _metric(clean, "background.bg_gap", cls) \
            <= _metric(clean, "background.bg_gap", cls, "hi")


def test_a_planted_corner_tag_fails_its_class_through_a_confirmed_counterfactual(runs: dict[str, dict[str, Any]]) -> None:
    tagged = runs["tagged"]
    findings = _reliance(tagged)
    tag = findings[f"class:{TAG}"]
    assert tag["status"] == "fail" and tag["threshold"] == 0.8
    assert "fail confirmed by background." in tag["message"]
    assert _metric(tagged, "background.bg_gap", TAG, "lo") > 0.10 or _metric(tagged, "background.only_bg_excess", TAG, "lo") > 0.10
    others = [s for s, f in findings.items() if f["status"] == "fail" and s != f"class:{TAG}"]
    assert not others
