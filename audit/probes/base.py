"""The probe contract: what a probe declares, and the steps the executor calls.

    map(batch, taps) -> rows           stage one, the shared forward pass, over every sample (rows, or
                                       MapOutput: rows and per-sample arrays such as embeddings)
    select(rows, inputs) -> DetailPlan which samples the probe's own passes need, in which batches
    detail(batch) -> DetailOutput      stage two, per batch: its own model passes -> rows and arrays
    step(batch) -> dict                whole-model work that is not per sample (e.g. randomising weights)
    reduce(data) -> Evidence           aggregates what the stages produced; no model call
    passes(plan) -> Passes             images a plan pushes through the model, forward-only and with
                                       gradients: the executor prices them before the stage starts

Under a time budget the executor sets `sample_limit` before `select`; a probe bounds its detail
sample by `limited(max_samples)`, so the stratified choice stays the probe's own.

The executor owns every model pass and all loading: it loads the samples a probe selects with the
same loader, workers and skip handling as stage one, and writes detail rows and arrays to the run
store per chunk as they are produced. A detail batch's output depends only on the samples in it and
the seed, never on what ran before, so a detail stage cut into chunks, run out of order or resumed
gives the same rows. Probes hand results to each other only through declared tables in the run
store (`provides` / `consumes`); no probe reads another probe's attributes.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, ValidationError

from audit.config import describe_validation_error
from audit.errors import InputError
from audit.metrics.declarations import MetricSpec, TableSpec
from audit.metrics.names import metric_key
from audit.models.base import Capability

if TYPE_CHECKING:
    from audit.data import Batch, Preprocessing
    from audit.execution.costs import Passes
    from audit.manifest import Manifest, Sample
    from audit.models.base import ModelAdapter
    from audit.models.outputs import OutputInterpretation
    from audit.store import ArrayTable, RunStore


class ContractError(RuntimeError):
    """A probe broke its own declarations (an undeclared table, a consumed table it did not declare)."""


class ProbeParams(BaseModel):
    """Base for a probe's parameters; unknown keys are an input error naming the key."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class Taps:
    """What the shared forward pass produced for one batch."""

    output: np.ndarray  # raw selected model output
    probabilities: np.ndarray  # N x K, via the run's output interpretation
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # "embedding", "layer:NAME"

    def __getitem__(self, tap: str) -> np.ndarray:
        if tap == "output":
            return self.output
        return self.extra[tap]


@dataclass(frozen=True)
class RunContext:
    """Everything a probe may read about the run. Frozen: probes read it, nobody reassigns it.
    The manifest is the executor's: it drops samples that turn out unreadable."""

    manifest: Manifest
    model: ModelAdapter
    classes: tuple[str, ...]
    prep: Preprocessing
    interpretation: OutputInterpretation  # decided by the plan on its probe batch, before stage one
    seed: int
    profile: str
    sample_images: bool
    reference_domain: str | None
    progress: Callable[..., Any]
    batch_size: int = 64  # most images the model gets in one call, in every probe's own passes too
    say: Callable[[str], Any] = lambda line: None  # one line of the run's progress (the plan, a stage's expected time)


@dataclass(frozen=True)
class Consumes:
    """A table or array another probe provides. A required input whose producer was skipped or
    failed skips the consumer with the reason; an optional one is simply absent."""

    table: str
    optional: bool = False


@dataclass(frozen=True)
class DetailBatchSpec:
    """One batch of a detail stage: its sample ids in order, a kind the probe tells batches apart
    by, and whether the executor should load the inputs (a batch that reads only masks need not)."""

    ids: tuple[str, ...]
    kind: str = "detail"
    inputs: bool = True


@dataclass(frozen=True)
class DetailPlan:
    """What a probe's own passes need: the detail batches, and the samples of its whole-model step."""

    batches: tuple[DetailBatchSpec, ...] = ()
    step: tuple[str, ...] = ()

    @classmethod
    def of(cls, ids: list[str], batch_size: int, kind: str = "detail", inputs: bool = True,
           step: tuple[str, ...] = ()) -> DetailPlan:
        """`ids` cut into batches of `batch_size`, in order."""
        batches = tuple(DetailBatchSpec(tuple(ids[i : i + batch_size]), kind, inputs) for i in range(0, len(ids), batch_size))
        return cls(batches, step)

    @property
    def samples(self) -> int:
        return len({i for b in self.batches for i in b.ids})

    @property
    def loaded(self) -> int:
        """Samples whose inputs the plan loads (the ones its model passes run on)."""
        return len({i for b in self.batches if b.inputs for i in b.ids})


@dataclass
class DetailBatch:
    """A loaded detail batch: the readable samples, their stage-one rows (same order) and inputs
    (raw in pixel space and normalised NCHW; None when the batch asked for no inputs)."""

    index: int
    kind: str
    samples: list[Sample]
    rows: pd.DataFrame
    raw: np.ndarray | None
    x: np.ndarray | None

    @property
    def ids(self) -> list[str]:
        return [s.id for s in self.samples]

    def __len__(self) -> int:
        return len(self.samples)


@dataclass
class MapOutput:
    """What `map` returns when it also writes per-sample arrays (declared `map` array tables): the
    executor streams them to the run store in chunks as stage one goes, so no probe holds them."""

    rows: pd.DataFrame
    arrays: dict[str, ArrayTable] = field(default_factory=dict)


@dataclass
class DetailOutput:
    """Per-sample rows and arrays of one detail batch, by declared table name."""

    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    arrays: dict[str, ArrayTable] = field(default_factory=dict)


