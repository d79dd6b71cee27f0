"""Report size at scale: the HTML of a 20-class, 20k-sample audit where most classes fail the background rules.

Near the worst case for the report's images: a model trained where the background's hue names the
class, so many classes fail background swaps and object removal (each such finding draws its evidence
in the failed state), recall fails per class and domain, and every gallery is full. Smoke profile,
with the background swaps on 30 samples per class so that every class is judged. Prints the HTML and
PDF sizes against the 10 MB budget, and the share taken by raster images.
"""

from __future__ import annotations

import re
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

CLASSES = 20
SAMPLES = 20_000
SIZE = 32
BUDGET_MB = 10.0


def scene(rng: np.random.Generator, label: int, gain: float) -> tuple[np.ndarray, np.ndarray]:
    """A disc of random colour (the object, uninformative) on a background whose hue names the class."""
    hue = np.array([np.cos(2 * np.pi * label / CLASSES), np.sin(2 * np.pi * label / CLASSES), np.cos(4 * np.pi * label / CLASSES)])
    background = 0.5 + 0.35 * hue + rng.normal(0, 0.05, (SIZE, SIZE, 3))
    yy, xx = np.mgrid[:SIZE, :SIZE]
    cy, cx, r = rng.uniform(10, 22), rng.uniform(10, 22), rng.uniform(5, 9)
    mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
    image = np.where(mask[..., None], rng.uniform(0, 1, 3), background) * gain
    return (np.clip(image, 0, 1) * 255).astype(np.uint8), mask


def make_data(root: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    (root / "img").mkdir()
    (root / "mask").mkdir()
    rows = ["path,label,mask,domain"]
    images, labels = [], []
    for i in range(SAMPLES):
        label, domain = i % CLASSES, ("sim" if i % 2 else "data")
        image, mask = scene(rng, label, 1.0 if domain == "sim" else 0.8)
        Image.fromarray(image).save(root / "img" / f"{i}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / "mask" / f"{i}.png")
        rows.append(f"img/{i}.png,c{label:02d},mask/{i}.png,{domain}")
        if domain == "sim":
            images.append(image)
            labels.append(label)
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    (root / "classes.txt").write_text("\n".join(f"c{k:02d}" for k in range(CLASSES)) + "\n")
    return root / "manifest.csv", np.stack(images), np.array(labels)


def train_model(root: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(32, CLASSES),
    )
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    y = torch.from_numpy(labels)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(3):
        for batch in torch.randperm(len(x)).split(128):
            optimiser.zero_grad()
            torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimiser.step()
    model.eval()
    torch.onnx.export(model, (torch.zeros(1, 3, SIZE, SIZE),), str(root / "m.onnx"), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    return root / "m.onnx"


def main() -> None:
    from audit.api import run_audit
    from audit.config import build_config

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        clock = time.perf_counter()
        manifest, images, labels = make_data(root)
        model = train_model(root, images, labels)
        print(f"data and model: {time.perf_counter() - clock:.0f} s")
        clock = time.perf_counter()
        outcome = run_audit(build_config({}, {"model": str(model), "manifest": str(manifest), "classes": [f"c{k:02d}" for k in range(CLASSES)],
                                              "profile": "smoke", "out": root / "run", "quiet": True, "fail_on": "never",
                                              "probe_params": {"background": {"per_class": 30, "max_samples": 800}}}))
        findings = outcome.results["findings"]
        failing = sum(f["status"] in ("fail", "warn", "error") for f in findings)
        html = (outcome.out / "report.html").read_bytes()
        raster = sum(len(m) for m in re.findall(rb"data:image/(?:png|jpeg);base64,[A-Za-z0-9+/=]+", html))
        print(f"audit and render: {time.perf_counter() - clock:.0f} s; {failing} of {len(findings)} findings not passing; "
              f"accuracy {outcome.results['metrics'].get('predictions.accuracy', float('nan')):.1%}")
        by_rule: dict[str, dict[str, int]] = {}
        for f in findings:
            by_rule.setdefault(f["rule"], {}).setdefault(f["status"], 0)
            by_rule[f["rule"]][f["status"]] += 1
        print("  " + "; ".join(f"{rule}: {counts}" for rule, counts in sorted(by_rule.items())))
        print(f"report.html {len(html) / 1e6:.2f} MB ({len(html) / 1e6 / BUDGET_MB:.2f} of the {BUDGET_MB:.0f} MB budget; "
              f"raster images {raster / max(len(html), 1):.0%}); report.pdf {(outcome.out / 'report.pdf').stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
