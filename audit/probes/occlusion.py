"""Occlusion: slide a grey patch over the image and watch the class probability (Zeiler and Fergus 2014).

Needs nothing but forward passes, so it runs on every model, ONNX files onnxruntime alone can run
included. With foreground masks it also asks the direct question: how much does the class
probability drop when the object is covered, against covering the same area of background?
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import numpy as np
import pandas as pd
import torch
from pydantic import Field
from scipy import ndimage

from audit.attribution.evaluation import curve_ends, deletion_curve
from audit.attribution.methods import (
    METHODS,
    AttributionParams,
    attribute,
    baseline_for,
    occlusion_geometry,
)
from audit.execution.costs import Passes
from audit.metrics.declarations import ColumnSpec, MetricSpec, TableSpec
from audit.metrics.names import scope
from audit.probes.base import (
    DetailBatch,
    DetailOutput,
    DetailPlan,
    Evidence,
    Probe,
    ProbeData,
    ProbeInputs,
    ProbeParams,
    Taps,
)
from audit.probes.model_functions import (
    DELETION_COLUMNS,
    SAMPLE_COLUMNS,
    deletion_batch,
    inputs_tensor,
    load_masks,
    normalisation,
    probabilities_function,
    runs_onnxruntime,
    sample_rows,
    shrink,
    torch_threads,
)
from audit.probes.registry import register
from audit.probes.sampling import detail_sample
from audit.store import ArrayTable


class OcclusionParams(ProbeParams):
    per_class: int = Field(default=64, ge=1, description="samples per class (true class, else prediction)")
    max_samples: int = Field(default=1024, ge=1, description="samples in all")
    window: int | None = Field(default=None, ge=1, description="occluding patch side in pixels; unset: about 1/8 of the side")
    stride: int | None = Field(default=None, ge=1, description="patch stride; unset: half the window")
    fine_grid_side: int | None = Field(default=96, ge=8, description=(
        "largest input side that gets the fine grid (window 1/8 of the side, 225 windows); larger inputs get fewer, larger windows "
        "at the same cost in pixels (36 at 224 px); null: the fine grid at any size"))
    baseline: Literal["zeros", "blur", "mean"] = Field(default="zeros", description="what covers a region: black, a blurred copy, or the mean colour")
    perturbations_per_eval: int = Field(default=256, ge=1, description="occluded images per forward pass")
    batch_size: int = Field(default=16, ge=1, description="images explained together")
    deletion_steps: int = Field(default=12, ge=2, description="steps of the deletion curve (faithfulness)")


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
        "thorough": {"per_class": 128, "max_samples": 2048, "deletion_steps": 24, "fine_grid_side": None},
    }
    references = [METHODS["occlusion"].reference]
    metrics = (
        MetricSpec("occlusion.n", ("global",), "count", "samples occluded"),
        MetricSpec("occlusion.deletion_auc", ("global",), "number", "area under the class probability as the most relevant patches go first"),
        MetricSpec("occlusion.random_deletion_auc", ("global",), "number", "the same area with pixels removed in random order"),
        MetricSpec("occlusion.faithfulness", ("global",), "number", "random-order area minus the occlusion map's area (above 0: faithful)"),
        MetricSpec("occlusion.object_drop", ("global", "class"), "percent", "fall of the class probability when the object is covered"),
        MetricSpec("occlusion.background_drop", ("global", "class"), "percent",
                   "fall of the class probability when as much background, far from the object, is covered"),
    )
    provides = (
        TableSpec("occlusion", "detail", "one row per occluded sample", (
            *SAMPLE_COLUMNS,
            ColumnSpec("target", "number", "the class whose probability is watched (the true class where known)"),
            ColumnSpec("probability", "percent", "that class's probability on the intact image"),
            *DELETION_COLUMNS,
            ColumnSpec("object_drop", "percent", "probability lost when the object is covered (masked samples)"),
            ColumnSpec("background_drop", "percent", "probability lost when as much background is covered (masked samples)"),
        )),
        TableSpec("occlusion_maps", "detail", "each sample's occlusion map, at most 64 pixels a side (float16)", kind="array"),
    )

    def map(self, batch, taps: Taps) -> pd.DataFrame:  # type: ignore[no-untyped-def]
        rows = sample_rows(batch, taps, self.context.classes)
        return rows.assign(target=rows["reference"])  # the true class's probability, where it is known

    @contextlib.contextmanager
    def detail_session(self) -> Iterator[None]:
        if runs_onnxruntime(self.context):  # perturbations are cheap torch work; onnxruntime gets the cores
            with torch_threads(1):
                yield
        else:
            yield

    def select(self, rows: pd.DataFrame, inputs: ProbeInputs) -> DetailPlan:
        p = self.params
        self._chosen = detail_sample(rows, p.per_class, self.limited(p.max_samples), self.context.seed, prefer="has_mask")
        return DetailPlan.of(self._chosen["id"].tolist(), p.batch_size)

    def passes(self, plan: DetailPlan) -> Passes:
        """Per image: every window and the intact image, both deletion curves and their shared ends,
        and the object and as much background covered."""
        h, w = self.context.prep.input_size
        _, per_map = METHODS["occlusion"].passes(self._settings(), h, w)
        per_image = per_map + 2 * (self.params.deletion_steps - 1) + 2 + 2
        return Passes(forward=per_image * sum(len(b.ids) for b in plan.batches))

    def _settings(self) -> AttributionParams:
        p = self.params
        return AttributionParams(baseline=p.baseline, occlusion_window=p.window, occlusion_stride=p.stride,
                                 occlusion_fine_side=p.fine_grid_side, perturbations_per_eval=p.perturbations_per_eval,
                                 internal_batch_size=max(p.perturbations_per_eval, p.batch_size), batch_size=p.batch_size, seed=self.context.seed)

    def detail(self, batch: DetailBatch) -> DetailOutput:
        """Occlusion maps of one batch, their deletion areas, and covering the object against as much background."""
        context, p = self.context, self.params
        forward = probabilities_function(context)
        h, w = context.prep.input_size
        norm = normalisation(context)
        x = inputs_tensor(batch)
        block = batch.rows
        target = torch.tensor(block["target"].to_numpy(np.int64))
        maps = attribute("occlusion", forward, x, target, self._settings(), norm)
        fill = baseline_for(x, p.baseline, normalisation=norm)
        ends = curve_ends(forward, x, fill, target)
        probs = ends[0].astype(np.float32)
        rows = deletion_batch(context)
        ranked = deletion_curve(forward, x, target, maps, p.deletion_steps, fill, "attribution", context.seed, rows, ends)
        control = deletion_curve(forward, x, target, maps, p.deletion_steps, fill, "random", context.seed, rows, ends)
        frame = block[["id", "class", "domain", "target"]].assign(
            probability=probs, deletion_auc=ranked.auc, random_deletion_auc=control.auc,
            object_drop=np.nan, background_drop=np.nan)
        masks, ok = load_masks(batch.samples, (h, w), self.context.prep.max_pixels)
        if ok.any():
            covered_object = torch.where(torch.from_numpy(masks[ok])[:, None], fill[ok], x[ok])
            regions = np.stack([background_region(m) for m in masks[ok]])
            covered_background = torch.where(torch.from_numpy(regions)[:, None], fill[ok], x[ok])
            both = forward(torch.cat([covered_object, covered_background])).gather(1, torch.cat([target[ok], target[ok]])[:, None])[:, 0].numpy()
            k = int(ok.sum())
            frame.loc[ok, "object_drop"] = probs[ok] - both[:k]
            frame.loc[ok, "background_drop"] = probs[ok] - both[k:]
        return DetailOutput(tables={"occlusion": frame},
                            arrays={"occlusion_maps": ArrayTable(frame[["id"]], {"map": shrink(maps).astype(np.float16)})})

    def reduce(self, data: ProbeData) -> Evidence:
        h, w = self.context.prep.input_size
        window, stride = occlusion_geometry(h, w, self._settings())
        return self._evidence(data.tables["occlusion"], window, stride)

    def _evidence(self, table: pd.DataFrame, window: tuple[int, int], stride: tuple[int, int]) -> Evidence:
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
        evidence.details = {
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
        return evidence
