"""Occlusion (Zeiler and Fergus 2014) with captum's semantics, vectorised over windows and samples (tested equal
to captum's Occlusion): captum's per-perturbation Python bookkeeping cost more than the model. No autograd, so it
runs on any forward function; the occlusion probe runs it, not the attribution probe's method list."""

from __future__ import annotations

import numpy as np
import torch

from audit.attribution.methods.base import AttributionInputs, AttributionMethod
from audit.attribution.methods.common import (
    AttributionParams,
    baseline_for,
    occlusion_geometry,
)


class Occlusion(AttributionMethod):
    name = "occlusion"
    title = "Occlusion (sliding window)"
    short_title = "occlusion"
    reference = "Zeiler, Fergus. Visualizing and Understanding Convolutional Networks. ECCV 2014."
    order = 110
    needs_baseline = True
    reduction = "mean"

    def passes(self, params: AttributionParams, height: int, width: int) -> tuple[float, float]:
        return 0.0, float(len(occlusion_boxes(height, width, params)) + 1)  # each window, and the intact input

    def attribute(self, inputs: AttributionInputs) -> np.ndarray:
        """Each window position covers all channels with the baseline; every pixel gets the mean drop of the
        target score over the windows covering it (captum's Occlusion with its feature counts). All occluded
        copies of a chunk are built at once and about `internal_batch_size` images go to each call."""
        forward, x, target, params = inputs.forward, inputs.x, inputs.target, inputs.params
        boxes = occlusion_boxes(x.shape[2], x.shape[3], params)
        masks = torch.zeros(len(boxes), *x.shape[2:], device=x.device, dtype=x.dtype)
        for p, (top, bottom, left, right) in enumerate(boxes):
            masks[p, top:bottom, left:right] = 1.0
        counts = masks.sum(dim=0)
        positions = masks.shape[0]
        out = []
        with torch.no_grad():
            for start in range(0, x.shape[0], max(1, params.batch_size)):
                xc, tc = x[start : start + params.batch_size], target[start : start + params.batch_size]
                n = xc.shape[0]
                base = baseline_for(xc, params.baseline, inputs.pixel_mean, inputs.normalisation)
                rows = torch.arange(n, device=x.device)
                reference = torch.as_tensor(forward(xc))[rows, tc]
                drops = torch.empty(n, positions, device=x.device)
                per_call = max(1, max(params.internal_batch_size, params.perturbations_per_eval) // n)
                # One buffer of per_call copies, reused: each slot gets its previous window restored and
                # its next window covered, so only two windows are written per image, not whole images.
                buffer = xc.unsqueeze(0).repeat(min(per_call, positions), 1, 1, 1, 1)
                previous: list[tuple[int, int, int, int] | None] = [None] * len(buffer)
                for p0 in range(0, positions, per_call):
                    group = boxes[p0 : p0 + per_call]
                    for j, (top, bottom, left, right) in enumerate(group):
                        if previous[j] is not None:
                            t, b, l, r = previous[j]  # type: ignore[misc]
                            buffer[j, :, :, t:b, l:r] = xc[:, :, t:b, l:r]
                        buffer[j, :, :, top:bottom, left:right] = base[:, :, top:bottom, left:right]
                        previous[j] = (top, bottom, left, right)
                    images = buffer[: len(group)].reshape(-1, *xc.shape[1:])
                    scores = torch.as_tensor(forward(images)).reshape(len(group), n, -1)
                    drops[:, p0 : p0 + len(group)] = (reference[None] - scores[:, rows, tc]).T
                maps = (drops @ masks.reshape(positions, -1)).reshape(n, *x.shape[2:]) / counts
                out.append(maps.float().cpu().numpy())
        return np.concatenate(out).astype(np.float32, copy=False)


def occlusion_boxes(height: int, width: int, params: AttributionParams) -> list[tuple[int, int, int, int]]:
    """(top, bottom, left, right) of every window position, as captum's Occlusion places them.

    Positions start at multiples of the stride; ceil((side - window) / stride) + 1 of them per side,
    the last one cropped at the border when the stride does not divide evenly.
    """
    (wh, ww), (sh, sw) = occlusion_geometry(height, width, params)
    ny = int(np.ceil((height - wh) / sh)) + 1
    nx = int(np.ceil((width - ww) / sw)) + 1
    return [(iy * sh, min(iy * sh + wh, height), ix * sw, min(ix * sw + ww, width))
            for iy in range(ny) for ix in range(nx)]
