"""Nearest neighbours in a model's feature space, and what they say about classes and labels.

Distances are cosine distances (1 - cosine similarity) between embeddings, with each sample's own
entry excluded from its neighbours. Exact search up to EXACT_LIMIT samples: brute force over the
L2-normalised rows, one matrix product and top-k per block of rows (faiss's flat index when faiss-cpu,
the `ann` extra, is installed, else torch's; scikit-learn's brute-force search, the reference the
tests check both against, takes 28 s for 50k x 128 on two cores where torch takes 10 s and faiss 4 s:
the top-k selection, not the product, is the cost). Beyond it an HNSW index (faiss) when installed.
Imports torch only inside the search, so the metrics stay importable where torch is not loaded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

EXACT_LIMIT = 50_000  # samples searched exactly; above it HNSW (faiss) or a stratified subset
BLOCK_BYTES = 64 << 20  # similarities one block of rows holds during the exact search
HNSW_LINKS = 32  # faiss HNSW graph degree (M)
HNSW_SEARCH = 128  # efSearch: recall@10 about 0.995 on 60k x 128 (issue 12's measurement)


@dataclass
class Neighbours:
    """`index[i]` the k nearest other samples of row i (nearest first), `distance[i]` their cosine distances."""

    index: np.ndarray  # N x k, int64
    distance: np.ndarray  # N x k, float32
    method: str  # "exact" | "hnsw"


def normalised(x: np.ndarray, in_place: bool = False) -> np.ndarray:
    """Rows scaled to unit length (an all-zero row stays zero: cosine distance 1 to everything).
    `in_place` scales a float32 array where it lies, so a whole run's embedding is not held twice."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    if in_place:
        x /= norms
        return x
    return x / norms


def ann_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def nearest(x: np.ndarray, k: int, method: str = "exact") -> Neighbours:
    """The k nearest other rows of every row of `x` by cosine distance."""
    n = len(x)
    k = min(k, n - 1)
    if k < 1:
        return Neighbours(np.zeros((n, 0), np.int64), np.zeros((n, 0), np.float32), method)
    unit = normalised(x)
    if method == "hnsw":
        index, distance = _hnsw(unit, k + 1)
    elif ann_available():
        index, distance = _flat(unit, k + 1)
    else:
        index, distance = _blocks(unit, k + 1)
    index, distance = _without_self(np.asarray(index, np.int64), np.asarray(distance, np.float32), k)
    return Neighbours(index, np.clip(distance, 0.0, 2.0), method)


