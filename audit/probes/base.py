"""The Probe contract: map (one batch -> per-sample rows) and reduce (rows -> metrics + details).

Aggregates are computed only from per-sample rows, so they do not depend on how the data was
batched or sharded. A probe that needs a capability the model lacks is skipped with the reason.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, ValidationError

from audit.config import describe_validation_error
from audit.errors import InputError
from audit.metrics.names import metric_key
from audit.models.base import Capability

if TYPE_CHECKING:
    from audit.data import Batch, Preprocessing
    from audit.manifest import Manifest, Sample
    from audit.models.base import ModelAdapter
    from audit.models.outputs import OutputInterpretation
    from audit.store import RunStore


class ProbeParams(BaseModel):
    """Base for a probe's parameters; unknown keys are an input error naming the key."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class Taps:
    """What the shared forward pass produced for one batch."""

    output: np.ndarray  # raw selected model output
    probabilities: np.ndarray  # N x K, via the run's output interpretation
    extra: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class RunContext:
    """Everything a probe may read about the run; shared, read-only."""

    manifest: Manifest
    model: ModelAdapter
    classes: list[str]
    prep: Preprocessing
    store: RunStore
    seed: int
    profile: str
    sample_images: bool
    reference_domain: str | None
    load_inputs: Callable[[Sequence[Sample]], tuple[list[Sample], np.ndarray]]  # raw inputs of the given samples
    progress: Callable[..., Any]
    batch_size: int = 64  # most images the model gets in one call, in every probe's own passes too
    interpretation: OutputInterpretation | None = None  # decided on the first batch by the executor
    handoff: dict[str, Any] = field(default_factory=dict)  # in-memory results one probe leaves for a later one


@dataclass
class Evidence:
    """What a probe hands to the rules and the report."""

    metrics: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)  # JSON-able data the report section draws
    notes: list[str] = field(default_factory=list)
    references: list[str] = field(default_factory=list)  # methods that actually ran, beyond the probe's own list

    def add(self, name: str, value: float | None, scope: str = "global", n: int | None = None,
            interval: tuple[float, float] | None = None) -> None:
        """Record one metric with its support and optional confidence interval (NaN values dropped)."""
        if value is None or not np.isfinite(value):
            return
        key = metric_key(name, scope)
        self.metrics[key] = float(value)
        if n is not None:
            self.metrics[f"{key}:n"] = float(n)
        if interval is not None and all(np.isfinite(interval)):
            self.metrics[f"{key}:lo"] = float(interval[0])
            self.metrics[f"{key}:hi"] = float(interval[1])


class Probe(ABC):
    name: ClassVar[str]
    title: ClassVar[str]
    question: ClassVar[str]  # the one sentence that opens its report section
    requires: ClassVar[frozenset[Capability]] = frozenset()
    taps: ClassVar[frozenset[str]] = frozenset({"output"})
    Params: ClassVar[type[ProbeParams]] = ProbeParams
    profile_defaults: ClassVar[dict[str, dict[str, Any]]] = {}
    references: ClassVar[list[str]] = []
    units: ClassVar[dict[str, str]] = {}  # metric -> percent | ratio | count | number, for the report
    after: ClassVar[tuple[str, ...]] = ()  # probes whose reduce must run first (their handoff is read)

    def __init__(self, params: ProbeParams, context: RunContext) -> None:
        self.params = params
        self.context = context

    @classmethod
    def make_params(cls, profile: str, overrides: dict[str, Any]) -> ProbeParams:
        values = {**cls.profile_defaults.get(profile, {}), **overrides}
        try:
            return cls.Params.model_validate(values)
        except ValidationError as exc:
            raise InputError(describe_validation_error(exc, f"probes.{cls.name}")) from None

    def skip_reason(self) -> str | None:
        """Why this probe cannot run on this run's data (e.g. no masks), or None."""
        return None

    @abstractmethod
    def map(self, batch: Batch, taps: Taps) -> pd.DataFrame:
        """Per-sample rows for one batch, with an `id` column."""

    @abstractmethod
    def reduce(self, rows: pd.DataFrame) -> Evidence:
        """Metrics and report details from all rows."""

    def write_tables(self, rows: pd.DataFrame, store: RunStore) -> dict[str, Path]:
        """Persist the per-sample rows; probes with several tables override this."""
        return {self.name: store.write_table(self.name, rows)}
