"""Embeddings: how the model organises the data in its last hidden layer.

Stage one stores the `embedding` tap (the classifier head's input) of every sample, labelled or
not, as the `embeddings` array table, streamed to the run store in chunks; later probes (domain
shift, regression comparison) consume it. `reduce` then measures, on cosine distance with each
sample's own entry excluded:

- k-nearest-neighbour label agreement (k = 10), overall, per class and per class pair, and the
  silhouette per class: which classes the model keeps apart and which it mixes;
- label-noise suspects: labelled samples with most neighbours in one other class that the model
  also predicts; samples of a pair the model mixes are counted under the pair, not as suspects;
- outliers: a k-th neighbour distance beyond Tukey's far-out fence;
- PCA and t-SNE pictures (audit.metrics.projection).

Unlabelled samples get neighbours and outliers, not agreement: the agreement graph is searched
among the labelled samples only.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from pydantic import Field

from audit.metrics.declarations import ColumnSpec, MetricSpec, TableSpec
from audit.metrics.names import pair, scope
from audit.metrics.neighbours import (
    EXACT_LIMIT,
    Neighbours,
    ann_available,
    class_overlap,
    far_out,
    label_suspects,
    nearest,
    neighbour_label_counts,
    normalised,
    pair_agreement,
    silhouettes,
)
from audit.metrics.projection import TSNE_LIMIT, TSNE_MIN_SAMPLES, pca, tsne
from audit.probes.base import Evidence, MapOutput, Probe, ProbeData, ProbeParams, Taps
from audit.probes.registry import register
from audit.probes.sampling import detail_sample
from audit.store import ArrayTable

PAIRS_RECORDED = 10  # most overlapping class pairs recorded as metrics (and judged)
GALLERY_NEIGHBOURS = 5  # neighbours shown beside each gallery query


class EmbeddingsParams(ProbeParams):
    k: int = Field(default=10, ge=1, le=100, description="neighbours per sample")
    suspect_share: float = Field(default=0.6, gt=0, le=1, description="share of the neighbours in one other class that makes a sample a label-noise suspect (with the model predicting that class)")
    mixed_pair_below: float = Field(default=0.7, gt=0, le=1, description="pair agreement below which the model mixes a class pair: its samples are reported under the pair, not as suspects (the fail limit of rule embedding-class-overlap)")
    tsne: bool = Field(default=True, description="draw the t-SNE map (openTSNE)")
    tsne_limit: int = Field(default=TSNE_LIMIT, ge=TSNE_MIN_SAMPLES, description="samples t-SNE embeds; the rest are placed into its map")
    exact_limit: int = Field(default=EXACT_LIMIT, ge=100, description="samples searched exactly; above, HNSW (faiss-cpu, the `ann` extra) or a stratified subset")
    umap: bool = Field(default=False, description="also draw a UMAP map (umap-learn, the `umap` extra)")
    gallery: int = Field(default=8, ge=0, le=50, description="nearest-neighbour gallery rows (the worst-agreeing samples)")
    suspects_shown: int = Field(default=24, ge=0, le=200, description="suspects the report shows as thumbnails")


@register
class Embeddings(Probe):
    name = "embeddings"
    title = "Embedding clusters, neighbours and label-noise suspects"
    question = (
        "How does the model organise the data in its last hidden layer: which classes does it keep apart, "
        "which does it mix, and which samples sit among another class?"
    )
    Params = EmbeddingsParams
    references = [
        "van der Maaten, Hinton. Visualizing Data using t-SNE. JMLR 2008.",
        "Poličar, Stražar, Zupan. openTSNE: a modular Python library for t-SNE dimensionality reduction and embedding. 2019.",
        "Rousseeuw. Silhouettes: a graphical aid to the interpretation and validation of cluster analysis. 1987.",
        "Northcutt, Athalye, Mueller. Pervasive Label Errors in Test Sets Destabilize Machine Learning Benchmarks. 2021.",
        "Bahri, Jiang, Gupta. Deep k-NN for Noisy Labels. ICML 2020.",
    ]
    metrics = (
        MetricSpec("embeddings.n", ("global",), "count", "samples embedded"),
        MetricSpec("embeddings.dimensions", ("global",), "count", "width of the embedding"),
        MetricSpec("embeddings.knn_agreement", ("global", "class", "pair"), "percent",
                   "share of a sample's k nearest labelled neighbours that share its label (per pair: among the "
                   "neighbours two classes' samples have in the two classes)"),
        MetricSpec("embeddings.pair_overlap", ("pair",), "percent", "share of the two classes' neighbour slots the other class holds"),
        MetricSpec("embeddings.silhouette", ("global", "class"), "number", "mean silhouette (cosine) of the class's samples by label, -1 to 1"),
        MetricSpec("embeddings.suspect_share", ("global", "class"), "percent", "share of labelled samples that are label-noise suspects"),
        MetricSpec("embeddings.outlier_share", ("global",), "percent", "share of samples whose k-th neighbour is beyond the far-out fence"),
        MetricSpec("embeddings.pca_explained", ("global",), "percent", "variance the first two principal components explain"),
    )
    provides = (
        TableSpec("embeddings", "map", "the `embedding` tap of every sample (float32, one row per sample)", kind="array"),
        TableSpec("embeddings_neighbours", "reduce", "one row per sample: neighbours, agreement, suspect rank, outlier distance, projections", (
            ColumnSpec("agreement", "percent", "share of the k nearest labelled neighbours with the sample's label (empty when unlabelled)"),
            ColumnSpec("neighbour_share", "percent", "share of the neighbours in the most frequent other class"),
            ColumnSpec("suspect_rank", "number", "1 for the most suspicious label-noise suspect (empty for non-suspects)"),
            ColumnSpec("kth_distance", "number", "cosine distance to the k-th nearest neighbour"),
            ColumnSpec("outlier_distance", "number", "the k-th neighbour distance of an outlier (empty otherwise)"),
        )),
    )

    def taps(self) -> frozenset[str]:
        return frozenset({"embedding"})

    def map(self, batch, taps: Taps) -> MapOutput:  # type: ignore[no-untyped-def]
        embedding = np.asarray(taps["embedding"], dtype=np.float32).reshape(len(batch.ids), -1)
        probs = taps.probabilities
        pred = probs.argmax(axis=1)
        rows = pd.DataFrame({
            "id": batch.ids,
            "label": np.asarray(batch.labels, np.int64),
            "pred": pred.astype(np.int64),
            "confidence": probs[np.arange(len(pred)), pred].astype(np.float64),
            "domain": [s.domain for s in batch.samples],
        })
        return MapOutput(rows, {"embeddings": ArrayTable(pd.DataFrame({"id": batch.ids}), {"embedding": embedding})})

    def reduce(self, data: ProbeData) -> Evidence:
        stored = data.arrays("embeddings")
        rows = data.rows.reset_index(drop=True)
        evidence = Evidence()
        if stored is None or len(rows) == 0:
            evidence.notes.append("no sample was embedded")
            return evidence
        if list(stored.keys["id"].astype(str)) != list(rows["id"].astype(str)):
            raise ValueError("the stored embeddings do not follow the stage-one rows (their sample ids differ)")
        x = stored.values["embedding"]
        del stored
        self.context.say(f"embeddings: nearest neighbours, silhouettes and maps of {len(rows)} samples")
        return EmbeddingAnalysis(self, rows, x, evidence).run()


class EmbeddingAnalysis:
    """One reduce: the neighbour graphs, the metrics, the projections and the report's details."""

    def __init__(self, probe: Embeddings, rows: pd.DataFrame, x: np.ndarray, evidence: Evidence) -> None:
        self.params: EmbeddingsParams = probe.params  # type: ignore[assignment]
        self.seed = probe.context.seed
        self.classes = probe.context.classes
        self.rows = rows
        self.unit = normalised(x, in_place=True)  # the stored embedding, read for this reduce alone
        self.evidence = evidence
        names = np.asarray(self.classes, dtype=object)
        labels = rows["label"].to_numpy(np.int64)
        self.labels = labels
        self.labelled = labels >= 0
        self.pred = rows["pred"].to_numpy(np.int64)
        self.confidence = rows["confidence"].to_numpy(np.float64)
        self.names = names
        self.class_name = np.where(self.labelled, names[np.clip(labels, 0, None)], names[self.pred])
        self.table = pd.DataFrame({
            "id": rows["id"].astype(str),
            "class": self.class_name,
            "label_name": np.where(self.labelled, names[np.clip(labels, 0, None)], None),
            "pred_name": names[self.pred],
            "correct": pd.array(np.where(self.labelled, labels == self.pred, False), dtype="boolean"),
            "confidence": self.confidence,
            "domain": rows["domain"],
        })
        self.table.loc[~self.labelled, "correct"] = pd.NA
        self.details: dict[str, Any] = {"k": self.params.k, "n": len(rows), "n_labelled": int(self.labelled.sum()),
                                        "dimensions": int(x.shape[1]),
                                        "suspect_neighbours": int(np.ceil(self.params.suspect_share * self.params.k - 1e-9))}

    def run(self) -> Evidence:
        ev = self.evidence
        ev.add("embeddings.n", len(self.rows))
        ev.add("embeddings.dimensions", self.unit.shape[1])
        searched = self._searched()
        self._agreement(searched, self._neighbours(searched))
        self._silhouette()
        self._projections()
        ev.details = self.details
        ev.tables["embeddings_neighbours"] = self.table
        ev.thumbnails = self._thumbnails()
        return ev

    def _rows(self, rows: np.ndarray) -> np.ndarray:
        """The unit embedding of `rows`: the array itself when they are all of them, in order (no copy)."""
        return self.unit if len(rows) == len(self.unit) and np.array_equal(rows, np.arange(len(self.unit))) else self.unit[rows]

    def _method(self, n: int) -> str:
        return "hnsw" if n > self.params.exact_limit and ann_available() else "exact"

    def _searched(self) -> np.ndarray:
        """Rows the neighbour search covers: all, or above the exact limit without faiss a stratified subset."""
        n = len(self.rows)
        if n <= self.params.exact_limit or ann_available():
            return np.arange(n)
        chosen = detail_sample(self.table.assign(_row=np.arange(n)), self.params.exact_limit, self.params.exact_limit, self.seed)
        self.evidence.notes.append(
            f"{n} samples are more than the {self.params.exact_limit} searched exactly and faiss-cpu is not installed "
            f"(pip install 'model-audit[ann]'): neighbours, agreement and suspects come from a stratified subset of "
            f"{len(chosen)} samples")
        return np.sort(chosen["_row"].to_numpy())

    def _neighbours(self, searched: np.ndarray) -> Neighbours:
        """Every searched sample's neighbours among all searched samples: outliers and galleries.
        Returns the search, which the agreement reuses when every searched sample is labelled."""
        found = nearest(self._rows(searched), self.params.k, self._method(len(searched)))
        self.details["search"] = {"method": found.method, "samples": int(len(searched))}
        ids = self.table["id"].to_numpy()
        neighbour_ids = [None] * len(self.table)
        distances = [None] * len(self.table)
        kth = np.full(len(self.table), np.nan)
        found_ids, found_distances = ids[searched][found.index].tolist(), found.distance.astype(float).round(6).tolist()
        for row, near, far in zip(searched.tolist(), found_ids, found_distances, strict=True):
            neighbour_ids[row], distances[row] = near, far
        if found.index.shape[1]:
            kth[searched] = found.distance[:, -1]
        self.table["neighbours"] = neighbour_ids
        self.table["distances"] = distances
        self.table["kth_distance"] = kth
        valid = kth[np.isfinite(kth)]
        fence = far_out(valid) if len(valid) >= 4 else float("inf")
        outlier = np.isfinite(kth) & (kth > fence)
        self.table["outlier_distance"] = np.where(outlier, kth, np.nan)
        self.details["outlier_fence"] = fence if np.isfinite(fence) else None
        self.details["outliers"] = self.table.loc[outlier].sort_values("kth_distance", ascending=False)["id"].head(self.params.gallery).tolist()
        if len(valid):
            self.evidence.add("embeddings.outlier_share", float(outlier.sum() / len(valid)), n=len(valid))
        return found

    def _agreement(self, searched: np.ndarray, searched_neighbours: Neighbours) -> None:
        """Agreement, pairs and suspects, on the labelled samples' neighbours among labelled samples."""
        p, ev = self.params, self.evidence
        graph_rows = searched[self.labelled[searched]]
        agreement = np.full(len(self.table), np.nan)
        for name in ("neighbour_class", "neighbour_share", "suspect_rank"):
            self.table[name] = np.nan if name != "neighbour_class" else None
        self.table["mixed_pair"] = pd.array([pd.NA] * len(self.table), dtype="boolean")
        if len(graph_rows) < 2:
            if not self.labelled.any():
                ev.notes.append("no sample has a label: neighbours and outliers are reported, agreement and suspects are not")
            return
        k = len(self.classes)
        labels = self.labels[graph_rows]
        if len(graph_rows) == len(searched):  # every searched sample labelled: the same search
            found = searched_neighbours
        else:
            found = nearest(self._rows(graph_rows), p.k, self._method(len(graph_rows)))
        counts = neighbour_label_counts(found.index, labels, k)
        width = max(found.index.shape[1], 1)
        own = counts[np.arange(len(labels)), labels] / width
        agreement[graph_rows] = own
        self.table["agreement"] = agreement
        ev.add("embeddings.knn_agreement", float(own.mean()), n=len(labels))
        for c, name in enumerate(self.classes):
            members = labels == c
            if members.any():
                ev.add("embeddings.knn_agreement", float(own[members].mean()), scope(class_=name), int(members.sum()))
        matrix = class_overlap(labels, counts, k)
        pairs = self._pairs(matrix, np.bincount(labels, minlength=k))
        mixed = {(r["a_index"], r["b_index"]) for r in pairs if r["mixed"]}
        suspects = label_suspects(labels, counts, self.pred[graph_rows], self.confidence[graph_rows], p.suspect_share, mixed)
        self.table.loc[graph_rows, "neighbour_class"] = self.names[suspects.neighbour_class]
        self.table.loc[graph_rows, "neighbour_share"] = suspects.neighbour_share
        self.table.loc[graph_rows, "suspect_rank"] = suspects.rank
        self.table.loc[graph_rows, "mixed_pair"] = suspects.in_pair
        for r in pairs:
            a, b = r["a_index"], r["b_index"]
            members = np.isin(labels, [a, b])
            r["mixed_samples"] = int((suspects.in_pair & members & np.isin(suspects.neighbour_class, [a, b])).sum())
        ev.add("embeddings.suspect_share", float(suspects.suspect.mean()), n=len(labels))
        for c, name in enumerate(self.classes):
            members = labels == c
            if members.any():
                ev.add("embeddings.suspect_share", float(suspects.suspect[members].mean()), scope(class_=name), int(members.sum()))
        order = np.argsort(suspects.rank[suspects.suspect])
        suspect_ids = self.table["id"].to_numpy()[graph_rows][suspects.suspect][order]
        self.details["suspects"] = {"count": int(suspects.suspect.sum()), "shown": suspect_ids[: p.suspects_shown].tolist(),
                                    "in_mixed_pairs": int(suspects.in_pair.sum())}
        self.details["pairs"] = pairs
        self.details["classes"] = [{"class": name, "n": int((labels == c).sum()),
                                    "agreement": ev.metrics.get(f"embeddings.knn_agreement@{scope(class_=name)}")}
                                   for c, name in enumerate(self.classes) if (labels == c).any()]
        self.details["gallery"] = self._gallery(graph_rows, own)

    def _pairs(self, matrix: np.ndarray, support: np.ndarray) -> list[dict[str, Any]]:
        """The PAIRS_RECORDED class pairs whose samples hold most of each other's neighbour slots."""
        k = len(self.classes)
        slots = matrix.sum(axis=1)
        out = []
        for a in range(k):
            for b in range(a + 1, k):
                cross = matrix[a, b] + matrix[b, a]
                if cross == 0:
                    continue
                out.append((cross / max(slots[a] + slots[b], 1), a, b))
        out.sort(key=lambda t: (-t[0], t[1], t[2]))
        rows = []
        for overlap, a, b in out[:PAIRS_RECORDED]:
            agreement = pair_agreement(matrix, a, b)
            where = pair(self.classes[a], self.classes[b])
            n = int(support[a] + support[b])
            self.evidence.add("embeddings.knn_agreement", agreement, where, n)
            self.evidence.add("embeddings.pair_overlap", float(overlap), where, n)
            rows.append({"a": self.classes[a], "b": self.classes[b], "a_index": a, "b_index": b, "n_a": int(support[a]),
                         "n_b": int(support[b]), "a_in_b": float(matrix[a, b] / max(slots[a], 1)),
                         "b_in_a": float(matrix[b, a] / max(slots[b], 1)), "overlap": float(overlap),
                         "agreement": agreement, "mixed": bool(agreement < self.params.mixed_pair_below)})
        return rows

    def _gallery(self, graph_rows: np.ndarray, own: np.ndarray) -> list[dict[str, Any]]:
        """The worst-agreeing labelled samples (ties: the more confident first), each with its nearest neighbours."""
        order = np.lexsort((-self.confidence[graph_rows], own))[: self.params.gallery]
        out = []
        for position in order:
            row = graph_rows[position]
            ids, distances = self.table.at[row, "neighbours"], self.table.at[row, "distances"]
            if ids is None:
                continue
            out.append({"id": str(self.table.at[row, "id"]), "agreement": float(own[position]),
                        "neighbours": [{"id": i, "distance": d} for i, d in list(zip(ids, distances, strict=True))[:GALLERY_NEIGHBOURS]]})
        return out

    def _silhouette(self) -> None:
        rows = np.flatnonzero(self.labelled)
        if len(np.unique(self.labels[rows])) < 2 or len(rows) < 3:
            return
        values = silhouettes(self._rows(rows), self.labels[rows], len(self.classes))
        self.evidence.add("embeddings.silhouette", float(values.mean()), n=len(rows))
        for c, name in enumerate(self.classes):
            members = self.labels[rows] == c
            if members.any():
                self.evidence.add("embeddings.silhouette", float(values[members].mean()), scope(class_=name), int(members.sum()))
        for entry in self.details.get("classes", []):
            entry["silhouette"] = self.evidence.metrics.get(f"embeddings.silhouette@{scope(class_=entry['class'])}")

    def _projections(self) -> None:
        p = self.params
        projected = pca(self.unit, self.seed)
        self.table["pca_x"], self.table["pca_y"] = projected.pca[:, 0], projected.pca[:, 1]
        explained = projected.explained
        self.details["pca_explained"] = [round(float(v), 6) for v in explained]
        self.evidence.add("embeddings.pca_explained", float(explained[:2].sum()), n=len(self.unit))
        n = len(self.unit)
        self.details["tsne"] = None
        if p.tsne and n >= TSNE_MIN_SAMPLES:
            fit = None
            if n > p.tsne_limit:
                chosen = detail_sample(self.table.assign(_row=np.arange(n)), p.tsne_limit, p.tsne_limit, self.seed)
                fit = np.sort(chosen["_row"].to_numpy())
            coordinates = tsne(projected.reduced, self.seed, fit)
            self.table["tsne_x"], self.table["tsne_y"] = coordinates[:, 0], coordinates[:, 1]
            fitted = n if fit is None else len(fit)
            self.details["tsne"] = {"fitted": fitted, "placed": n - fitted, "input_dimensions": int(projected.reduced.shape[1])}
            if fit is not None:
                self.evidence.notes.append(f"t-SNE embedded a stratified subset of {fitted} samples; the other {n - fitted} were placed "
                                           "into its map with openTSNE's transform")
        elif p.tsne:
            self.evidence.notes.append(f"t-SNE needs at least {TSNE_MIN_SAMPLES} samples; only PCA is drawn")
        if p.umap:
            self._umap(projected.reduced)

    def _umap(self, reduced: np.ndarray) -> None:
        try:
            import umap
        except ImportError:
            self.evidence.notes.append("UMAP was asked for but umap-learn is not installed (pip install 'model-audit[umap]')")
            return
        coordinates = umap.UMAP(n_components=2, random_state=self.seed).fit_transform(reduced)
        self.table["umap_x"], self.table["umap_y"] = coordinates[:, 0], coordinates[:, 1]

    def _thumbnails(self) -> list[str]:
        wanted: list[str] = []
        for entry in self.details.get("gallery", []):
            wanted.extend([entry["id"], *(n["id"] for n in entry["neighbours"])])
        wanted.extend((self.details.get("suspects") or {}).get("shown", []))
        for entry in self.details.get("outliers", []):
            wanted.append(entry)
            row = self.table.index[self.table["id"] == entry]
            if len(row) and self.table.at[row[0], "neighbours"] is not None:
                wanted.extend(self.table.at[row[0], "neighbours"][:GALLERY_NEIGHBOURS])
        return list(dict.fromkeys(wanted))
