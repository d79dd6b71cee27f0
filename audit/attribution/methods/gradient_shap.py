"""GradientSHAP, computed here as captum computes it with `stdevs=0` (same draws in the same order), with the
(sample, input) pairs cut into passes of `internal_batch_size` images whatever the batch."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from audit.attribution.methods.base import (
    AttributionInputs,
    AttributionMethod,
    ChunkFunction,
)
from audit.attribution.methods.common import (
    AttributionParams,
    Forward,
    baseline_for,
    input_gradients,
)
from audit.models.base import Capability


class GradientShap(AttributionMethod):
    name = "gradient_shap"
    title = "GradientSHAP"
    short_title = "GradientSHAP"
    reference = "Lundberg, Lee. A Unified Approach to Interpreting Model Predictions. NeurIPS 2017."
    order = 100
    requires = frozenset({Capability.GRADIENTS})
    stochastic = True
    default = True
    # needs_baseline stays False: its references are drawn from a distribution built once per call from
    # `params.baseline`, not from each chunk's own baseline.

    def passes(self, params: AttributionParams, height: int, width: int) -> tuple[float, float]:
        return float(params.shap_samples), 0.0  # one gradient per reference draw

    def prepare(self, inputs: AttributionInputs) -> ChunkFunction:
        # A fixed reference (black, mean) is a single baseline; with "blur" the blurred copies of the
        # whole batch form the baseline distribution (as SHAP's background set), whatever the chunking.
        params = inputs.params
        reference = baseline_for(inputs.x, params.baseline, inputs.pixel_mean, inputs.normalisation)
        reference = reference if params.baseline == "blur" else reference[:1]
        budget = max(1, params.internal_batch_size)
        return lambda xc, tc, _b: gradient_shap(inputs.forward, xc, tc, reference, params.shap_samples, budget)


def gradient_shap(forward: Forward | nn.Module, x: Tensor, target: Tensor, reference: Tensor, samples: int,
                  budget: int) -> Tensor:
    """Expected gradients (Lundberg and Lee): per input, `samples` baselines drawn from `reference` and points
    drawn uniformly on the segment to each, numpy's draws in captum's order; the mean of (input - baseline) x
    gradient. The pairs go through the model `budget` images at a time."""
    n = x.shape[0]
    drawn = torch.as_tensor(np.random.choice(reference.shape[0], samples * n), device=x.device)
    coefficient = torch.tensor(np.random.uniform(0.0, 1.0, samples * n), dtype=x.dtype, device=x.device)
    rows = torch.arange(n, device=x.device).repeat_interleave(samples)
    total = torch.zeros_like(x)
    for start in range(0, samples * n, budget):
        row, base = rows[start : start + budget], reference[drawn[start : start + budget]]
        c = coefficient[start : start + budget].view(-1, 1, 1, 1)
        points = c * x[row] + (1.0 - c) * base
        total.index_add_(0, row, (x[row] - base) * input_gradients(forward, points, target[row]))
    return total / samples
