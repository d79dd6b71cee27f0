"""Shared fixtures: a tiny colour data set, a hand-set model whose answers are known, and the
expensive CLI runs (smoke profile), built once per session and shared by the tests that read them.
"""

from __future__ import annotations

import contextlib
import json
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CLASSES = ["red", "green", "blue"]
SIZE = 16

MODEL_SOURCE = textwrap.dedent(
    '''
    import torch
    from torch import nn


    class ColourNet(nn.Module):
        """Predicts the dominant colour channel: logits = 10 x mean of each channel (weights set by hand)."""

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.relu = nn.ReLU()
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(self.pool(self.relu(self.conv(x))).flatten(1))


    def build():
        return ColourNet()
    '''
)


@dataclass
class Dataset:
    root: Path
    manifest: Path
    classes_file: Path
    model_py: Path
    weights: Path
    onnx: Path
    labels: dict[str, int]


def colour_image(rng: np.random.Generator, label: int, tinted: bool = False) -> np.ndarray:
    """Noise background with a square of the label's colour (the object, see mask.png).

    A tinted background (the next colour at 120 over the whole image) outweighs the square in the
    channel means, so the hand-set model gets exactly those images wrong.
    """
    img = (rng.random((SIZE, SIZE, 3)) * 60).astype(np.uint8)
    if tinted:
        img[..., (label + 1) % 3] = 120
    img[4:12, 4:12, label] = 220
    return img


def write_dataset(root: Path, n: int = 60, seed: int = 0, ambiguous: int = 6) -> dict[str, int]:
    """n images, half `sim`, half `data`; the last `ambiguous` ones (all `data`) are tinted: known mistakes."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "img").mkdir(exist_ok=True)
    rows = ["id,path,label,mask,domain,site"]
    labels = {}
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[4:12, 4:12] = 255
    Image.fromarray(mask).save(root / "mask.png")
    for i in range(n):
        label = i % 3
        Image.fromarray(colour_image(rng, label, tinted=i >= n - ambiguous)).save(root / "img" / f"{i:03d}.png")
        rows.append(f"s{i:03d},img/{i:03d}.png,{CLASSES[label]},mask.png,{'sim' if i < n // 2 else 'data'},site{i % 2}")
        labels[f"s{i:03d}"] = label
    rows.append("missing,img/not-there.png,red,,data,site0")
    (root / "img" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"this is not a png at all")
    rows.append("corrupt,img/corrupt.png,green,,data,site1")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return labels


def set_weights(model) -> None:  # type: ignore[no-untyped-def]
    import torch

    with torch.no_grad():
        model.conv.weight.copy_(torch.eye(3).reshape(3, 3, 1, 1))
        model.conv.bias.zero_()
        model.fc.weight.copy_(torch.eye(3) * 10)
        model.fc.bias.zero_()


def load_user_model(path: Path):  # type: ignore[no-untyped-def]
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"user_model_{abs(hash(str(path)))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def export_onnx(model, path: Path, opset: int = 17, **kwargs) -> None:  # type: ignore[no-untyped-def]
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 3, SIZE, SIZE),), str(path), dynamo=False, opset_version=opset,
                          input_names=kwargs.pop("input_names", ["input"]), output_names=kwargs.pop("output_names", ["logits"]),
                          **kwargs)


@contextlib.contextmanager
def onnx_conversion_forbidden() -> Iterator[list[str]]:
    """onnx2torch disabled: loading an ONNX model records the attempt (in the list it yields), any
    later call fails the test; proves a feature works through onnxruntime alone."""
    import onnx2torch

    from audit.models import onnx_adapter

    attempts: list[str] = []

    def refuse(*_args: object, **_kwargs: object) -> tuple[None, str]:
        attempts.append("convert_to_torch")
        return None, "disabled for the test"

    def forbidden(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("onnx2torch.convert called")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(onnx_adapter, "convert_to_torch", refuse)
        patch.setattr(onnx2torch, "convert", forbidden)
        yield attempts


@pytest.fixture(scope="session")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    import torch

    root = tmp_path_factory.mktemp("colours")
    labels = write_dataset(root)
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    model_py = root / "colour_model.py"
    model_py.write_text(MODEL_SOURCE)
    model = load_user_model(model_py).build()
    set_weights(model)
    torch.save(model.state_dict(), root / "weights.pt")
    export_onnx(model.eval(), root / "colour.onnx", dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return Dataset(root, root / "manifest.csv", root / "classes.txt", model_py, root / "weights.pt", root / "colour.onnx", labels)


@dataclass
class CliRun:
    out: Path
    code: int
    results: dict
    stderr: str
    stdout: str


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str] | None = None) -> tuple[int, str, str]:
    from audit.cli import main

    code = main(args)
    if capsys is None:
        return code, "", ""
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _run(out: Path, model_args: list[str], dataset: Dataset, extra: list[str] | None = None) -> CliRun:
    import contextlib
    import io

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        from audit.cli import main

        code = main(["run", *model_args, "--manifest", str(dataset.manifest), "--classes", str(dataset.classes_file),
                     "--profile", "smoke", "--out", str(out), "--quiet", *(extra or [])])
    results = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
    return CliRun(out, code, results, stderr.getvalue(), stdout.getvalue())


@pytest.fixture(scope="session")
def torch_run(dataset: Dataset, tmp_path_factory: pytest.TempPathFactory) -> CliRun:
    out = tmp_path_factory.mktemp("run-torch")
    return _run(out, ["--model", f"{dataset.model_py}:build", "--weights", str(dataset.weights)], dataset)


@pytest.fixture(scope="session")
def onnx_run(dataset: Dataset, tmp_path_factory: pytest.TempPathFactory) -> CliRun:
    out = tmp_path_factory.mktemp("run-onnx")
    return _run(out, ["--model", str(dataset.onnx)], dataset)


@pytest.fixture(scope="session")
def run_factory(dataset: Dataset, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """Further CLI runs on the same data set, each in its own folder."""

    def make(model_args: list[str], extra: list[str] | None = None, data: Dataset | None = None) -> CliRun:
        return _run(tmp_path_factory.mktemp("run"), model_args, data or dataset, extra)

    return make


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """The real demo (default data, training, ONNX export, audit) once for the session, on the smoke
    profile: its inputs folder (data, model; beside the run folder, not in it) and its outcome."""
    from audit import demo

    out = tmp_path_factory.mktemp("demo") / "demo"
    return demo.demo_inputs(out), demo.run_demo(out, seed=0, profile="smoke", quiet=True)


@pytest.fixture(scope="session")
def demo_audit(demo_run, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """Further smoke audits of the demo's model and data with only the probes a test needs:
    `demo_audit(["predictions", "background"], fail_on="high")` -> RunOutcome."""
    from audit import demo
    from audit.api import run_audit
    from audit.config import build_config

    inputs, _ = demo_run

    def make(probes: list[str], **options):  # type: ignore[no-untyped-def]
        values = {"model": str(inputs / "model" / "demo.onnx"), "manifest": str(inputs / "data" / "manifest.csv"),
                  "classes": list(demo.CLASSES), "mean": list(demo.MEAN), "std": list(demo.STD), "probes": probes,
                  "profile": "smoke", "out": tmp_path_factory.mktemp("demo-audit") / "run", "quiet": True, **options}
        return run_audit(build_config({}, values))

    return make