def _hnsw(unit: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    graph = faiss.IndexHNSWFlat(unit.shape[1], HNSW_LINKS, faiss.METRIC_INNER_PRODUCT)
    graph.hnsw.efSearch = max(HNSW_SEARCH, k)
    data = np.ascontiguousarray(unit, dtype=np.float32)
    graph.add(data)
    similarity, index = graph.search(data, k)
    return index, 1.0 - similarity


def _flat(unit: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact: faiss's brute-force inner-product index."""
    import faiss

    flat = faiss.IndexFlatIP(unit.shape[1])
    data = np.ascontiguousarray(unit, dtype=np.float32)
    flat.add(data)
    similarity, index = flat.search(data, k)
    return index, 1.0 - similarity


def _blocks(unit: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact: per block of rows, the similarities to every row and their top k (torch, on the CPU)."""
    import torch

    n = len(unit)
    rows = torch.from_numpy(np.ascontiguousarray(unit, dtype=np.float32))
    index, distance = np.empty((n, k), np.int64), np.empty((n, k), np.float32)
    block = max(1, BLOCK_BYTES // (4 * n))
    with torch.inference_mode():
        for start in range(0, n, block):
            similarity, found = torch.topk(rows[start : start + block] @ rows.T, k, dim=1)
            index[start : start + block] = found.numpy()
            distance[start : start + block] = 1.0 - similarity.numpy()
    return index, distance


def _without_self(index: np.ndarray, distance: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Drop each row's own entry; where duplicates pushed it out of the k+1 found, drop the farthest."""
    rows = np.arange(len(index))[:, None]
    is_self = index == rows
    missing = ~is_self.any(axis=1)
    is_self[missing, -1] = True
    keep = ~is_self
    return index[keep].reshape(len(index), k), distance[keep].reshape(len(index), k)


def neighbour_label_counts(index: np.ndarray, labels: np.ndarray, classes: int) -> np.ndarray:
    """N x K: how many of each row's neighbours carry each label."""
    counts = np.zeros((len(index), classes), np.int64)
    if index.size:
        np.add.at(counts, (np.repeat(np.arange(len(index)), index.shape[1]), labels[index].ravel()), 1)
    return counts


def class_overlap(labels: np.ndarray, counts: np.ndarray, classes: int) -> np.ndarray:
    """K x K: `[a, b]` the neighbour slots of class a's samples that class b's samples hold."""
    matrix = np.zeros((classes, classes), np.int64)
    np.add.at(matrix, labels, counts)
    return matrix


def pair_agreement(matrix: np.ndarray, a: int, b: int) -> float:
    """Among the neighbours that samples of a or b have in a or b, the share with the sample's own
    label: 1 when the two never mix, about 0.5 when the model cannot tell them apart."""
    own = matrix[a, a] + matrix[b, b]
    total = own + matrix[a, b] + matrix[b, a]
    return float(own / total) if total else float("nan")


@dataclass
class Suspects:
    """Labelled samples whose neighbours and prediction agree on another class than their label."""

    neighbour_class: np.ndarray  # N: the most frequent other class among the neighbours
    neighbour_share: np.ndarray  # N: its share of the k neighbours
    suspect: np.ndarray  # N bool: label noise suspects
    in_pair: np.ndarray  # N bool: would be suspects, but their (label, class) pair is one the model mixes
    rank: np.ndarray  # N float: 1 = most suspicious; NaN for non-suspects


def label_suspects(labels: np.ndarray, counts: np.ndarray, predictions: np.ndarray, confidence: np.ndarray,
                   min_share: float, confused: set[tuple[int, int]]) -> Suspects:
    """A sample is a suspect when at least `min_share` of its neighbours belong to one class c other
    than its label and the model predicts c. Suspects are ranked by that share, then by the model's
    confidence. A sample whose (label, c) pair is in `confused` (pairs the model cannot separate)
    is counted under the pair instead: there the mixing is the model's, not the label's."""
    k = counts.sum(axis=1)
    others = counts.copy()
    others[np.arange(len(labels)), labels] = -1
    neighbour_class = others.argmax(axis=1)
    share = np.where(k > 0, others[np.arange(len(labels)), neighbour_class] / np.maximum(k, 1), 0.0)
    candidate = (share >= min_share - 1e-9) & (predictions == neighbour_class)
    pair_member = np.array([(min(a, c), max(a, c)) in confused for a, c in zip(labels, neighbour_class, strict=True)], bool)
    suspect = candidate & ~pair_member
    rank = np.full(len(labels), np.nan)
    chosen = np.flatnonzero(suspect)
    order = chosen[np.lexsort((-confidence[chosen], -share[chosen]))]
    rank[order] = np.arange(1, len(order) + 1)
    return Suspects(neighbour_class, share, suspect, candidate & pair_member, rank)


def silhouettes(unit: np.ndarray, labels: np.ndarray, classes: int) -> np.ndarray:
    """Each row's silhouette under cosine distance, as scikit-learn's `silhouette_samples(metric="cosine")`
    computes it, in O(N K d) instead of O(N^2 d): on unit rows the mean distance to a class is one
    minus the dot product with the class's sum, divided by its size (the row itself left out of its
    own class). Rows of a class with one member score 0, as in scikit-learn."""
    labels = np.asarray(labels, np.int64)
    sums = np.zeros((classes, unit.shape[1]), np.float64)
    np.add.at(sums, labels, unit)
    sizes = np.bincount(labels, minlength=classes).astype(np.float64)
    dots = unit.astype(np.float64) @ sums.T  # N x K: sum of similarities to each class
    rows = np.arange(len(labels))
    self_similarity = np.einsum("ij,ij->i", unit, unit).astype(np.float64)  # 1, or 0 for an all-zero row
    own_size = sizes[labels]
    inside = (own_size - 1 - dots[rows, labels] + self_similarity) / np.maximum(own_size - 1, 1)
    mean = np.where(sizes > 0, (sizes - dots) / np.maximum(sizes, 1), np.inf)
    mean[rows, labels] = np.inf
    nearest_other = mean.min(axis=1)
    values = (nearest_other - inside) / np.maximum(np.maximum(inside, nearest_other), 1e-12)
    return np.where(own_size > 1, values, 0.0)


def far_out(values: np.ndarray) -> float:
    """Tukey's far-out fence, Q3 + 3 IQR: a k-th neighbour distance above it is an outlier."""
    q1, q3 = np.percentile(values, [25, 75])
    return float(q3 + 3.0 * (q3 - q1))
