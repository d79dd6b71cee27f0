"""SmoothGrad, computed here as captum's NoiseTunnel over Saliency(abs=False) computes it, with the same noise
draws in the same order (so the same maps for a seed), without captum's slow noise draw."""

from __future__ import annotations

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
    input_gradients,
    input_range,
)
from audit.models.base import Capability


class SmoothGrad(AttributionMethod):
    name = "smoothgrad"
    title = "SmoothGrad"
    short_title = "SmoothGrad"
    reference = (
        "Smilkov, Thorat, Kim, Viegas, Wattenberg. SmoothGrad: removing noise by adding noise. "
        "ICML workshop 2017."
    )
    order = 40
    requires = frozenset({Capability.GRADIENTS})
    stochastic = True
    reduction = "magnitude"
    signed = False
    default = True

    def passes(self, params: AttributionParams, height: int, width: int) -> tuple[float, float]:
        return float(params.smoothgrad_samples), 0.0  # one gradient per noisy copy

    def prepare(self, inputs: AttributionInputs) -> ChunkFunction:
        # Raw gradients are averaged and the magnitude taken afterwards (Smilkov et al.): averaging
        # |gradients| would never let the noise cancel.
        params = inputs.params
        stdev = float(params.smoothgrad_stdev * input_range(inputs.normalisation))
        budget = max(1, params.internal_batch_size)
        return lambda xc, tc, _b: smoothgrad(inputs.forward, xc, tc, params.smoothgrad_samples, stdev, budget)


def smoothgrad(forward: Forward | nn.Module, x: Tensor, target: Tensor, samples: int, stdev: float,
               budget: int) -> Tensor:
    """The mean input gradient over `samples` noisy copies of each input, at most `budget` images a pass; the
    noise is drawn with `normal_` where captum's `torch.normal` over a materialised standard-deviation tensor
    is ten times slower and cost as much as the model's passes."""
    n = x.shape[0]
    per_pass = max(1, min(samples, budget // n))
    total = torch.zeros_like(x)
    for k in [per_pass] * (samples // per_pass) + ([samples % per_pass] if samples % per_pass else []):
        noisy = x.repeat_interleave(k, dim=0)
        noisy += torch.empty_like(noisy).normal_(0.0, stdev)
        total += input_gradients(forward, noisy, target.repeat_interleave(k)).view(n, k, *x.shape[1:]).sum(dim=1)
    return total / samples
