"""Occlusion: slide a grey patch over the image and watch the class probability (Zeiler and Fergus 2014).

Needs nothing but forward passes, so it runs on every model, ONNX files onnxruntime alone can run
included. With foreground masks it also asks the direct question: how much does the class
probability drop when the object is covered, against covering the same area of background?
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import Field
from scipy import ndimage

from audit.attribution.evaluation import curve_ends, deletion_curve
from audit.attribution.methods import METHODS, AttributionParams, attribute, baseline_for, occlusion_geometry
from audit.metrics.names import scope
from audit.probes.base import Evidence, Probe, ProbeParams, Taps
from audit.probes.model_functions import (
    DELETION_BATCH,
    detail_batches,
    load_masks,
    normalisation,
    probabilities_function,
    sample_rows,
    shrink,
    torch_threads,
)
from audit.probes.registry import register
from audit.probes.sampling import detail_sample


class OcclusionParams(ProbeParams):
    per_class: int = Field(default=64, ge=1, description="samples per class (true class, else prediction)")
    max_samples: int = Field(default=1024, ge=1, description="samples in all")
    window: int | None = Field(default=None, ge=1, description="occluding patch side in pixels (default about 1/8 of the side)")
    stride: int | None = Field(default=None, ge=1, description="patch stride (default half the window)")
    baseline: Literal["zeros", "blur", "mean"] = Field(default="zeros", description="what covers a region: black, a blurred copy, or the mean colour")
    perturbations_per_eval: int = Field(default=256, ge=1, description="occluded images per forward pass")
    batch_size: int = Field(default=16, ge=1, description="images explained together")
    deletion_steps: int = Field(default=16, ge=2, description="steps of the deletion curve (faithfulness)")


def background_region(mask: np.ndarray) -> np.ndarray:
    """As many background pixels as the object has, the ones farthest from it: 'the same area of
    background', as far as possible from anything the object's own context would explain."""
    area = int(mask.sum())
    background = ~mask
    if area == 0 or not background.any():
        return np.zeros_like(mask)
    distance = ndimage.distance_transform_edt(background)
    order = np.argsort(-distance, axis=None, kind="stable")[: min(area, int(background.sum()))]
    region = np.zeros(mask.size, dtype=bool)
    region[order] = True
    return region.reshape(mask.shape)


@register
class Occlusion(Probe):
    name = "occlusion"
    title = "Occlusion sensitivity"
    question = (
        "Which parts of the image does the class probability depend on? A grey patch slides over each "
        "image; where covering drops the probability of the class, the model was using that region."
    )
    Params = OcclusionParams
    profile_defaults = {
        "smoke": {"per_class": 12, "max_samples": 48, "deletion_steps": 8},
        "thorough": {"per_class": 128, "max_samples": 2048, "deletion_steps": 24},
    }
    references = [METHODS["occlusion"].reference]
    units = {"occlusion.object_drop": "percent", "occlusion.background_drop": "percent", "occlusion.faithfulness": "number",
             "occlusion.deletion_auc": "number", "occlusion.random_deletion_auc": "number"}

    def map(self, batch, taps: Taps) -> pd.DataFrame:  # type: ignore[no-untyped-def]
        rows = sample_rows(batch, taps, self.context.classes)
        return rows.assign(target=rows["reference"])  # the true class's probability, where it is known

    def reduce(self, rows: pd.DataFrame) -> Evidence:
        if self.context.model.format == "onnx":  # perturbations are cheap torch work; onnxruntime gets the cores
            with torch_threads(1):
                return self._reduce(rows)
        return self._reduce(rows)

    def _reduce(self, rows: pd.DataFrame) -> Evidence:
        context, p = self.context, self.params
        chosen = detail_sample(rows, p.per_class, p.max_samples, context.seed, prefer="has_mask")
        forward = probabilities_function(context)
        h, w = context.prep.input_size
        (wh, ww), (sh, sw) = occlusion_geometry(h, w, AttributionParams(occlusion_window=p.window, occlusion_stride=p.stride))
        settings = AttributionParams(baseline=p.baseline, occlusion_window=p.window, occlusion_stride=p.stride, perturbations_per_eval=p.perturbations_per_eval,
                                     internal_batch_size=max(p.perturbations_per_eval, p.batch_size), batch_size=p.batch_size, seed=context.seed)
        norm = normalisation(context)
        records: list[pd.DataFrame] = []
        maps_by_id: dict[str, np.ndarray] = {}
        bar = context.progress(total=len(chosen), desc="occlusion", unit="sample")
        for block, samples, _, x in detail_batches(context, chosen, p.batch_size):
            target = torch.tensor(block["target"].to_numpy(np.int64))
            maps = attribute("occlusion", forward, x, target, settings, norm)
            fill = baseline_for(x, p.baseline, normalisation=norm)
            ends = curve_ends(forward, x, fill, target)
            probs = ends[0].astype(np.float32)
            ranked = deletion_curve(forward, x, target, maps, p.deletion_steps, fill, "attribution", context.seed, DELETION_BATCH, ends)
            control = deletion_curve(forward, x, target, maps, p.deletion_steps, fill, "random", context.seed, DELETION_BATCH, ends)
            frame = block[["id", "class", "domain", "target"]].assign(
                probability=probs, deletion_auc=ranked.auc, random_deletion_auc=control.auc,
                object_drop=np.nan, background_drop=np.nan)
            masks, ok = load_masks(samples, (h, w))
            if ok.any():
                covered_object = torch.where(torch.from_numpy(masks[ok])[:, None], fill[ok], x[ok])
                regions = np.stack([background_region(m) for m in masks[ok]])
                covered_background = torch.where(torch.from_numpy(regions)[:, None], fill[ok], x[ok])
                both = forward(torch.cat([covered_object, covered_background])).gather(1, torch.cat([target[ok], target[ok]])[:, None])[:, 0].numpy()
                k = int(ok.sum())
                frame.loc[ok, "object_drop"] = probs[ok] - both[:k]
                frame.loc[ok, "background_drop"] = probs[ok] - both[k:]
            records.append(frame)
            maps_by_id.update(zip(frame["id"], shrink(maps).astype(np.float16), strict=True))
            bar.update(len(samples))
        bar.close()
        table = pd.concat(records, ignore_index=True) if records else pd.DataFrame(
            columns=["id", "class", "domain", "target", "probability", "deletion_auc", "random_deletion_auc", "object_drop", "background_drop"])
        self.table = table
        return self._evidence(table, maps_by_id, (wh, ww), (sh, sw))

    def _evidence(self, table: pd.DataFrame, maps: dict[str, np.ndarray], window: tuple[int, int], stride: tuple[int, int]) -> Evidence:
        evidence = Evidence()
        faithfulness = table["random_deletion_auc"] - table["deletion_auc"]
        evidence.add("occlusion.n", len(table))
        if len(table):
            evidence.add("occlusion.deletion_auc", float(table["deletion_auc"].mean()), n=len(table))
            evidence.add("occlusion.random_deletion_auc", float(table["random_deletion_auc"].mean()), n=len(table))
            evidence.add("occlusion.faithfulness", float(faithfulness.mean()), n=len(table))
        masked = table.dropna(subset=["object_drop"])
        for cls, group in [(None, masked), *masked.groupby("class", sort=True)]:
            if len(group):
                s = scope(class_=cls)
                evidence.add("occlusion.object_drop", float(group["object_drop"].mean()), s, len(group))
                evidence.add("occlusion.background_drop", float(group["background_drop"].mean()), s, len(group))
        self.context.handoff[self.name] = {
            "maps": maps,
            "faithfulness": float(faithfulness.mean()) if len(table) else None,
            "deletion_auc": float(table["deletion_auc"].mean()) if len(table) else None,
            "random_deletion_auc": float(table["random_deletion_auc"].mean()) if len(table) else None,
        }
        details: dict[str, Any] = {
            "samples": len(table),
            "window": list(window),
            "stride": list(stride),
            "baseline": self.params.baseline,
            "with_mask": len(masked),
            "per_class": [
                {"class": cls, "n": int(len(g)), "object_drop": float(g["object_drop"].mean()), "background_drop": float(g["background_drop"].mean())}
                for cls, g in masked.groupby("class", sort=True)
            ],
        }
        evidence.details = details
        return evidence

    def write_tables(self, rows: pd.DataFrame, store) -> dict:  # type: ignore[no-untyped-def]
        return {self.name: store.write_table(self.name, self.table)}
