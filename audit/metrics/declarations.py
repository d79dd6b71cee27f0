"""What each probe can measure, declared before anything runs.

A probe declares its metrics (name, the scopes it reports them for, unit, one-line meaning) and the
per-sample columns of the tables it writes. The declarations are what `rules check` and the rule
loader hold a rule against, so a misspelled metric is refused instead of quietly coming out
`skipped` in every run, and they are where the report takes its units from. Imports no torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

Unit = Literal["percent", "points", "ratio", "count", "number", "text"]  # points: a difference of two shares; text: a column rules cannot aggregate
ScopeKind = str  # "global", "class", "domain", "domain/class", "method", "method/class", "layer", "pair"


@dataclass(frozen=True)
class MetricSpec:
    """A metric a probe can produce: `name` is `<probe>.<metric>`; `scopes` the scope kinds it is
    reported for; `interval` whether it carries `:lo` / `:hi` bounds."""

    name: str
    scopes: tuple[ScopeKind, ...]
    unit: Unit
    meaning: str
    interval: bool = False

    def __post_init__(self) -> None:
        if "." not in self.name:
            raise ValueError(f"metric {self.name!r} must be named <probe>.<metric>")


@dataclass(frozen=True)
class ColumnSpec:
    """A per-sample column of a table a probe writes, which rules may aggregate (`aggregate.stat`)
    or order evidence by: `<table>.<column>`."""

    name: str
    unit: Unit
    meaning: str


@dataclass(frozen=True)
class TableSpec:
    """A table a probe writes to the run store. `stage` says when its rows are produced: `map`
    (the shared forward pass), `detail` (the probe's own passes, written per chunk) or `reduce`
    (derived from the other two). `kind="array"` tables hold one array per key row instead of
    columns (maps, embeddings); `keys` name the key columns (`id` first)."""

    name: str
    stage: Literal["map", "detail", "reduce"]
    meaning: str
    columns: tuple[ColumnSpec, ...] = ()
    kind: Literal["rows", "array"] = "rows"
    keys: tuple[str, ...] = ("id",)

    def column(self, name: str) -> ColumnSpec | None:
        return next((c for c in self.columns if c.name == name), None)


@dataclass
class Declarations:
    """Every declared metric and column of a run's probes, and which probe owns each."""

    metrics: dict[str, MetricSpec] = field(default_factory=dict)
    columns: dict[str, ColumnSpec] = field(default_factory=dict)  # "<table>.<column>"
    owner: dict[str, str] = field(default_factory=dict)  # metric or "<table>.<column>" -> probe (or "manifest")

    def add(self, owner: str, metrics: Iterable[MetricSpec] = (), tables: Iterable[TableSpec] = ()) -> None:
        for spec in metrics:
            if spec.name in self.metrics and self.owner[spec.name] != owner:
                raise ValueError(f"metric {spec.name!r} is declared by {self.owner[spec.name]} and {owner}")
            self.metrics[spec.name] = spec
            self.owner[spec.name] = owner
        for table in tables:
            for column in table.columns:
                key = f"{table.name}.{column.name}"
                self.columns[key] = column
                self.owner[key] = owner

    def units(self, owner: str) -> dict[str, str]:
        return {name: spec.unit for name, spec in self.metrics.items() if self.owner[name] == owner}

    def names(self) -> list[str]:
        return sorted({*self.metrics, *self.columns})


RUN_LEVEL = "manifest"
RUN_LEVEL_METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("manifest.rows", ("global",), "count", "rows in the manifest"),
    MetricSpec("manifest.skipped", ("global",), "count", "rows not audited (file missing, unreadable or refused)"),
    MetricSpec("manifest.skipped_fraction", ("global",), "percent", "share of the manifest's rows not audited"),
)


def declarations(probes: Mapping[str, type]) -> Declarations:
    """The declarations of the given probe classes (registry order) and the run-level metrics."""
    out = Declarations()
    out.add(RUN_LEVEL, RUN_LEVEL_METRICS)
    for name, cls in probes.items():
        out.add(name, getattr(cls, "metrics", ()), getattr(cls, "provides", ()))
    return out
