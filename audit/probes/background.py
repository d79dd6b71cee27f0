"""Background reliance ("husky as wolf because of the snow"): is the evidence on the object or around it?

Two kinds of evidence, both needing foreground masks:
- where the attribution of the most faithful trusted method falls, against where the object is
  (share of positive attribution outside the object, that share over the background's share of the
  image, and the pointing game);
- what the model answers when the background changes (Xiao et al. 2020): the object pasted onto a
  background of its own class (mixed-same) and of another class (mixed-rand), and the background
  alone with the object removed (only-bg-t). These need only forward passes, so they run on every model.
"""

from __future__ import annotations

import io
import zipfile
from typing import Any

import numpy as np
import pandas as pd
import torch
from pydantic import Field

from audit.backgrounds import counterfactuals
from audit.execution.costs import Passes
from audit.metrics.classification import Bootstrap, percentile_interval
from audit.metrics.declarations import ColumnSpec, MetricSpec, TableSpec
from audit.metrics.names import scope
from audit.probes.base import (
    Consumes,
    DetailBatch,
    DetailBatchSpec,
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
    SAMPLE_COLUMNS,
    load_masks,
    probabilities_function,
    sample_rows,
    shrink,
)
from audit.probes.registry import register
from audit.probes.sampling import detail_sample, id_rank
from audit.store import ArrayTable
from audit.thumbnails import to_display

VARIANTS = ("only_bg_t", "mixed_same", "mixed_rand")
MASK_BATCH = 256  # masks read per batch for localising maps (no model call: any size gives the same fractions)
GREY = 0.5  # what replaces a removed region: mid-grey in pixel space, whatever the normalisation
REGION_METHOD = "object_background_shapley"
REGION_REASON = (
    "Judged by the object/background Shapley value: the model's own answers with the object, the background, "
    "both or neither replaced by grey (the object's place filled with tiled background), split fairly between the two "
    "regions. It is exact for the question asked and needs only forward passes. Pixel attribution maps are compared "
    "below; on their own they follow edges and contrast with the baseline as much as the model's use of a region."
)
XIAO = "Xiao, Engstrom, Ilyas, Madry. Noise or Signal: The Role of Image Backgrounds in Object Recognition. ICLR 2021 (arXiv 2020)."
POINTING = "Zhang, Bargal, Lin, Brandt, Shen, Sclaroff. Top-down Neural Attention by Excitation Backprop. IJCV 2018 (pointing game)."


class BackgroundParams(ProbeParams):
    per_class: int = Field(default=200, ge=1, description="samples per class for the background swaps")
    max_samples: int = Field(default=2000, ge=1, description="samples in all for the background swaps")
    batch_size: int = Field(default=128, ge=8, description="images whose backgrounds are swapped among each other")
    gallery_classes: int = Field(default=8, ge=0, description="classes with a gallery of worst samples in the report")
    gallery_per_class: int = Field(default=3, ge=0, description="worst samples shown per class")
    evidence_per_class: int = Field(default=8, ge=0, description=(
        "samples per class and finding kept in the state they failed in (swapped background, object removed), "
        "for the findings' evidence; the rules name up to 8"))


