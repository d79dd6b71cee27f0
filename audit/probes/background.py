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
from typing import Any

import numpy as np
import pandas as pd
import torch
from pydantic import Field

from audit.backgrounds import counterfactuals
from audit.metrics.names import scope
from audit.probes.base import Evidence, Probe, ProbeParams, Taps
from audit.probes.model_functions import detail_batches, load_masks, probabilities_function, sample_rows, shrink
from audit.probes.registry import register
from audit.probes.sampling import detail_sample, id_rank
from audit.thumbnails import to_display

VARIANTS = ("only_bg_t", "mixed_same", "mixed_rand")
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
    after = ("attribution", "occlusion")
    profile_defaults = {"smoke": {"per_class": 24, "max_samples": 120, "batch_size": 64}, "thorough": {"per_class": 500, "max_samples": 5000}}
    references = [XIAO, POINTING, "Shapley. A Value for n-Person Games. 1953; Lundberg, Lee. A Unified Approach to Interpreting Model Predictions (SHAP). NeurIPS 2017."]
    units = {"background.outside_ratio": "ratio", "background.outside_share": "percent", "background.pointing_game": "percent",
             "background.bg_gap": "percent", "background.flip_rate": "percent", "background.only_bg_excess": "percent",
             "background.still_predicted": "percent"}

    def skip_reason(self) -> str | None:
        if not self.context.manifest.has_masks:
            return "the manifest has no usable `mask` column: background reliance needs a foreground mask per image"
        return None

    def map(self, batch, taps: Taps) -> pd.DataFrame:  # type: ignore[no-untyped-def]
        return sample_rows(batch, taps, self.context.classes)

    def reduce(self, rows: pd.DataFrame) -> Evidence:
        masked = rows[rows["has_mask"]]
        methods, best_map_method, best_map_reason = self._methods()
        mapped = set().union(*(maps.keys() for maps in methods.values())) if methods else set()
        swaps = self._swaps(detail_sample(masked, self.params.per_class, self.params.max_samples, self.context.seed + 1), mapped)
        located = pd.concat([self._region_rows(swaps), self._localise(methods, set(masked["id"]))], ignore_index=True)
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
        self.table = table
        self.methods_table = located.merge(rows[["id", "class", "domain"]], on="id", how="left") if len(located) else located
        evidence = self._metrics(table, located, chosen)
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
            "galleries": self._galleries(table, methods) if self.context.sample_images else {},
        }
        if chosen is None:
            evidence.notes.append("No attribution method is trusted on this model, so background reliance is judged from the "
                                  "background swaps only.")
        return evidence

    def _methods(self) -> tuple[dict[str, dict[str, np.ndarray]], str | None, str]:
        """Maps handed over by the attribution and occlusion probes, and the most faithful trusted one."""
        handoff = self.context.handoff
        maps: dict[str, dict[str, np.ndarray]] = {}
        candidates: list[tuple[float, str, str]] = []
        attribution = handoff.get("attribution")
        if attribution:
            for method, method_maps in attribution["maps"].items():
                maps[method] = method_maps
            for method in attribution["trusted"]:
                row = attribution["methods"][method]
                candidates.append((row["faithfulness"], method, f"{row['title']}, the most faithful trusted attribution method"))
        occlusion = handoff.get("occlusion")
        if occlusion and occlusion["maps"]:
            maps["occlusion"] = occlusion["maps"]
            if occlusion["faithfulness"] is not None and occlusion["faithfulness"] > 0:
                candidates.append((occlusion["faithfulness"], "occlusion",
                                   "occlusion, which needs only forward passes and deletes evidence faster than random order"))
        if not candidates:
            return maps, None, "no trusted method"
        faith, method, reason = max(candidates)
        return maps, method, f"Judged by {reason} (faithfulness {faith:.3f})."

    def _localise(self, methods: dict[str, dict[str, np.ndarray]], masked_ids: set[str]) -> pd.DataFrame:
        wanted = sorted(masked_ids & set().union(*(maps.keys() for maps in methods.values()))) if methods else []
        samples = [s for s in self.context.manifest.samples if s.id in set(wanted)]
        full, ok = load_masks(samples, self.context.prep.input_size)
        fractions: dict[str, np.ndarray] = {}
        if ok.any():  # every map has the same size, so each mask is shrunk once
            side = max(next(m[i] for m in methods.values() for i in m).shape)
            fractions = dict(zip([s.id for s, k in zip(samples, ok, strict=True) if k], shrink(full[ok].astype(np.float32), side), strict=True))
        frames = []
        for method, maps in methods.items():
            ids = [i for i in maps if i in fractions]
            if ids:
                stack = np.stack([maps[i] for i in ids]).astype(np.float32)
                frames.append(localisation(stack, np.stack([fractions[i] for i in ids])).assign(id=ids, method=method))
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
            columns=["outside_share", "background_area", "outside_ratio", "pointing_hit", "id", "method"])

    def _swaps(self, chosen: pd.DataFrame, mapped: set[str]) -> pd.DataFrame:
        """Predictions on only-bg-t, mixed-same and mixed-rand versions of each chosen image (per domain).

        Keeps, per class, display copies of only the few samples a gallery could show (those with
        heatmaps first, then the highest background ratio): memory stays bounded on large audits."""
        context = self.context
        self._candidates: dict[str, list[tuple[tuple[bool, float, float], str, dict[str, np.ndarray]]]] = {}
        if chosen.empty:
            return pd.DataFrame()
        forward = probabilities_function(context)
        names = context.classes
        frames = []
        bar = context.progress(total=len(chosen), desc="background swaps", unit="sample")
        for _, group in chosen.groupby(chosen["domain"].fillna(""), sort=True):
            group = group.iloc[np.argsort(id_rank(group["id"], context.seed), kind="stable")]  # mix classes within each chunk
            for block, samples, raw, _ in detail_batches(context, group, self.params.batch_size):
                masks, ok = load_masks(samples, context.prep.input_size)
                if not ok.any():
                    continue
                samples, raw, masks, block = [s for s, k in zip(samples, ok, strict=True) if k], raw[ok], masks[ok], block[ok].reset_index(drop=True)
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
                frames.append(frame)
                if context.sample_images and self.params.gallery_per_class:
                    self._keep_candidates(frame, raw, masks, variants, mapped)
                bar.update(len(samples))
        bar.close()
        table = pd.concat(frames, ignore_index=True)
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

    def _region_rows(self, swaps: pd.DataFrame) -> pd.DataFrame:
        """The object/background Shapley localisation, in the same shape as the map-based rows."""
        if swaps.empty:
            return pd.DataFrame()
        return swaps[["id", "outside_share", "background_area", "outside_ratio", "pointing_hit"]].assign(method=REGION_METHOD)

    def _keep_candidates(self, frame: pd.DataFrame, raw: np.ndarray, masks: np.ndarray,
                         variants: dict[str, tuple[np.ndarray, np.ndarray]], mapped: set[str]) -> None:
        names = self.context.classes
        flipped = (frame["pred_original"] == frame["reference"]) & (frame["pred_mixed_rand"] >= 0) & (frame["pred_mixed_rand"] != frame["pred_original"])
        for j, row in enumerate(frame.itertuples()):
            key = (row.id in mapped, 0.0 if pd.isna(row.outside_ratio) else float(row.outside_ratio), float(flipped.iloc[j]))
            kept = self._candidates.setdefault(names[int(row.reference)], [])
            if len(kept) < self.params.gallery_per_class or key > min(k for k, _, _ in kept):
                bundle = {"input": to_display(raw[j]), "mask": masks[j], **{f"variant_{v}": to_display(variants[v][0][j]) for v in VARIANTS}}
                kept.append((key, row.id, bundle))
                kept.sort(key=lambda item: item[0], reverse=True)
                del kept[self.params.gallery_per_class :]

    def _metrics(self, table: pd.DataFrame, located: pd.DataFrame, chosen: str | None) -> Evidence:
        evidence = Evidence()
        names = self.context.classes
        groups = [(None, table), *table.groupby("class", sort=True)] if len(table) else []
        bg_only_calls = table.dropna(subset=["still_predicted"]) if "still_predicted" in table else table.iloc[:0]
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
                evidence.add("background.bg_gap", float(same.astype(float).mean() - rand.astype(float).mean()), s, min(len(same), len(rand)))
            flips = g["flipped"].dropna()
            if len(flips):
                evidence.add("background.flip_rate", float(flips.astype(float).mean()), s, len(flips))
            still = g["still_predicted"].dropna()
            if len(still) and cls is not None:
                others = bg_only_calls[bg_only_calls["class"] != cls]
                base = float((others["pred_only_bg_t"] == names.index(cls)).mean()) if len(others) else 0.0
                evidence.add("background.still_predicted", float(still.astype(float).mean()), s, len(still))
                evidence.add("background.only_bg_excess", float(still.astype(float).mean()) - base, s, len(still))
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

    def _galleries(self, table: pd.DataFrame, methods: dict[str, dict[str, np.ndarray]]) -> dict[str, list[dict[str, Any]]]:
        """For the classes that lean on the background most, their worst samples as small array bundles
        (input, mask, every map, the counterfactuals); the report draws them."""
        if table.empty or self.params.gallery_classes == 0:
            return {}
        score = table.assign(rank_ratio=table.get("outside_ratio", pd.Series(np.nan, index=table.index)).fillna(0.0),
                             rank_flip=table["flipped"].astype("Float64").fillna(0.0) if "flipped" in table else 0.0)
        ranking = score.groupby("class")[["rank_ratio", "rank_flip"]].mean().assign(rank_key=lambda f: f["rank_ratio"] + f["rank_flip"])
        rows = table.set_index("id")
        names = self.context.classes
        galleries: dict[str, list[dict[str, Any]]] = {}
        for cls in ranking.sort_values("rank_key", ascending=False).index[: self.params.gallery_classes]:
            entries = []
            for (_, ratio, _), sample_id, bundle in self._candidates.get(str(cls), []):
                arrays = dict(bundle)
                arrays.update({f"map_{m}": maps[sample_id].astype(np.float16) for m, maps in methods.items() if sample_id in maps})
                buffer = io.BytesIO()
                np.savez_compressed(buffer, **arrays)
                row = rows.loc[sample_id]
                entries.append({
                    "id": sample_id,
                    "artifact": self.context.store.write_artifact(buffer.getvalue(), ".npz"),
                    "outside_ratio": ratio,
                    "predictions": {v: (names[int(row[f"pred_{v}"])] if row[f"pred_{v}"] >= 0 else None) for v in ("original", *VARIANTS)},
                })
            galleries[str(cls)] = entries
        return galleries

    def write_tables(self, rows: pd.DataFrame, store) -> dict:  # type: ignore[no-untyped-def]
        return {self.name: store.write_table(self.name, self.table),
                "background_methods": store.write_table("background_methods", self.methods_table)}
