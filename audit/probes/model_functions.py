"""The audited model as functions the explanation probes call, and helpers they share.

`probabilities_function` runs the real model (onnxruntime for ONNX files, never the conversion),
so perturbation methods, deletion curves and counterfactuals measure the model that ships.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from audit.data import MAX_IMAGE_PIXELS, load_mask
from audit.errors import SampleError
from audit.metrics.declarations import ColumnSpec

if TYPE_CHECKING:
    from audit.execution.costs import PassCosts
    from audit.manifest import Sample
    from audit.probes.base import DetailBatch, RunContext

SAMPLE_COLUMNS = (ColumnSpec("class", "text", "true class, else the prediction"),  # what sample_rows groups by
                  ColumnSpec("domain", "text", "the sample's domain"))
DELETION_COLUMNS = (ColumnSpec("deletion_auc", "number", "area under the deletion curve of the sample's map"),
                    ColumnSpec("random_deletion_auc", "number", "area under the random-order deletion curve"))
MAP_SIDE = 64  # maps handed between probes and kept for galleries are at most this many pixels a side
DELETION_BATCH = 256  # most images built per step of a deletion curve; the runtime still gets them in run-sized calls
DELETION_BYTES = 64 * 2**20  # ... and at most this much memory per copy of them (a curve holds about five)


def deletion_batch(context: RunContext) -> int:
    """Images a deletion curve builds per step: DELETION_BATCH on small inputs (256 at 48 px), fewer
    on large ones, where each copy of them would otherwise take 150 MB at 224 px; never fewer than
    one model call's worth."""
    h, w = context.prep.input_size
    per_image = 4 * context.prep.channels * h * w
    return int(max(context.batch_size, min(DELETION_BATCH, DELETION_BYTES // per_image)))


def sample_rows(batch, taps, classes: Sequence[str]) -> pd.DataFrame:  # type: ignore[no-untyped-def]
    """What the explanation probes record in the shared pass: the class a sample is grouped under
    (true class, else prediction), that reference, the prediction, whether it has a mask, its domain."""
    labels = batch.labels
    pred = taps.probabilities.argmax(axis=1).astype(np.int64)
    reference = np.where(labels >= 0, labels, pred)
    return pd.DataFrame({"id": batch.ids, "class": np.asarray(classes, dtype=object)[reference], "reference": reference,
                         "pred": pred, "has_mask": [s.mask is not None for s in batch.samples],
                         "domain": [s.domain for s in batch.samples]})


RUNTIME_EXAMPLE = 4  # images the onnxruntime form of a torch model is checked on against torch


def forward_runtime(context: RunContext) -> Callable[[np.ndarray], np.ndarray] | None:
    """The onnxruntime form of a torch model, for forward-only checks, when it exports cleanly and
    agrees with torch (about half torch's time per image on 2 CPU cores); None: the adapter's own
    forward is the one (ONNX files already run in onnxruntime). Built once per model, checked on
    seeded normal inputs in the model's normalised input space."""
    h, w = context.prep.input_size
    example = np.random.default_rng(context.seed).standard_normal((RUNTIME_EXAMPLE, context.prep.channels, h, w)).astype(np.float32)
    runtime, _ = context.model.forward_runtime(example)
    return None if runtime is None else runtime.forward


def runs_onnxruntime(context: RunContext) -> bool:
    """Whether forward-only checks run in onnxruntime (which then needs the cores: see torch_threads)."""
    return context.model.format == "onnx" or forward_runtime(context) is not None


def probabilities_function(context: RunContext) -> Callable[[torch.Tensor], torch.Tensor]:
    """Normalised NCHW tensor -> class probabilities (N, K), through the model that ships: the ONNX
    file in onnxruntime, a torch model in onnxruntime where it exports cleanly (`forward_runtime`),
    else the adapter's torch forward.

    Any number of images may come in; the runtime gets them `--batch-size` at a time, where its cost
    per image is lowest (larger calls fall out of the CPU caches: 256 images cost 30% more each than
    64 on the demo model in onnxruntime)."""
    interpretation = context.interpretation
    chunk = max(1, context.batch_size)
    fast = forward_runtime(context)
    run = fast if fast is not None else (lambda a: context.model.forward(a)["output"])

    def forward(x: torch.Tensor) -> torch.Tensor:
        array = x.detach().cpu().numpy().astype(np.float32, copy=False)
        probs = [interpretation.probabilities(run(array[i : i + chunk])) for i in range(0, len(array), chunk)]
        return torch.from_numpy(np.concatenate(probs) if probs else np.zeros((0, interpretation.num_classes))).float().to(x.device)

    return forward


def pass_timers(context: RunContext, gradient: bool) -> PassCosts:
    """What a forward-only check's pass (`probabilities_function`: onnxruntime where the model runs
    there) and a forward+backward pass through the torch module cost per image on this model, measured
    at the batch size the detail stages use most (their multi-pass methods fill it)."""
    from audit.execution.costs import measure_pass_costs

    probs = probabilities_function(context)
    module = context.model.torch_module() if gradient else None
    device = context.model.device

    def backward(array: np.ndarray) -> None:
        x = torch.from_numpy(array).to(device).requires_grad_(True)
        scores = context.interpretation.torch_scores(module(x))  # type: ignore[misc]
        scores.max(dim=1).values.sum().backward()

    h, w = context.prep.input_size
    return measure_pass_costs(lambda a: probs(torch.from_numpy(a)), backward if module is not None else None,
                              (context.prep.channels, h, w), context.seed)


def scores_function(context: RunContext, module: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """Differentiable per-class scores (logits where the model has them) for gradient methods."""
    interpretation = context.interpretation
    return lambda x: interpretation.torch_scores(module(x))


def normalisation(context: RunContext) -> tuple[Sequence[float], Sequence[float]]:
    return context.prep.mean, context.prep.std


def shrink(maps: np.ndarray, side: int = MAP_SIDE) -> np.ndarray:
    """Area-average (N, H, W) maps down to at most `side` pixels a side (kept as is when smaller)."""
    h, w = maps.shape[1:]
    if max(h, w) <= side:
        return maps.astype(np.float32, copy=False)
    scale = side / max(h, w)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    return F.adaptive_avg_pool2d(torch.from_numpy(np.ascontiguousarray(maps, np.float32))[:, None], size)[:, 0].numpy()


def load_masks(samples: Sequence[Sample], size: tuple[int, int], max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[np.ndarray, np.ndarray]:
    """(N, H, W) boolean masks at the model's input size and whether each could be read (the shared pass
    has already listed, and dropped, the masks that cannot be)."""
    masks = np.zeros((len(samples), *size), dtype=bool)
    ok = np.zeros(len(samples), dtype=bool)
    for i, sample in enumerate(samples):
        if sample.mask is None:
            continue
        try:
            masks[i] = load_mask(sample.mask, size, max_pixels)
            ok[i] = True
        except SampleError:
            continue
    return masks, ok


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run torch single-threaded while onnxruntime does the heavy work: idle torch worker threads
    spin after each operation and take the cores from onnxruntime (measured on 2 cores)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def inputs_tensor(batch: DetailBatch, device: str = "cpu") -> torch.Tensor:
    """A detail batch's normalised inputs as an NCHW tensor on `device`."""
    assert batch.x is not None, "the batch was planned without inputs"
    return torch.from_numpy(batch.x).to(device)
