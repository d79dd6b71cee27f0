"""Two-dimensional pictures of an embedding: PCA (with its explained variance) and t-SNE (openTSNE).

Both work on L2-normalised rows, so Euclidean distances in them follow the cosine distances the
neighbour metrics use. t-SNE runs on the PCA-reduced rows (PCA_DIMENSIONS), with a fixed seed.
Above TSNE_LIMIT samples a stratified subset of that size is embedded and every other sample is
placed into the finished map with openTSNE's `transform` (its neighbours in the subset fix its
place; the map itself does not move). Imports no torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

PCA_DIMENSIONS = 50  # the t-SNE input, and the explained variance the report shows
TSNE_LIMIT = 20_000  # samples t-SNE embeds itself; the rest are placed into its map
TSNE_MIN_SAMPLES = 10  # fewer give no meaningful neighbourhoods
PERPLEXITY = 30.0


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which containers and taskset narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


@dataclass
class Projection:
    pca: np.ndarray  # N x 2
    explained: np.ndarray  # explained variance ratio of each principal component kept
    reduced: np.ndarray  # N x d, the PCA-reduced rows (t-SNE's input)


def pca(unit: np.ndarray, seed: int, dimensions: int = PCA_DIMENSIONS) -> Projection:
    from sklearn.decomposition import PCA

    n, f = unit.shape
    d = max(1, min(dimensions, f, n - 1)) if n > 1 else 1
    if n < 2:
        return Projection(np.zeros((n, 2)), np.zeros(0), np.zeros((n, 1), np.float32))
    model = PCA(n_components=d, random_state=seed, svd_solver="auto").fit(unit)
    reduced = model.transform(unit).astype(np.float32)
    flat = np.zeros((n, 2), np.float32)
    flat[:, : min(2, d)] = reduced[:, :2]
    return Projection(flat, model.explained_variance_ratio_.astype(float), reduced)


def tsne(reduced: np.ndarray, seed: int, fit_rows: np.ndarray | None = None) -> np.ndarray:
    """N x 2 t-SNE coordinates; `fit_rows` (indices) are embedded, the others placed into their map."""
    from openTSNE import TSNE

    n = len(reduced)
    fit = np.arange(n) if fit_rows is None else np.asarray(fit_rows)
    perplexity = min(PERPLEXITY, max(2.0, (len(fit) - 1) / 3.0))
    model = TSNE(n_components=2, perplexity=perplexity, metric="euclidean", random_state=seed,
                 negative_gradient_method="auto", n_jobs=usable_cpus(), verbose=False)
    embedding = model.fit(np.ascontiguousarray(reduced[fit], dtype=np.float64))
    out = np.zeros((n, 2), np.float32)
    out[fit] = np.asarray(embedding)
    rest = np.setdiff1d(np.arange(n), fit)
    if len(rest):
        out[rest] = np.asarray(embedding.transform(np.ascontiguousarray(reduced[rest], dtype=np.float64)))
    return out
