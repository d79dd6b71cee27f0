"""KernelSHAP over grid cells, batched. captum fits one example at a time; here the coalitions are drawn once
with captum's own sampler and shared by the whole batch, and one least-squares solve serves every sample, so
each sample's result equals captum's KernelShap on that sample alone with the same seed. No autograd: one of
the fallbacks for models that cannot be differentiated."""

from __future__ import annotations

import numpy as np
import torch
from captum import attr as ca
from torch.distributions.categorical import Categorical

from audit.attribution.methods.base import AttributionInputs, AttributionMethod
from audit.attribution.methods.common import (
    AttributionParams,
    AttributionUnsupported,
    baseline_for,
    grid_mask,
    perturbations_per_eval,
)


class KernelShap(AttributionMethod):
    name = "kernel_shap"
    title = "KernelSHAP (grid cells)"
    short_title = "KernelSHAP"
    reference = "Lundberg, Lee. A Unified Approach to Interpreting Model Predictions. NeurIPS 2017."
    order = 130
    needs_baseline = True
    stochastic = True
    reduction = "mean"
    fallback = True

    def passes(self, params: AttributionParams, height: int, width: int) -> tuple[float, float]:
        return 0.0, float(params.kernel_shap_samples)  # one forward per coalition

    def attribute(self, inputs: AttributionInputs) -> np.ndarray:
        """Coalitions from captum's sampler (all features, none, then Shapley-kernel draws); the regression is
        sklearn's weighted least squares with intercept (centre, scale by sqrt(weight)), in float64."""
        forward, x, target, params = inputs.forward, inputs.x, inputs.target, inputs.params
        height, width = x.shape[2], x.shape[3]
        cells = grid_mask(height, width, params.grid, x.device)
        m = int(cells.max()) + 1
        if m < 2:
            raise AttributionUnsupported("KernelSHAP needs at least two grid cells")
        counts = torch.arange(m, dtype=torch.float)
        probs = torch.tensor(float(m - 1)) / (counts * (m - counts))
        probs[0] = 0.0
        sampler = ca.KernelShap(forward).kernel_shap_perturb_generator(
            x, num_select_distribution=Categorical(probs), num_interp_features=m
        )
        coalitions = torch.cat([next(sampler) for _ in range(params.kernel_shap_samples)]).to(x.device)
        s = coalitions.shape[0]
        keep = coalitions[:, cells].bool()  # (S, H, W)
        outputs = torch.empty(s, x.shape[0], dtype=torch.float64)
        chunk = max(1, params.batch_size)
        with torch.no_grad():
            for start in range(0, x.shape[0], chunk):
                xc = x[start : start + chunk]
                tc = target[start : start + chunk]
                base = baseline_for(xc, params.baseline, inputs.pixel_mean, inputs.normalisation)
                step = perturbations_per_eval(params, xc.shape[0])
                for s0 in range(0, s, step):
                    k = keep[s0 : s0 + step, None, None]  # (s, 1, 1, H, W)
                    batch = torch.where(k, xc[None], base[None]).reshape(-1, *xc.shape[1:])
                    scores = torch.as_tensor(forward(batch)).reshape(batch.shape[0], -1)
                    picked = scores.gather(1, tc.repeat(k.shape[0])[:, None].to(scores.device))
                    rows = picked.reshape(k.shape[0], -1).double().cpu()
                    outputs[s0 : s0 + k.shape[0], start : start + xc.shape[0]] = rows
        z = coalitions.double().cpu().numpy()
        y = outputs.numpy()
        selected = z.sum(axis=1)
        w = np.where((selected == 0) | (selected == m), 1e6, 1.0)
        z_mean = (w[:, None] * z).sum(0) / w.sum()
        y_mean = (w[:, None] * y).sum(0) / w.sum()
        root = np.sqrt(w)[:, None]
        coef = np.linalg.lstsq((z - z_mean) * root, (y - y_mean) * root, rcond=None)[0]  # (M, N)
        return coef.T[:, cells.cpu().numpy()].astype(np.float32)
