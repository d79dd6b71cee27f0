"""Integrated Gradients, computed here with captum's exact semantics (tested equal to a direct captum call):
captum's per-call bookkeeping cost a third as much as the model's passes on a small model."""

from __future__ import annotations

import torch
from captum.attr._utils.approximation_methods import approximation_parameters
from torch import Tensor, nn

from audit.attribution.methods.base import (
    AttributionInputs,
    AttributionMethod,
    ChunkFunction,
)
from audit.attribution.methods.common import AttributionParams, Forward, input_gradients
from audit.models.base import Capability


class IntegratedGradients(AttributionMethod):
    name = "integrated_gradients"
    title = "Integrated Gradients"
    short_title = "integ. gradients"
    reference = "Sundararajan, Taly, Yan. Axiomatic Attribution for Deep Networks. ICML 2017."
    order = 30
    requires = frozenset({Capability.GRADIENTS})
    needs_baseline = True
    default = True

    def passes(self, params: AttributionParams, height: int, width: int) -> tuple[float, float]:
        return float(params.ig_steps), 0.0  # one gradient per path point

    def prepare(self, inputs: AttributionInputs) -> ChunkFunction:
        x, params = inputs.x, inputs.params
        step_sizes, alphas = (torch.tensor(f(params.ig_steps), dtype=x.dtype, device=x.device)
                              for f in approximation_parameters("gausslegendre"))
        budget = max(1, params.internal_batch_size)

        def run(xc: Tensor, tc: Tensor, base: Tensor | None) -> Tensor:
            assert base is not None  # needs_baseline: every chunk comes with its baseline
            return integrated_gradients(inputs.forward, xc, tc, base, step_sizes, alphas, budget)

        return run


def integrated_gradients(forward: Forward | nn.Module, x: Tensor, target: Tensor, base: Tensor, step_sizes: Tensor,
                         alphas: Tensor, budget: int) -> Tensor:
    """Integrated Gradients as captum computes it (Gauss-Legendre alphas and weights, path points
    `base + alpha * (x - base)`), with the (step, input) pairs cut into passes of `budget` images
    whatever the batch."""
    n = x.shape[0]
    diff = x - base
    total = torch.zeros_like(x)
    pairs = torch.arange(len(alphas) * n, device=x.device)
    for start in range(0, len(pairs), budget):
        step, row = pairs[start : start + budget] // n, pairs[start : start + budget] % n
        points = base[row] + alphas[step, None, None, None] * diff[row]
        total.index_add_(0, row, input_gradients(forward, points, target[row]) * step_sizes[step, None, None, None])
    return total * diff
