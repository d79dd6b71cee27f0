"""The background section's view: the galleries of each flagged class's worst samples."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import numpy as np

from audit.report.run_files import Tables, run_file
from audit.report.views.base import ProbeView, register_view

VARIANT_CAPTIONS = {"only_bg_t": "no object", "mixed_same": "own-class bg", "mixed_rand": "other-class bg"}
OCCLUSION_TITLE = "occlusion"


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
        self.shown = [r["method"] for r in rows if r.get("trusted")] + ["occlusion"]

    def strip(self, entry: dict[str, Any], true_class: str) -> dict[str, Any] | None:
        """{uri, panels} of one sample's strip, or None when images are withheld or the bundle is missing."""
        from audit.report.figures import sample_strip

        path = run_file(self.run_dir, entry["artifact"])
        if not self.sample_images or path is None:
            return None
        with np.load(path, allow_pickle=False) as bundle:
            arrays = {k: bundle[k] for k in bundle.files}
        mask = arrays["mask"]
        predictions = entry.get("predictions", {})
        panels = [{"image": arrays["input"], "outline": mask, "caption": f"{true_class} → {predictions.get('original') or '?'}"}]
        for method in self.shown:
            if f"map_{method}" in arrays:
                panels.append({"image": arrays["input"], "heat": arrays[f"map_{method}"].astype(float), "outline": mask,
                               "caption": self.titles.get(method, method)})
        for variant, caption in VARIANT_CAPTIONS.items():
            if f"variant_{variant}" in arrays:
                panels.append({"image": arrays[f"variant_{variant}"], "caption": f"{caption}: {predictions.get(variant) or 'n/a'}"})
        return {"uri": "data:image/png;base64," + base64.b64encode(sample_strip(panels)).decode("ascii"), "panels": len(panels)}
