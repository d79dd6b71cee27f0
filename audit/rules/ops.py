"""The closed set of comparison operators and per-sample statistics rules may use."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

OPERATORS: dict[str, Callable[[float, float | list[float]], bool]] = {
    "gt": lambda v, t: v > t,  # type: ignore[operator]
    "ge": lambda v, t: v >= t,  # type: ignore[operator]
    "lt": lambda v, t: v < t,  # type: ignore[operator]
    "le": lambda v, t: v <= t,  # type: ignore[operator]
    "eq": lambda v, t: math.isclose(v, t, rel_tol=1e-9, abs_tol=1e-12),  # type: ignore[arg-type]
    "ne": lambda v, t: not math.isclose(v, t, rel_tol=1e-9, abs_tol=1e-12),  # type: ignore[arg-type]
    "between": lambda v, t: t[0] <= v <= t[1],  # type: ignore[index]
    "outside": lambda v, t: v < t[0] or v > t[1],  # type: ignore[index]
}

SYMBOLS = {"gt": ">", "ge": "≥", "lt": "<", "le": "≤", "eq": "=", "ne": "≠", "between": "in", "outside": "outside"}

STATISTICS: dict[str, Callable[[np.ndarray], float]] = {
    "mean": lambda a: float(np.mean(a)),
    "median": lambda a: float(np.median(a)),
    "min": lambda a: float(np.min(a)),
    "max": lambda a: float(np.max(a)),
    "sum": lambda a: float(np.sum(a)),
    "rate": lambda a: float(np.mean(a.astype(bool))),
    "p10": lambda a: float(np.percentile(a, 10)),
    "p90": lambda a: float(np.percentile(a, 90)),
    "std": lambda a: float(np.std(a, ddof=1)) if len(a) > 1 else float("nan"),
}


def compare(op: str, value: float, threshold: float | list[float]) -> bool:
    return OPERATORS[op](value, threshold)


def worse_direction(op: str) -> str:
    """Which sort order puts the samples that push the value over this threshold first."""
    return "asc" if op in ("lt", "le") else "desc"
