"""The detail sample: which samples the expensive probes (attributions, occlusion) look at.

Stratified by class (the true class, else the prediction), bounded per class and in total, and
chosen by a seeded hash of each sample id: the same samples whatever the batching or sharding,
and the attribution and occlusion probes look at the same ones.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd


def id_rank(ids: pd.Series, seed: int) -> np.ndarray:
    """A uniform pseudo-random number in [0, 1) per id, stable across runs for a given seed."""
    return np.asarray([int.from_bytes(hashlib.sha256(f"{seed}:{i}".encode()).digest()[:8], "big") / 2**64 for i in ids])


def detail_sample(rows: pd.DataFrame, per_class: int, max_total: int, seed: int, prefer: str | None = None) -> pd.DataFrame:
    """Rows of the chosen samples (in their original order): up to `per_class` per `class`, at most `max_total`.

    When the per-class quota would exceed `max_total`, classes get equal shares of it, what a small
    class cannot use going to the others, so rare classes are never crowded out. With `prefer`
    (a boolean column, e.g. `has_mask`) those rows are taken first within each class.
    """
    if rows.empty:
        return rows
    classes = rows["class"].astype(str)
    counts = classes.value_counts()
    quota = {c: min(per_class, int(n)) for c, n in counts.items()}
    if sum(quota.values()) > max_total:
        remaining, left = max_total, len(quota)
        for c in sorted(quota, key=lambda c: (quota[c], c)):  # water-filling: small classes first
            quota[c] = min(quota[c], remaining // left)
            remaining -= quota[c]
            left -= 1
    rank = id_rank(rows["id"], seed)
    key = rank if prefer is None else rank - rows[prefer].to_numpy(bool).astype(float)
    ordered = rows.assign(_key=key, _class=classes).sort_values("_key", kind="stable")
    chosen = ordered.groupby("_class", sort=False, group_keys=False).apply(lambda g: g.head(quota[g.name]), include_groups=False)
    return rows.loc[sorted(chosen.index)]