def localisation(maps: np.ndarray, masks: np.ndarray) -> pd.DataFrame:
    """Per map: share of positive attribution outside the object, that share over the background's
    share of the image (1 = no preference, above 1 = prefers the background), and whether the
    map's maximum lies on the object (the pointing game). `masks` are fractions at map resolution."""
    positive = np.clip(maps, 0, None).reshape(len(maps), -1)
    inside = masks.reshape(len(masks), -1)
    total = positive.sum(axis=1)
    background_area = 1.0 - inside.mean(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(total > 0, (positive * (1 - inside)).sum(axis=1) / total, np.nan)
        ratio = np.where(background_area > 0, share / background_area, np.nan)
    top = np.argmax(maps.reshape(len(maps), -1), axis=1)
    hit = np.where(total > 0, inside[np.arange(len(maps)), top] >= 0.5, np.nan)
    return pd.DataFrame({"outside_share": share, "background_area": background_area, "outside_ratio": ratio, "pointing_hit": hit})


def region_shapley(full: np.ndarray, object_only: np.ndarray, background_only: np.ndarray, empty: np.ndarray,
                   masks: np.ndarray) -> pd.DataFrame:
    """Two-player Shapley values of the object and the background for the explained class probability.

    With only two players the Shapley value is exact: each region's marginal contribution averaged
    over the two orders in which the regions can be added. Redundant evidence (the object and the
    snow both say "wolf") is split between them instead of being credited to neither, which is where
    pixel attributions and small occlusion patches fail. The share and ratio are defined as for maps,
    with each region's value spread over its pixels.
    """
    phi_object = 0.5 * ((full - background_only) + (object_only - empty))
    phi_background = 0.5 * ((full - object_only) + (background_only - empty))
    positive_object, positive_background = np.clip(phi_object, 0, None), np.clip(phi_background, 0, None)
    total = positive_object + positive_background
    background_area = 1.0 - masks.reshape(len(masks), -1).mean(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(total > 0, positive_background / total, np.nan)
        ratio = np.where(background_area > 0, share / background_area, np.nan)
    hit = np.where(total > 0, phi_object >= phi_background, np.nan)
    return pd.DataFrame({"phi_object": phi_object, "phi_background": phi_background, "outside_share": share,
                         "background_area": background_area, "outside_ratio": ratio, "pointing_hit": hit})


def plain_words(cls: str, v: dict[str, Any]) -> str:
    """One sentence a reviewer can read under a flagged finding: what the evidence shows for a class."""
    parts = []
    if v.get("outside_share") is not None and v.get("background_area") is not None:
        parts.append(f"{v['outside_share']:.0%} of the evidence for {cls} lies on the background, which covers "
                     f"{v['background_area']:.0%} of the image")
    if v.get("mixed_rand_accuracy") is not None and v.get("mixed_same_accuracy") is not None:
        parts.append(f"moved onto another class's background the object is still recognised as {cls} in "
                     f"{v['mixed_rand_accuracy']:.0%} of the samples, against {v['mixed_same_accuracy']:.0%} on a background of its own class")
    if v.get("still_predicted") is not None:
        parts.append(f"with the object removed the model still says {cls} for {v['still_predicted']:.0%} of them")
    if not parts:
        return ""
    text = "; ".join(parts)
    return text[0].upper() + text[1:] + "."


@register
class Background(Probe):
    name = "background"
    title = "Background reliance"
    question = (
        "Does the model recognise the object, or the scene around it? Attribution is compared with the "
        "object's mask, and the model is shown each object on other backgrounds and the background alone."
    )
    Params = BackgroundParams
    profile_defaults = {"smoke": {"per_class": 24, "max_samples": 120, "batch_size": 64}, "thorough": {"per_class": 500, "max_samples": 5000}}
    references = [XIAO, POINTING, "Shapley. A Value for n-Person Games. 1953; Lundberg, Lee. A Unified Approach to Interpreting Model Predictions (SHAP). NeurIPS 2017."]
    consumes = (
        Consumes("attribution_methods", optional=True),
        Consumes("attribution_maps", optional=True),
        Consumes("occlusion", optional=True),
        Consumes("occlusion_maps", optional=True),
    )
    metrics = (
        MetricSpec("background.outside_ratio", ("global", "class", "method"), "ratio",
                   "share of positive evidence on the background over the background's share of the image (1: no preference)"),
        MetricSpec("background.outside_share", ("global", "class"), "percent", "share of positive evidence on the background"),
        MetricSpec("background.pointing_game", ("global", "class"), "percent", "samples whose strongest evidence lies on the object"),
        *(MetricSpec(f"background.{v}_accuracy", ("global", "class"), "percent", f"accuracy on the {label}")
          for v, label in (("original", "original images"), ("only_bg_t", "background alone, object removed"),
                           ("mixed_same", "object on a background of its own class"),
                           ("mixed_rand", "object on a background of another class"))),
        MetricSpec("background.bg_gap", ("global", "class"), "points", "mixed-same accuracy minus mixed-rand accuracy (Xiao et al.)",
                   interval=True),
        MetricSpec("background.flip_rate", ("global", "class"), "percent", "correct predictions that change when the background is another class's"),
        MetricSpec("background.still_predicted", ("class",), "percent", "with the object removed, the class is still predicted"),
        MetricSpec("background.only_bg_excess", ("class",), "points",
                   "still-predicted rate minus how often other classes' backgrounds alone are called this class", interval=True),
    )
    provides = (
        TableSpec("background_swaps", "detail", "the model's answers on each swapped sample and the region Shapley values", (
            ColumnSpec("reference", "number", "the class judged (true class, else the prediction)"),
            ColumnSpec("pred_original", "number", "prediction on the original image"),
            ColumnSpec("phi_object", "number", "Shapley value of the object for the explained class probability"),
            ColumnSpec("phi_background", "number", "Shapley value of the background"),
            ColumnSpec("outside_share", "percent", "the background's share of the positive Shapley value"),
            ColumnSpec("background_area", "percent", "the background's share of the image"),
            ColumnSpec("outside_ratio", "ratio", "outside share over background area"),
            ColumnSpec("pointing_hit", "number", "1 when the object's Shapley value is at least the background's"),
            *(ColumnSpec(f"pred_{v}", "number", f"prediction on the {v} variant (-1: no valid variant)") for v in VARIANTS),
        )),
        TableSpec("background_gallery", "detail", "per batch and class, the samples a gallery could show, with their display images",
                  kind="array", keys=("id", "class", "mapped", "ratio", "flipped", "still", "batch", "position")),
        TableSpec("background_masks", "detail", "each masked sample's object fraction at attribution-map resolution", kind="array"),
        TableSpec("background", "reduce", "one row per swapped sample: answers, Shapley localisation and the judging method", (
            *SAMPLE_COLUMNS,
            ColumnSpec("outside_ratio", "ratio", "background share of the evidence over the background's share of the image"),
            ColumnSpec("outside_share", "percent", "background share of the evidence"),
            *(ColumnSpec(f"correct_{v}", "number", f"correct on the {v} image") for v in ("original", *VARIANTS)),
            ColumnSpec("flipped", "number", "correct, and changed by another class's background"),
            ColumnSpec("still_predicted", "number", "the class is still predicted with the object removed"),
            ColumnSpec("method", "text", "the method the localisation comes from"),
        )),
        TableSpec("background_methods", "reduce", "localisation of every map method against the masks", (
            ColumnSpec("method", "text", "the map method"),
            ColumnSpec("outside_share", "percent", "background share of the positive attribution"),
            ColumnSpec("outside_ratio", "ratio", "outside share over background area"),
            ColumnSpec("pointing_hit", "number", "the map's maximum lies on the object"),
        )),
    )

    def skip_reason(self) -> str | None:
        if not self.context.manifest.has_masks:
            return "the manifest has no usable `mask` column: background reliance needs a foreground mask per image"
        return None

    def map(self, batch, taps: Taps) -> pd.DataFrame:  # type: ignore[no-untyped-def]
        return sample_rows(batch, taps, self.context.classes)

    def select(self, rows: pd.DataFrame, inputs: ProbeInputs) -> DetailPlan:
        """Swap batches per domain (classes mixed within a batch, as the swaps draw backgrounds from
        it), then batches of masks for every masked sample a consumed map covers."""
        context, p = self.context, self.params
        masked = rows[rows["has_mask"]]
        self._maps, self._best, self._best_reason = self._methods(inputs)
        mapped = set().union(*(maps.keys() for maps in self._maps.values())) if self._maps else set()
        self._mapped = mapped
        batches: list[DetailBatchSpec] = []
        chosen = detail_sample(masked, p.per_class, self.limited(p.max_samples), context.seed + 1)
        for _, group in chosen.groupby(chosen["domain"].fillna(""), sort=True) if len(chosen) else []:
            ids = group["id"].to_numpy()[np.argsort(id_rank(group["id"], context.seed), kind="stable")].tolist()
            batches.extend(DetailPlan.of(ids, p.batch_size, kind="swap").batches)
        wanted = set(masked["id"]) & mapped
        in_order = [s.id for s in context.manifest.samples if s.id in wanted]
        batches.extend(DetailPlan.of(in_order, MASK_BATCH, kind="masks", inputs=False).batches)
        return DetailPlan(tuple(batches))

    def passes(self, plan: DetailPlan) -> Passes:
        """Per swapped image: the original, each background variant, the object alone and grey; the
        mask batches read maps and masks only."""
        swapped = sum(len(b.ids) for b in plan.batches if b.kind == "swap")
        return Passes(forward=float(swapped * (1 + len(VARIANTS) + 2)))

    def _methods(self, inputs: ProbeInputs) -> tuple[dict[str, dict[str, np.ndarray]], str | None, str]:
        """The maps the attribution and occlusion probes stored, and the most faithful trusted method."""
        maps: dict[str, dict[str, np.ndarray]] = {}
        candidates: list[tuple[float, str, str]] = []
        methods = inputs.table("attribution_methods")
        attribution_maps = inputs.array("attribution_maps")
        if methods is not None:
            ran = methods[methods["status"] == "ran"]
            for method in ran["method"]:
                maps[method] = attribution_maps.by_key(method) if attribution_maps is not None else {}
            for row in ran[ran["trusted"].fillna(False).astype(bool)].itertuples():
                candidates.append((float(row.faithfulness), row.method, f"{row.title}, the most faithful trusted attribution method"))
        occlusion, occlusion_maps = inputs.table("occlusion"), inputs.array("occlusion_maps")
        if occlusion is not None and occlusion_maps is not None and len(occlusion_maps):
            maps["occlusion"] = dict(zip(occlusion_maps.keys["id"].astype(str), occlusion_maps.values["map"], strict=True))
            faithfulness = float((occlusion["random_deletion_auc"] - occlusion["deletion_auc"]).mean()) if len(occlusion) else None
            if faithfulness is not None and faithfulness > 0:
                candidates.append((faithfulness, "occlusion", "occlusion, which needs only forward passes and deletes evidence faster than random order"))
        if not candidates:
            return maps, None, "no trusted method"
        faith, method, reason = max(candidates)
        return maps, method, f"Judged by {reason} (faithfulness {faith:.3f})."

    def detail(self, batch: DetailBatch) -> DetailOutput:
        return self._swap(batch) if batch.kind == "swap" else self._mask_fractions(batch)

    def _mask_fractions(self, batch: DetailBatch) -> DetailOutput:
        full, ok = load_masks(batch.samples, self.context.prep.input_size, self.context.prep.max_pixels)
        if not ok.any():
            return DetailOutput()
        side = max(next(m[i] for m in self._maps.values() for i in m).shape)  # every map has the same size
        ids = [s.id for s, k in zip(batch.samples, ok, strict=True) if k]
        return DetailOutput(arrays={"background_masks": ArrayTable(pd.DataFrame({"id": ids}), {"fraction": shrink(full[ok].astype(np.float32), side)})})

    def _swap(self, batch: DetailBatch) -> DetailOutput:
        """Predictions on only-bg-t, mixed-same and mixed-rand versions of each image of the batch.

        Keeps, per class, display copies of only the few samples a gallery could show (those with
        heatmaps first, then the highest background ratio): memory stays bounded on large audits."""
        context = self.context
        masks, ok = load_masks(batch.samples, context.prep.input_size, context.prep.max_pixels)
        if not ok.any():
            return DetailOutput()
        forward = probabilities_function(context)
        names = context.classes
        assert batch.raw is not None
        samples, raw, masks, block = [s for s, k in zip(batch.samples, ok, strict=True) if k], batch.raw[ok], masks[ok], batch.rows[ok].reset_index(drop=True)
        reference = block["reference"].to_numpy()
        variants = counterfactuals(raw, masks, [names[r] for r in reference], context.seed)
        grey = np.full_like(raw, GREY)
        object_only = np.where(masks[:, None], raw, grey)
        stack = [raw] + [variants[v][0] for v in VARIANTS] + [object_only, grey]
        probs = forward(torch.from_numpy(context.prep.normalise(np.concatenate(stack)))).numpy()
        probs = probs.reshape(len(stack), len(samples), -1)
        preds = probs.argmax(axis=2)
        frame = pd.DataFrame({"id": block["id"], "reference": reference, "pred_original": preds[0]})
        explained = np.arange(len(samples)), preds[0]
        frame = pd.concat([frame, region_shapley(
            probs[0][explained], probs[4][explained], probs[1][explained], probs[5][explained], masks)], axis=1)
        for k, variant in enumerate(VARIANTS, start=1):
            valid = variants[variant][1]
            frame[f"pred_{variant}"] = np.where(valid, preds[k], -1)
        output = DetailOutput(tables={"background_swaps": frame})
        if context.sample_images and (self.params.gallery_per_class or self.params.evidence_per_class):
            gallery = self._gallery_candidates(batch.index, frame, raw, masks, variants)
            if gallery is not None:
                output.arrays["background_gallery"] = gallery
        return output

    def _gallery_candidates(self, index: int, frame: pd.DataFrame, raw: np.ndarray, masks: np.ndarray,
                            variants: dict[str, tuple[np.ndarray, np.ndarray]]) -> ArrayTable | None:
        """Per class, the batch's samples a gallery or a finding's evidence could show, with their
        display images: the best `gallery_per_class` by the gallery's order, and the first
        `evidence_per_class` by each order the background rules pick their evidence in (flipped,
        still predicted without the object, background ratio; earlier first on ties). `reduce` keeps
        the best of all batches by the same orders, which is what keeping running top lists would give,
        and is what the rule engine's stable sort of the background table picks."""
        names = self.context.classes
        ok_orig = frame["pred_original"] == frame["reference"]
        rand, only = frame["pred_mixed_rand"], frame["pred_only_bg_t"]
        keys = pd.DataFrame({
            "id": frame["id"].astype(str),
            "class": [names[int(r)] for r in frame["reference"]],
            "mapped": frame["id"].isin(self._mapped).to_numpy(),
            "ratio": frame["outside_ratio"].fillna(-1.0).astype(float).to_numpy(),
            "flipped": np.where((rand >= 0) & ok_orig, (rand != frame["pred_original"]).astype(float), -1.0),
            "still": np.where(only >= 0, (only == frame["reference"]).astype(float), -1.0),
            "batch": index,
            "position": np.arange(len(frame)),
        })
        rows = np.unique(np.concatenate([_best_candidates(keys, self.params.gallery_per_class),
                                         *(_first_by(keys, column, self.params.evidence_per_class) for column in EVIDENCE_ORDERS)]))
        if not len(rows):
            return None
        return ArrayTable(keys.iloc[rows].reset_index(drop=True), {
            "input": np.stack([to_display(raw[j]) for j in rows]),
            "mask": masks[rows],
            **{f"variant_{v}": np.stack([to_display(variants[v][0][j]) for j in rows]) for v in VARIANTS},
        })

    def reduce(self, data: ProbeData) -> Evidence:
        rows = data.rows
        swaps = _judged(data.tables["background_swaps"])
        fractions = data.arrays("background_masks")
        masks = dict(zip(fractions.keys["id"].astype(str), fractions.values["fraction"], strict=True)) if fractions is not None else {}
        located = pd.concat([self._region_rows(swaps), self._localise(self._maps, masks)], ignore_index=True)
        best_map_method, best_map_reason = self._best, self._best_reason
        chosen = REGION_METHOD if len(swaps) else best_map_method
        chosen_reason = REGION_REASON if len(swaps) else best_map_reason
        table = swaps.merge(rows[["id", "class", "domain"]], on="id", how="left") if len(swaps) else rows.iloc[:0][["id", "class", "domain"]]
        if chosen is not None and chosen != REGION_METHOD and len(located):
            picked = located[located["method"] == chosen].drop(columns="method")
            table = table.merge(picked, on="id", how="outer")
            missing = table["class"].isna()
            if missing.any():
                info = rows.set_index("id").loc[table.loc[missing, "id"], ["class", "domain"]]
                table.loc[missing, ["class", "domain"]] = info.to_numpy()
        table["method"] = chosen
        methods_table = located.merge(rows[["id", "class", "domain"]], on="id", how="left") if len(located) else located
        evidence = self._metrics(table, located, chosen)
        evidence.tables = {"background": table, "background_methods": methods_table}
        evidence.details = {
            "chosen": chosen,
            "chosen_reason": chosen_reason,
            "best_map_method": best_map_method,
            "best_map_reason": best_map_reason,
            "methods": sorted(located["method"].unique().tolist()) if len(located) else [],
            "swap_samples": int(len(swaps)),
            "classes": (summaries := self._class_summaries(table)),
            "explanations": {scope(class_=c): plain_words(c, v) for c, v in summaries.items()},
            "per_method": self._method_summaries(located),
            "galleries": self._galleries(table, data) if self.context.sample_images else {},
            "evidence_states": self._evidence_states(table, data) if self.context.sample_images else {},
        }
        if chosen is None:
            evidence.notes.append("No attribution method is trusted on this model, so background reliance is judged from the "
                                  "background swaps only.")
        return evidence

    @staticmethod
    def _localise(methods: dict[str, dict[str, np.ndarray]], fractions: dict[str, np.ndarray]) -> pd.DataFrame:
        frames = []
        for method, maps in methods.items():
            ids = [i for i in maps if i in fractions]
            if ids:
                stack = np.stack([maps[i] for i in ids]).astype(np.float32)
                frames.append(localisation(stack, np.stack([fractions[i] for i in ids])).assign(id=ids, method=method))
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
            columns=["outside_share", "background_area", "outside_ratio", "pointing_hit", "id", "method"])

    def _region_rows(self, swaps: pd.DataFrame) -> pd.DataFrame:
        """The object/background Shapley localisation, in the same shape as the map-based rows."""
        if swaps.empty:
            return pd.DataFrame()
        return swaps[["id", "outside_share", "background_area", "outside_ratio", "pointing_hit"]].assign(method=REGION_METHOD)

    def _metrics(self, table: pd.DataFrame, located: pd.DataFrame, chosen: str | None) -> Evidence:
        evidence = Evidence()
        names = self.context.classes
        groups = [(None, table), *table.groupby("class", sort=True)] if len(table) else []
        bg_only_calls = table.dropna(subset=["still_predicted"]) if "still_predicted" in table else table.iloc[:0]
        intervals = counterfactual_intervals(table, names, self.context.seed) if "correct_original" in table else {}
        for cls, g in groups:
            s = scope(class_=cls)
            if "outside_ratio" in g:
                ratio = g["outside_ratio"].dropna()
                if len(ratio):
                    evidence.add("background.outside_ratio", float(ratio.mean()), s, len(ratio))
                    evidence.add("background.outside_share", float(g["outside_share"].dropna().mean()), s, len(ratio))
                    evidence.add("background.pointing_game", float(g["pointing_hit"].dropna().mean()), s, len(ratio))
            if "correct_original" not in g:
                continue
            for variant in ("original", *VARIANTS):
                values = g[f"correct_{variant}"].dropna()
                if len(values):
                    evidence.add(f"background.{variant}_accuracy", float(values.astype(float).mean()), s, len(values))
            same, rand = g["correct_mixed_same"].dropna(), g["correct_mixed_rand"].dropna()
            if len(same) and len(rand):
                evidence.add("background.bg_gap", float(same.astype(float).mean() - rand.astype(float).mean()), s, min(len(same), len(rand)),
                             intervals.get(cls, {}).get("bg_gap"))
            flips = g["flipped"].dropna()
            if len(flips):
                evidence.add("background.flip_rate", float(flips.astype(float).mean()), s, len(flips))
            still = g["still_predicted"].dropna()
            if len(still) and cls is not None:
                others = bg_only_calls[bg_only_calls["class"] != cls]
                base = float((others["pred_only_bg_t"] == names.index(cls)).mean()) if len(others) else 0.0
                evidence.add("background.still_predicted", float(still.astype(float).mean()), s, len(still))
                evidence.add("background.only_bg_excess", float(still.astype(float).mean()) - base, s, len(still),
                             intervals.get(cls, {}).get("only_bg_excess"))
        for method, g in located.groupby("method", sort=True) if len(located) else []:
            ratio = g["outside_ratio"].dropna()
            if len(ratio):
                evidence.add("background.outside_ratio", float(ratio.mean()), scope(method=method), len(ratio))
        return evidence

    def _class_summaries(self, table: pd.DataFrame) -> dict[str, dict[str, Any]]:
        """Per class, the numbers behind the plain-words sentence under each flagged finding."""
        out = {}
        for cls, g in table.groupby("class", sort=True) if len(table) else []:
            def mean(column: str) -> float | None:
                values = g[column].dropna() if column in g else pd.Series(dtype=float)
                return float(values.astype(float).mean()) if len(values) else None
            out[str(cls)] = {
                "n": int(len(g)),
                "outside_share": mean("outside_share"),
                "background_area": mean("background_area"),
                "outside_ratio": mean("outside_ratio"),
                "original_accuracy": mean("correct_original"),
                "mixed_same_accuracy": mean("correct_mixed_same"),
                "mixed_rand_accuracy": mean("correct_mixed_rand"),
                "still_predicted": mean("still_predicted"),
                "flip_rate": mean("flipped"),
            }
        return out

    @staticmethod
    def _method_summaries(located: pd.DataFrame) -> list[dict[str, Any]]:
        return [{"method": m, "n": int(len(g)), "outside_share": float(g["outside_share"].mean()),
                 "outside_ratio": float(g["outside_ratio"].mean()), "pointing_game": float(g["pointing_hit"].mean())}
                for m, g in located.groupby("method", sort=True)] if len(located) else []

    def _bundle(self, candidates: ArrayTable, j: int, data: ProbeData) -> str:
        """One candidate's display images and every method's map as a content-addressed .npz artifact."""
        sample_id = str(candidates.keys["id"].iat[j])
        arrays = {name: values[j] for name, values in candidates.values.items()}
        arrays.update({f"map_{m}": maps[sample_id].astype(np.float16) for m, maps in self._maps.items() if sample_id in maps})
        return data.write_artifact(_npz_bytes(arrays), ".npz")

    def _answers(self, row: pd.Series) -> dict[str, str | None]:
        names = self.context.classes
        return {v: (names[int(row[f"pred_{v}"])] if row[f"pred_{v}"] >= 0 else None) for v in ("original", *VARIANTS)}

    def _evidence_states(self, table: pd.DataFrame, data: ProbeData) -> dict[str, dict[str, Any]]:
        """id -> the sample in the states it was judged in (its bundle, the model's answer on each
        counterfactual, the object's and the background's Shapley values), for every sample the
        background rules can name as evidence: the report shows the failure, not the untouched input."""
        candidates = data.arrays("background_gallery")
        if table.empty or candidates is None or not self.params.evidence_per_class:
            return {}
        rows = table.set_index("id")
        chosen = np.unique(np.concatenate([_first_by(candidates.keys, column, self.params.evidence_per_class) for column in EVIDENCE_ORDERS]))
        states: dict[str, dict[str, Any]] = {}
        for j in chosen:
            sample_id = str(candidates.keys["id"].iat[j])
            row = rows.loc[sample_id]
            states[sample_id] = {
                "artifact": self._bundle(candidates, j, data),
                "predictions": self._answers(row),
                "phi_object": _finite(row.get("phi_object")),
                "phi_background": _finite(row.get("phi_background")),
                "outside_ratio": _finite(row.get("outside_ratio")),
            }
        return states

    def _galleries(self, table: pd.DataFrame, data: ProbeData) -> dict[str, list[dict[str, Any]]]:
        """For the classes that lean on the background most, their worst samples as small array bundles
        (input, mask, every map, the counterfactuals); the report draws them."""
        candidates = data.arrays("background_gallery")
        if table.empty or self.params.gallery_classes == 0 or candidates is None:
            return {}
        score = table.assign(rank_ratio=table.get("outside_ratio", pd.Series(np.nan, index=table.index)).fillna(0.0),
                             rank_flip=table["flipped"].astype("Float64").fillna(0.0) if "flipped" in table else 0.0)
        ranking = score.groupby("class")[["rank_ratio", "rank_flip"]].mean().assign(rank_key=lambda f: f["rank_ratio"] + f["rank_flip"])
        rows = table.set_index("id")
        best = _best_candidates(candidates.keys, self.params.gallery_per_class)
        galleries: dict[str, list[dict[str, Any]]] = {}
        for cls in ranking.sort_values("rank_key", ascending=False).index[: self.params.gallery_classes]:
            entries = []
            for j in best[candidates.keys["class"].iloc[best].to_numpy() == str(cls)]:
                sample_id = str(candidates.keys["id"].iat[j])
                ratio = float(candidates.keys["ratio"].iat[j])
                entries.append({
                    "id": sample_id,
                    "artifact": self._bundle(candidates, j, data),
                    "outside_ratio": ratio if ratio >= 0 else None,
                    "predictions": self._answers(rows.loc[sample_id]),
                })
            galleries[str(cls)] = entries
        return galleries


ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """The arrays as a compressed .npz whose bytes depend on the arrays alone: every entry carries
    the same fixed zip timestamp (np.savez_compressed leaves it to zipfile, which may stamp the clock),
    so the content-addressed artifact name is the same on every run. np.load reads it as usual."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, value in arrays.items():
            entry = zipfile.ZipInfo(f"{name}.npy", date_time=ZIP_EPOCH)
            entry.compress_type = zipfile.ZIP_DEFLATED
            with archive.open(entry, "w", force_zip64=True) as fid:  # force_zip64 as numpy does (gh-10776)
                np.lib.format.write_array(fid, np.asanyarray(value), allow_pickle=False)
    return buffer.getvalue()


def _best_candidates(keys: pd.DataFrame, per_class: int) -> np.ndarray:
    """Row positions of each class's best `per_class` gallery candidates, best first: a heatmap,
    then the background ratio, then flipped, descending; earlier batches and rows first on ties."""
    order = keys.assign(_row=np.arange(len(keys))).sort_values(
        ["mapped", "ratio", "flipped", "batch", "position"], ascending=[False, False, False, True, True], kind="stable")
    return order.groupby("class", sort=False).head(per_class)["_row"].to_numpy()


EVIDENCE_ORDERS = ("flipped", "still", "ratio")  # the candidate keys of background.flipped, .still_predicted, .outside_ratio


def _first_by(keys: pd.DataFrame, column: str, per_class: int) -> np.ndarray:
    """Row positions of each class's first `per_class` candidates by `column` descending (negative:
    no value, never evidence), earlier batches and rows first on ties: the rule engine's order."""
    valid = keys.assign(_row=np.arange(len(keys)))
    valid = valid[valid[column] >= 0]
    order = valid.sort_values([column, "batch", "position"], ascending=[False, True, True], kind="stable")
    return order.groupby("class", sort=False).head(per_class)["_row"].to_numpy()


