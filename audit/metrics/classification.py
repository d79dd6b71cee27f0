"""Classification and calibration metrics as pure functions, plus a vectorised bootstrap.

Each point estimate is a ratio of weighted sums over samples, so one bootstrap replicate is one
vector of resampling counts, and all metrics of a replicate come from one sparse matrix product.
Tested against scikit-learn.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import sparse

ECE_BINS = 15


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows are true classes, columns predictions (scikit-learn's convention)."""
    index = labels.astype(np.int64) * num_classes + preds.astype(np.int64)
    return np.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def precision_recall_f1(confusion: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class precision, recall and F1; NaN where a class was never predicted / never present."""
    tp = np.diag(confusion).astype(float)
    predicted = confusion.sum(axis=0).astype(float)
    actual = confusion.sum(axis=1).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(predicted > 0, tp / predicted, np.nan)
        recall = np.where(actual > 0, tp / actual, np.nan)
        f1 = np.where(
            (predicted > 0) & (actual > 0),
            np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0),
            np.nan,
        )
    return precision, recall, f1


def calibration_bins(confidence: np.ndarray, n_bins: int = ECE_BINS) -> np.ndarray:
    """Equal-width bins over (0, 1]: bin b holds confidences in (b/n, (b+1)/n] (Guo et al. 2017)."""
    return np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """ECE = sum over bins of |mean confidence - accuracy| weighted by the bin's share of samples."""
    if len(confidence) == 0:
        return float("nan")
    bins = calibration_bins(confidence, n_bins)
    gap = np.bincount(bins, weights=confidence - correct.astype(float), minlength=n_bins)
    return float(np.abs(gap).sum() / len(confidence))


@dataclass
class ReliabilityBin:
    lower: float
    upper: float
    count: int
    confidence: float | None
    accuracy: float | None


def reliability_table(confidence: np.ndarray, correct: np.ndarray, n_bins: int = ECE_BINS) -> list[ReliabilityBin]:
    bins = calibration_bins(confidence, n_bins)
    counts = np.bincount(bins, minlength=n_bins)
    conf_sum = np.bincount(bins, weights=confidence, minlength=n_bins)
    acc_sum = np.bincount(bins, weights=correct.astype(float), minlength=n_bins)
    table = []
    for b in range(n_bins):
        n = int(counts[b])
        table.append(ReliabilityBin(b / n_bins, (b + 1) / n_bins, n,
                                    float(conf_sum[b] / n) if n else None, float(acc_sum[b] / n) if n else None))
    return table


class Bootstrap:
    """Weighted sums of many sample columns under shared bootstrap resamples.

    Every metric here is a function of sums over samples (counts, correct counts, per-bin gaps),
    so a replicate is one vector of resampling counts w and all its sums come from one sparse
    product w @ X. Columns are stored sparse, so 1000 classes x 50k samples stays small.
    """

    def __init__(self, n_samples: int, replicates: int, seed: int, chunk: int = 64) -> None:
        self.n = n_samples
        self.replicates = replicates
        self.seed = seed
        self.chunk = chunk
        self._data: list[np.ndarray] = []
        self._rows: list[np.ndarray] = []

    def add(self, values: np.ndarray) -> int:
        """Register a per-sample column; returns its index in the sums."""
        values = np.asarray(values, dtype=np.float64)
        rows = np.flatnonzero(values)
        self._rows.append(rows)
        self._data.append(values[rows])
        return len(self._rows) - 1

    def _matrix(self) -> sparse.csc_matrix:
        indptr = np.concatenate([[0], np.cumsum([len(r) for r in self._rows])])
        data = np.concatenate(self._data) if self._data else np.empty(0)
        rows = np.concatenate(self._rows) if self._rows else np.empty(0, np.int64)
        return sparse.csc_matrix((data, rows, indptr), shape=(self.n, len(self._rows)))

    def point(self) -> np.ndarray:
        """Sums with every sample counted once."""
        return np.asarray(self._matrix().sum(axis=0)).ravel()

    def replicate_sums(self) -> np.ndarray:
        """replicates x columns matrix of resampled sums."""
        if self.replicates == 0 or self.n == 0 or not self._rows:
            return np.empty((0, len(self._rows)))
        matrix = self._matrix().tocsr()
        rng = np.random.default_rng(self.seed)
        out = np.empty((self.replicates, len(self._rows)))
        for start in range(0, self.replicates, self.chunk):
            count = min(self.chunk, self.replicates - start)
            draws = rng.integers(0, self.n, size=(count, self.n))
            flat = (np.arange(count)[:, None] * self.n + draws).ravel()
            weights = np.bincount(flat, minlength=count * self.n).reshape(count, self.n).astype(np.float64)
            out[start : start + count] = np.asarray((matrix.T @ weights.T).T)
        return out


def percentile_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return float("nan"), float("nan")
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(finite, [tail, 100 - tail])
    return float(lo), float(hi)
