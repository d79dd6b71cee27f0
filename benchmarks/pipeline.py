"""The shared forward pass: audit wall time against the bare model forward + decoding it cannot avoid.

Efficiency = (decode + forward at the same batch size, measured directly) / (the audit's run time
without rendering). 1.0 means the pipeline adds nothing; the rest is manifest handling, taps,
probe maps and reduces, rules and the run store.
"""

from __future__ import annotations

import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def make_data(root: Path, n: int, size: int) -> Path:
    rng = np.random.default_rng(0)
    rows = ["path,label,domain"]
    for i in range(n):
        Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(root / f"{i}.png")
        rows.append(f"{i}.png,{i % 10},{'sim' if i % 2 else 'data'}")
    (root / "m.csv").write_text("\n".join(rows) + "\n")
    return root / "m.csv"


def make_model(root: Path, size: int) -> Path:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(64, 10),
    ).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 3, size, size),), str(root / "m.onnx"), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    return root / "m.onnx"


def main(n: int = 2000, size: int = 64, batch: int = 64) -> None:
    from audit.api import run_audit
    from audit.config import build_config
    from audit.data import Preprocessing, load_sample
    from audit.manifest import load_manifest
    from audit.models import InputSpec, load_model

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        manifest_path = make_data(root, n, size)
        model_path = make_model(root, size)
        adapter = load_model(model_path, InputSpec(), "cpu")
        prep = Preprocessing.create((size, size), 3, None, None)
        manifest = load_manifest(manifest_path)

        start = time.perf_counter()
        for i in range(0, n, batch):
            x = prep.normalise(np.stack([load_sample(s, prep) for s in manifest.samples[i : i + batch]]))
            adapter.forward(x)
        ideal = time.perf_counter() - start

        config = build_config({}, {"model": str(model_path), "manifest": str(manifest_path), "out": root / "run",
                                   "profile": "standard", "quiet": True, "batch_size": batch, "sample_images": False})
        from audit import api

        original = api.render
        api.render = lambda *a, **k: {}  # time the computation only
        try:
            start = time.perf_counter()
            outcome = run_audit(config)
            actual = time.perf_counter() - start
        finally:
            api.render = original
        run = outcome.results["run"]
        setup = run["model_load_seconds"]
        probes = sum(p["seconds"] for p in outcome.results["probes"].values())
        print(f"samples {n}, {size}x{size}, batch {batch}")
        print(f"decode + forward, bare:         {ideal:6.2f} s")
        print(f"audit without rendering:        {actual:6.2f} s  (model load and conversion {setup:.2f} s, "
              f"forward {run['forward_seconds']:.2f} s, probes {probes:.2f} s)")
        print(f"efficiency of the pass (bare / (audit - model load)): {ideal / (actual - setup):.2f}")
        print(f"efficiency overall (bare / audit):                    {ideal / actual:.2f}")