def _finite(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None


def _judged(swaps: pd.DataFrame) -> pd.DataFrame:
    """Which answers on the swapped images are correct, flipped and still predicted."""
    if swaps.empty:
        return pd.DataFrame()
    table = swaps.copy()
    ok_orig = table["pred_original"] == table["reference"]
    for variant in VARIANTS:
        pred = table[f"pred_{variant}"]
        table[f"correct_{variant}"] = pd.array(np.where(pred >= 0, pred == table["reference"], False), dtype="boolean")
        table.loc[pred < 0, f"correct_{variant}"] = pd.NA
    table["correct_original"] = ok_orig
    rand = table["pred_mixed_rand"]
    table["flipped"] = pd.array(np.where((rand >= 0) & ok_orig, rand != table["pred_original"], False), dtype="boolean")
    table.loc[(rand < 0) | ~ok_orig, "flipped"] = pd.NA
    table["still_predicted"] = table["correct_only_bg_t"]
    return table


BOOTSTRAP_REPLICATES = 1000  # resamples behind the BG-gap and object-removed intervals
INTERVAL_LEVEL = 0.95


def _answers_of(table: pd.DataFrame, column: str) -> tuple[np.ndarray, np.ndarray]:
    """(valid, correct) per row of a nullable boolean column: a missing variant counts for neither."""
    values = table[column]
    return values.notna().to_numpy(), values.fillna(False).astype(bool).to_numpy()


def counterfactual_intervals(table: pd.DataFrame, classes: list[str], seed: int, replicates: int = BOOTSTRAP_REPLICATES,
                             level: float = INTERVAL_LEVEL) -> dict[str | None, dict[str, tuple[float, float]]]:
    """Percentile-bootstrap intervals of the BG-gap (None: over every class; and per class) and of
    the object-removed excess (per class), from one set of resamples of the swapped samples.

    A bootstrap over samples, not an interval for two independent proportions (Newcombe/Wilson):
    the BG-gap's two accuracies are measured on the same objects, each pasted onto a background of
    its own class and of another, so they are paired and positively correlated, and an interval that
    treats them as independent comes out too wide to confirm anything. Newcombe's paired variant
    needs one complete 2x2 table per scope, which samples without a valid swap break; resampling
    whole samples keeps each object's answers together and handles those alike. The excess's two
    rates come from disjoint samples (this class's empty backgrounds, other classes'), which the same
    resamples treat as independent, as they are. Seeded with the run seed: the same run gives the
    same bounds.
    """
    if table.empty or "correct_mixed_same" not in table:
        return {}
    labels = table["class"].astype(object).to_numpy()
    same_valid, same_hit = _answers_of(table, "correct_mixed_same")
    rand_valid, rand_hit = _answers_of(table, "correct_mixed_rand")
    still_valid, still_hit = _answers_of(table, "still_predicted")
    called = table["pred_only_bg_t"].to_numpy() if "pred_only_bg_t" in table else np.full(len(table), -1)
    boot = Bootstrap(len(table), replicates if len(table) > 1 else 0, seed)
    columns: dict[tuple[str | None, str], int] = {}
    present = sorted({str(c) for c in labels if isinstance(c, str)})
    for cls in [None, *present]:
        member = np.ones(len(table), bool) if cls is None else labels == cls
        for name, valid, hit in (("same", same_valid, same_hit), ("rand", rand_valid, rand_hit)):
            columns[(cls, f"{name}_n")] = boot.add(member & valid)
            columns[(cls, f"{name}_hit")] = boot.add(member & valid & hit)
        if cls is not None and cls in classes:
            others = ~member & still_valid
            columns[(cls, "still_n")] = boot.add(member & still_valid)
            columns[(cls, "still_hit")] = boot.add(member & still_valid & still_hit)
            columns[(cls, "others_n")] = boot.add(others)
            columns[(cls, "others_hit")] = boot.add(others & (called == classes.index(cls)))
    sums = boot.replicate_sums()
    if not len(sums):
        return {}

    def share(cls: str | None, name: str) -> np.ndarray:
        hits, n = sums[:, columns[(cls, f"{name}_hit")]], sums[:, columns[(cls, f"{name}_n")]]
        with np.errstate(invalid="ignore", divide="ignore"):
            return hits / n  # NaN where a resample drew none: percentile_interval leaves it out

    out: dict[str | None, dict[str, tuple[float, float]]] = {}
    for cls in [None, *present]:
        out[cls] = {"bg_gap": percentile_interval(share(cls, "same") - share(cls, "rand"), level)}
        if (cls, "still_n") in columns:
            base = np.nan_to_num(share(cls, "others"), nan=0.0)  # no other class's empty background: base rate 0, as the estimate
            out[cls]["only_bg_excess"] = percentile_interval(share(cls, "still") - base, level)
    return out
