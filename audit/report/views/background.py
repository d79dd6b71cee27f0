"""The background section's view: galleries of each flagged class's worst samples, and each
background finding's evidence in the state in which it failed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from audit.report.run_files import Tables, run_file
from audit.report.views.base import ProbeView, register_view

VARIANT_CAPTIONS = {"only_bg_t": "no object", "mixed_same": "own-class bg", "mixed_rand": "other-class bg"}
OCCLUSION_TITLE = "occlusion"
REGION_METHOD = "object_background_shapley"  # the background probe's own localisation, from forward passes
REGION_TITLE = "object/bg Shapley"
# The counterfactual each background rule judges, by metric: the state its evidence failed in.
FAILED_STATE = {"background.bg_gap": "mixed_rand", "background.only_bg_excess": "only_bg_t", "background.outside_ratio": None}
EVIDENCE_PANEL_INCHES = 0.85  # two evidence strips side by side within an A4 finding card
GALLERY_PANEL_INCHES = 1.05  # six panels and the colour bar span the A4 text width


def gallery_anchor(true_class: str) -> str:
    return "gallery-" + "".join(ch if ch.isalnum() else "-" for ch in true_class)


@register_view
class BackgroundView(ProbeView):
    """Draws the sample bundles (input, mask, maps, counterfactuals) as image strips. The maps shown
    are the trusted attribution methods' and occlusion's, captioned with the short titles the
    attribution probe saved (runs from before short titles existed show the full title)."""

    probe = "background"

    def __init__(self, run_dir: Path, results: dict[str, Any], sample_images: bool, tables: Tables) -> None:
        super().__init__(run_dir, results, sample_images, tables)
        rows = results["probes"].get("attribution", {}).get("details", {}).get("methods", [])
        self.titles = {r["method"]: r.get("short_title") or r.get("title", r["method"]) for r in rows}
        self.titles["occlusion"] = OCCLUSION_TITLE
        ranked = sorted((r for r in rows if r.get("trusted")), key=lambda r: r.get("faithfulness_rank") or len(rows))
        self.trusted = [r["method"] for r in ranked]  # most faithful first
        self.shown = [*self.trusted, "occlusion"]
        self.states: dict[str, dict[str, Any]] = self.details.get("evidence_states", {})
        self.truth = self._truth()

    def _truth(self) -> dict[str, str]:
        table = self.table("predictions")
        if table is None or "label_name" not in table:
            return {}
        return {str(i): str(c) for i, c in zip(table["id"], table["label_name"], strict=True) if isinstance(c, str)}

    def _bundle(self, relative: str) -> dict[str, np.ndarray] | None:
        path = run_file(self.run_dir, relative)
        if not self.sample_images or path is None:
            return None
        with np.load(path, allow_pickle=False) as bundle:
            return {k: bundle[k] for k in bundle.files}

    def strip(self, entry: dict[str, Any], true_class: str) -> dict[str, Any] | None:
        """One row of six: the input (true → predicted), the most faithful trusted method's map and
        occlusion's, then the object removed and on backgrounds of its own and another class with the
        model's answers. {uri, panels, width_mm}, or None when images are withheld or the bundle is missing."""
        return self._strip(entry, true_class, [*self.trusted[:1], "occlusion"], variants=True)

    def methods_strip(self, entry: dict[str, Any], true_class: str) -> dict[str, Any] | None:
        """The same sample under every trusted method and occlusion, to compare the maps."""
        return self._strip(entry, true_class, self.shown, variants=False)

    def _strip(self, entry: dict[str, Any], true_class: str, methods: list[str], variants: bool) -> dict[str, Any] | None:
        from audit.report.figures import sample_strip

        arrays = self._bundle(entry["artifact"])
        if arrays is None:
            return None
        mask = arrays["mask"]
        predictions = entry.get("predictions", {})
        panels = [{"image": arrays["input"], "outline": mask, "caption": f"{true_class} →\n{predictions.get('original') or '?'}"}]
        for method in methods:
            if f"map_{method}" in arrays:
                panels.append({"image": arrays["input"], "heat": arrays[f"map_{method}"].astype(float), "outline": mask,
                               "caption": self.titles.get(method, method)})
        for variant, caption in VARIANT_CAPTIONS.items() if variants else ():
            if f"variant_{variant}" in arrays:
                panels.append({"image": arrays[f"variant_{variant}"], "caption": f"{caption}:\n{predictions.get(variant) or 'n/a'}"})
        if len(panels) < 2:
            return None
        picture = sample_strip(panels, size=GALLERY_PANEL_INCHES)
        return {"uri": picture.uri, "panels": len(panels), "width_mm": round(picture.width_mm, 1)}

    def evidence_image(self, finding: dict[str, Any], sample_id: str) -> dict[str, Any] | None:
        """Original (true → predicted), the failed counterfactual with the model's answer on it, and
        the trusted heatmap: a trusted attribution method's map where the sample has one, else the
        object/background Shapley split the finding was judged by, spread over each region."""
        from audit.report.figures import sample_strip

        if finding.get("metric") not in FAILED_STATE or sample_id not in self.states:
            return None
        state = self.states[sample_id]
        arrays = self._bundle(state["artifact"])
        if arrays is None:
            return None
        mask = np.asarray(arrays["mask"], dtype=bool)
        answers = state.get("predictions", {})
        truth = self.truth.get(sample_id, "?")
        panels = [{"image": arrays["input"], "outline": mask, "caption": f"original\n{truth} → {answers.get('original') or '?'}"}]
        variant = FAILED_STATE[finding["metric"]]
        captions = []
        if variant and f"variant_{variant}" in arrays:
            panels.append({"image": arrays[f"variant_{variant}"], "caption": f"{VARIANT_CAPTIONS[variant]}\n→ {answers.get(variant) or 'n/a'}"})
            captions.append(f"{VARIANT_CAPTIONS[variant]}: {answers.get(variant) or 'n/a'}")
        heat, title = self._heat(arrays, state, mask, judged=finding["metric"] == "background.outside_ratio")
        if heat is not None:
            panels.append({"image": arrays["input"], "heat": heat, "outline": mask, "caption": title})
        if state.get("outside_ratio") is not None:
            captions.append(f"ratio {state['outside_ratio']:.2f}")
        picture = sample_strip(panels, size=EVIDENCE_PANEL_INCHES)
        return {"uri": picture.uri, "width_mm": round(picture.width_mm, 1),
                "caption": f"{sample_id}: {truth} → {answers.get('original') or '?'}" + "".join(f"; {c}" for c in captions)}

    def _heat(self, arrays: dict[str, np.ndarray], state: dict[str, Any], mask: np.ndarray, judged: bool) -> tuple[np.ndarray | None, str]:
        """The map of the method background reliance was judged by when `judged`, else the most
        faithful trusted attribution method's (the object/background Shapley split where neither exists)."""
        chosen = self.details.get("chosen")
        methods = ([chosen] if chosen and chosen != REGION_METHOD else []) if judged else self.trusted
        for method in methods:
            if f"map_{method}" in arrays:
                return arrays[f"map_{method}"].astype(float), self.titles.get(method, method)
        phi_object, phi_background = state.get("phi_object"), state.get("phi_background")
        if phi_object is None or phi_background is None or not mask.any() or mask.all():
            return None, ""
        per_pixel = np.where(mask, phi_object / mask.mean(), phi_background / (1 - mask.mean()))
        return per_pixel, REGION_TITLE

    def class_anchor(self, true_class: str) -> str:
        return gallery_anchor(true_class)

    def gallery_anchor(self, finding: dict[str, Any]) -> str | None:
        true_class = finding.get("scope_parts", {}).get("class")
        if true_class is None or true_class not in self.details.get("galleries", {}):
            return None
        return gallery_anchor(true_class)
