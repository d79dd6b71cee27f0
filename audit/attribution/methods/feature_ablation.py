"""Feature ablation over a grid of cells through captum: each cell replaced by the baseline, all channels at once.
No autograd, so it runs on any forward function and is one of the fallbacks for models that cannot be
differentiated."""

from __future__ import annotations

from captum import attr as ca

from audit.attribution.methods.base import (
    AttributionInputs,
    AttributionMethod,
    ChunkFunction,
)
from audit.attribution.methods.common import (
    AttributionParams,
    grid_mask,
    perturbations_per_eval,
)


class FeatureAblation(AttributionMethod):
    name = "feature_ablation"
    title = "Feature ablation (grid cells)"
    short_title = "feature ablation"
    reference = (
        "Zeiler, Fergus. Visualizing and Understanding Convolutional Networks. ECCV 2014 "
        "(occlusion of a fixed grid of cells)."
    )
    order = 120
    needs_baseline = True
    reduction = "mean"
    fallback = True

    def passes(self, params: AttributionParams, height: int, width: int) -> tuple[float, float]:
        cells = min(params.grid, height) * min(params.grid, width)
        return 0.0, float(cells + 1)  # each cell ablated, and the intact input

    def prepare(self, inputs: AttributionInputs) -> ChunkFunction:
        x, params = inputs.x, inputs.params
        fa = ca.FeatureAblation(inputs.forward)
        mask = grid_mask(x.shape[2], x.shape[3], params.grid, x.device)[None, None]
        return lambda xc, tc, b: fa.attribute(
            xc, baselines=b, target=tc, feature_mask=mask,
            perturbations_per_eval=perturbations_per_eval(params, xc.shape[0]),
        )
