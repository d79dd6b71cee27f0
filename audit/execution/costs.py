"""What each stage will cost, known before it starts, and the sample counts a time budget allows.

A probe counts the images its detail stage and step push through the model (`Probe.passes`):
forward-only (deletion curves, occlusion, swaps: onnxruntime where the model runs there) and
forward+backward (gradient maps, the randomisation test: the torch module). The executor measures
what one image of each kind costs on this machine, on this model, at the batch sizes the stages
use, and multiplies. Under `--time-budget` it then picks, per probe, the largest stratified detail
sample that lets the whole audit fit, never below what the probe's rules need to judge a scope
(`min_support`), and says so in the report.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

RENDER_RESERVE = 60.0  # seconds kept for rules, thumbnails and the reports when a budget is set
TIMED_IMAGES = 16  # images per timed call: a batch size where the CPU runs near its best


@dataclass(frozen=True)
class Passes:
    """Images pushed through the model: forward-only and forward+backward."""

    forward: float = 0.0
    gradient: float = 0.0

    def __add__(self, other: Passes) -> Passes:
        return Passes(self.forward + other.forward, self.gradient + other.gradient)

    def __mul__(self, k: float) -> Passes:
        return Passes(self.forward * k, self.gradient * k)

    __rmul__ = __mul__


@dataclass(frozen=True)
class PassCosts:
    """Seconds per image of each kind of pass, measured on the audited model."""

    forward: float
    gradient: float

    def seconds(self, passes: Passes) -> float:
        return passes.forward * self.forward + passes.gradient * self.gradient

    def as_dict(self) -> dict[str, float]:
        return {"forward": self.forward, "gradient": self.gradient}


def timed(run: Callable[[], object], repeats: int = 2) -> float:
    """The faster of `repeats` timed calls, after one untimed call (first-call allocation, kernel choice)."""
    run()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def measure_pass_costs(forward: Callable[[np.ndarray], object], gradient: Callable[[np.ndarray], object] | None,
                       shape: tuple[int, ...], seed: int, images: int = TIMED_IMAGES) -> PassCosts:
    """Per-image seconds of `forward` (what forward-only checks call) and `gradient` (one
    forward+backward; None: no probe needs one) on seeded normal inputs of `shape` (C, H, W)."""
    x = np.random.default_rng(seed).standard_normal((images, *shape)).astype(np.float32)
    forward_cost = timed(lambda: forward(x)) / images
    gradient_cost = timed(lambda: gradient(x)) / images if gradient is not None else 0.0
    return PassCosts(forward_cost, gradient_cost)


def duration(seconds: float) -> str:
    """'45 s', '3 min', '1 h 20 min': as a person reads a plan."""
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    minutes = round(seconds / 60)
    if minutes < 90:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60:02d} min"


@dataclass(frozen=True)
class Allocation:
    """Detail samples per probe under a budget: the limits to apply, and whether the budget is met."""

    limits: dict[str, int]
    expected: float
    met: bool


def allocate(cost: Mapping[str, Callable[[int | None], tuple[int, float]]], floors: Mapping[str, int], available: float) -> Allocation:
    """The largest common fraction of each probe's full detail sample whose total expected time fits
    `available` seconds, each probe kept at its floor at least. `cost[name](limit)` gives the sample
    count and expected seconds with at most `limit` detail samples (None: no limit)."""
    full = {name: f(None) for name, f in cost.items()}
    if sum(seconds for _, seconds in full.values()) <= available:
        return Allocation({}, sum(seconds for _, seconds in full.values()), True)

    def limits_at(fraction: float) -> dict[str, int]:
        return {name: min(n, max(floors.get(name, 1), math.ceil(fraction * n))) for name, (n, _) in full.items()}

    def total(limits: Mapping[str, int]) -> float:
        return sum(cost[name](limit)[1] for name, limit in limits.items())

    low, high = 0.0, 1.0  # total(limits_at(low)) fits or is the floor; high does not fit
    for _ in range(20):
        middle = (low + high) / 2
        if total(limits_at(middle)) <= available:
            low = middle
        else:
            high = middle
    limits = limits_at(low)
    expected = total(limits)
    reduced = {name: limit for name, limit in limits.items() if limit < full[name][0]}
    return Allocation(reduced, expected, expected <= available)
