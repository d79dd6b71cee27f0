"""The embeddings section's view: projection scatter plots, the overlapping pairs, nearest-neighbour
galleries and the label-noise suspects, all from the saved `embeddings_neighbours` table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from audit.report.figures import BLUE, GREY, RED
from audit.report.run_files import Tables
from audit.report.views.base import ProbeView, register_view

TABLE = "embeddings_neighbours"
PROJECTIONS = (("tsne", "t-SNE"), ("pca", "PCA"), ("umap", "UMAP"))
CORRECTNESS = {"right": BLUE, "wrong": RED, "unlabelled": GREY}


@register_view
class EmbeddingsView(ProbeView):
    probe = "embeddings"

    def __init__(self, run_dir: Path, results: dict[str, Any], sample_images: bool, tables: Tables) -> None:
        super().__init__(run_dir, results, sample_images, tables)
        self.rows = self.table(TABLE)
        self.by_id = self.rows.set_index("id", drop=False) if self.rows is not None else None

    def headline(self, metrics: Any) -> list[dict[str, str]]:
        rows = []
        if metrics.get("embeddings.knn_agreement") is not None:
            rows.append({"label": "Nearest-neighbour label agreement (embedding)", "value": metrics.text("embeddings.knn_agreement"),
                         "n": _count(metrics.get("embeddings.knn_agreement", "global", "n"))})
        if metrics.get("embeddings.suspect_share") is not None:
            count = (self.details.get("suspects") or {}).get("count", 0)
            rows.append({"label": "Label-noise suspects", "value": f"{count:,} ({metrics.text('embeddings.suspect_share')})",
                         "n": _count(metrics.get("embeddings.suspect_share", "global", "n"))})
        return rows

    def facts(self, ids: set[str]) -> dict[str, str]:
        """id -> 'label → predicted; 8 of 10 neighbours: class'."""
        if self.by_id is None:
            return {}
        k = self.details.get("k", 10)
        out = {}
        for i in ids & set(self.by_id.index):
            row = self.by_id.loc[i]
            text = f"{self.label(row)} → {row['pred_name']}"
            if isinstance(row.get("neighbour_class"), str) and pd.notna(row.get("neighbour_share")):
                text += f"; {round(row['neighbour_share'] * k)} of {k} neighbours {row['neighbour_class']}"
            out[i] = text
        return out

    @staticmethod
    def label(row: pd.Series) -> str:
        return row["label_name"] if isinstance(row.get("label_name"), str) else "unlabelled"

    def scatters(self) -> list[dict[str, str]]:
        """Each projection coloured by class, by right / wrong, and by domain when there are several:
        {uri, title, caption}, one colouring after the other (t-SNE and PCA side by side)."""
        from audit.report.figures import data_uri, scatter

        rows = self.rows
        if rows is None or rows.empty:
            return []
        correct = rows["correct"]
        outcome = np.where(correct.isna(), "unlabelled", np.where(correct.fillna(False).astype(bool), "right", "wrong"))
        domains = rows["domain"].fillna("(none)").astype(str)
        classes = [c for c in self.results.get("model", {}).get("classes") or [] if c in set(rows["class"])] or None
        drawn = [(key, name) for key, name in PROJECTIONS if f"{key}_x" in rows and rows[f"{key}_x"].notna().any()]
        by_class, by_outcome, by_domain = [], [], []
        for key, name in drawn:
            x, y = rows[f"{key}_x"], rows[f"{key}_y"]
            axis = self._axes(key, name)
            by_class.append({"title": f"{name}, by class", "uri": data_uri(scatter(x, y, rows["class"].astype(str), classes, *axis)),
                             "caption": f"Each dot a sample, coloured by its label (the prediction where it has none): classes the "
                                        f"model keeps apart form separate islands; mixed colours mark classes it confuses. {self._reading(key)}"})
            by_outcome.append({"title": f"{name}, right and wrong",
                               "uri": data_uri(scatter(x, y, outcome, list(CORRECTNESS), *axis, colours=CORRECTNESS)),
                               "caption": "The same map coloured by whether the model is right: mistakes inside another class's "
                                          "island are confident confusions or wrong labels; mistakes on a border are hard cases."})
            if domains.nunique() > 1:
                by_domain.append({"title": f"{name}, by domain", "uri": data_uri(scatter(x, y, domains, sorted(domains.unique()), *axis)),
                                  "caption": "The same map coloured by domain: where one domain forms regions of its own, the model "
                                             "sees the domains differently (see the domain findings)."})
        return by_class + by_outcome + by_domain

    def _axes(self, key: str, name: str) -> tuple[str, str]:
        if key == "pca":
            explained = self.details.get("pca_explained") or []
            share = [f" ({100 * v:.0f}% of the variance)" if i < len(explained) else "" for i, v in enumerate(explained[:2] + [0, 0])]
            return f"PC 1{share[0]}", f"PC 2{share[1]}"
        return f"{name} 1", f"{name} 2"

    def _reading(self, key: str) -> str:
        if key == "tsne":
            return "t-SNE keeps neighbourhoods, not distances: read which points sit together, not how far apart islands are."
        if key == "pca":
            return "PCA keeps the directions of largest spread; classes that overlap here may still separate in later components."
        return ""

    def sample(self, sample_id: str) -> dict[str, Any]:
        """{id, label, pred, confidence, domain} of one sample, for a gallery caption."""
        if self.by_id is None or sample_id not in self.by_id.index:
            return {"id": sample_id, "label": "?", "pred": "?", "confidence": None, "domain": None}
        row = self.by_id.loc[sample_id]
        return {"id": sample_id, "label": self.label(row), "pred": row["pred_name"], "confidence": float(row["confidence"]),
                "domain": row["domain"] if isinstance(row["domain"], str) else None}

    def gallery(self) -> list[dict[str, Any]]:
        """The worst-agreeing samples beside their nearest neighbours, then the outliers."""
        out = []
        for entry in self.details.get("gallery") or []:
            out.append({"query": self.sample(entry["id"]), "why": f"{entry['agreement']:.0%} of its neighbours share its label",
                        "neighbours": [{**self.sample(n["id"]), "distance": n["distance"]} for n in entry["neighbours"]]})
        for sample_id in self.details.get("outliers") or []:
            if self.by_id is None or sample_id not in self.by_id.index:
                continue
            row = self.by_id.loc[sample_id]
            ids, distances = row["neighbours"], row["distances"]
            if ids is None:
                continue
            out.append({"query": self.sample(sample_id), "why": f"outlier: 10th neighbour at distance {row['kth_distance']:.3f}",
                        "neighbours": [{**self.sample(i), "distance": float(d)} for i, d in list(zip(ids, distances, strict=True))[:5]]})
        return out

    def suspects(self, limit: int | None = None) -> list[dict[str, Any]]:
        """The suspects, most suspicious first: {id, label, pred, confidence, neighbour_class, share, domain}."""
        rows = self.rows
        if rows is None or "suspect_rank" not in rows:
            return []
        chosen = rows[rows["suspect_rank"].notna()].sort_values("suspect_rank")
        if limit is not None:
            chosen = chosen.head(limit)
        return [{**self.sample(str(r["id"])), "neighbour_class": r["neighbour_class"], "share": float(r["neighbour_share"])}
                for _, r in chosen.iterrows()]


def _count(n: float | None) -> str:
    return "" if n is None else f"{int(n):,}"