@dataclass
class Evidence:
    """What a probe hands to the rules and the report."""

    metrics: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)  # JSON-able data the report section draws
    notes: list[str] = field(default_factory=list)
    references: list[str] = field(default_factory=list)  # methods that actually ran, beyond the probe's own list
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)  # reduce-stage tables, by declared name
    thumbnails: list[str] = field(default_factory=list)  # sample ids the probe's report section shows

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


class ProbeInputs:
    """The tables and arrays other probes provided, read from the run store; only declared ones."""

    def __init__(self, store: RunStore, consumes: tuple[Consumes, ...], available: set[str]) -> None:
        self._store = store
        self._declared = {c.table for c in consumes}
        self._available = available & self._declared

    def _check(self, name: str) -> bool:
        if name not in self._declared:
            raise ContractError(f"table {name!r} is read but not declared in `consumes`")
        return name in self._available

    def has(self, name: str) -> bool:
        return self._check(name)

    def table(self, name: str) -> pd.DataFrame | None:
        return self._store.read_table(name) if self._check(name) else None

    def array(self, name: str) -> ArrayTable | None:
        return self._store.read_array(name) if self._check(name) else None


@dataclass
class ProbeData:
    """What `reduce` aggregates: the stage-one rows, the probe's own detail tables and arrays, its
    whole-model step's result, and the consumed inputs."""

    rows: pd.DataFrame
    tables: Mapping[str, pd.DataFrame]
    arrays: Callable[[str], ArrayTable | None]
    step: dict[str, Any] | None
    inputs: ProbeInputs
    write_artifact: Callable[[bytes, str], str]  # bytes, suffix -> path in the run folder (galleries)


class Probe(ABC):
    name: ClassVar[str]
    title: ClassVar[str]
    question: ClassVar[str]  # the one sentence that opens its report section
    requires: ClassVar[frozenset[Capability]] = frozenset()
    Params: ClassVar[type[ProbeParams]] = ProbeParams
    profile_defaults: ClassVar[dict[str, dict[str, Any]]] = {}
    references: ClassVar[list[str]] = []
    metrics: ClassVar[tuple[MetricSpec, ...]] = ()  # everything its rules may read, with units
    provides: ClassVar[tuple[TableSpec, ...]] = ()  # tables and arrays it writes to the run store
    consumes: ClassVar[tuple[Consumes, ...]] = ()  # tables and arrays of other probes it reads

    def __init__(self, params: ProbeParams, context: RunContext) -> None:
        self.params = params
        self.context = context
        self.sample_limit: int | None = None  # detail samples a time budget allows (None: as the params say)

    def limited(self, max_samples: int) -> int:
        """`max_samples`, or fewer when the audit's time budget says so."""
        return max_samples if self.sample_limit is None else max(1, min(max_samples, self.sample_limit))

    @classmethod
    def make_params(cls, profile: str, overrides: dict[str, Any]) -> ProbeParams:
        values = {**cls.profile_defaults.get(profile, {}), **overrides}
        try:
            return cls.Params.model_validate(values)
        except ValidationError as exc:
            raise InputError(describe_validation_error(exc, f"probes.{cls.name}")) from None

    @classmethod
    def table_spec(cls, name: str) -> TableSpec:
        spec = next((t for t in cls.provides if t.name == name), None)
        if spec is None:
            raise ContractError(f"{cls.name} writes table {name!r}, which it does not declare in `provides`")
        return spec

    @classmethod
    def capability_uses(cls) -> list[str]:
        """What the probe does with model capabilities beyond `requires` when the model has them, and
        what it does without (for `model-audit probes`); empty: a forward pass is all it uses."""
        return []

    def taps(self) -> frozenset[str]:
        """What the probe needs from the shared forward pass besides the output ("embedding",
        "layer:NAME"); may depend on its parameters. The plan checks the adapter serves them."""
        return frozenset()

    def skip_reason(self) -> str | None:
        """Why this probe cannot run on this run's data (e.g. no masks), or None."""
        return None

    @abstractmethod
    def map(self, batch: Batch, taps: Taps) -> pd.DataFrame | MapOutput:
        """Per-sample rows for one batch of the shared pass, with an `id` column (and arrays)."""

    def select(self, rows: pd.DataFrame, inputs: ProbeInputs) -> DetailPlan | None:
        """The samples its own passes need, from the stage-one rows; None: no detail stage."""
        return None

    def passes(self, plan: DetailPlan) -> Passes:
        """Images `plan` pushes through the model (detail batches and step); by default one forward
        pass per sample of every batch that loads inputs."""
        from audit.execution.costs import Passes

        return Passes(forward=float(sum(len(b.ids) for b in plan.batches if b.inputs)))

    def detail(self, batch: DetailBatch) -> DetailOutput:
        """Rows and arrays of one detail batch (the probe's own model passes)."""
        raise ContractError(f"{self.name} selected detail samples but has no detail function")

    def step(self, batch: DetailBatch) -> dict[str, Any]:
        """Whole-model work on the plan's step samples (JSON-able result, stored with the run)."""
        raise ContractError(f"{self.name} planned a whole-model step but has no step function")

    @contextlib.contextmanager
    def detail_session(self) -> Iterator[None]:
        """Held around the whole detail stage (e.g. torch single-threaded while onnxruntime works)."""
        yield

    @abstractmethod
    def reduce(self, data: ProbeData) -> Evidence:
        """Metrics, report details and derived tables from what the stages produced."""
