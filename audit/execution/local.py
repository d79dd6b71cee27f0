"""The local executor: one forward pass per batch, shared by every probe's map, then reduce.

A probe that raises is marked `error` with its message and is not called again; the others and
the report still complete.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pandas as pd

from audit.data import Batch, iter_batches
from audit.errors import first_line
from audit.manifest import Sample
from audit.models.outputs import OutputInterpretation, interpret
from audit.probes.base import Evidence, Probe, RunContext, Taps


@dataclass
class ProbeOutcome:
    status: str = "ok"  # ok | skipped | error
    seconds: float = 0.0
    error: str | None = None
    reason: str | None = None
    rows: list[pd.DataFrame] = field(default_factory=list)
    evidence: Evidence | None = None
    tables: dict[str, str] = field(default_factory=dict)

    def fail(self, stage: str, exc: BaseException) -> None:
        self.status = "error"
        self.error = f"{stage}: {first_line(exc)}"
        self.rows = []


def reduce_order(probes: Sequence[Probe]) -> list[Probe]:
    """Registry order, except that a probe comes after the probes named in its `after`."""
    placed: list[Probe] = []
    pending = list(probes)
    names = {p.name for p in probes}
    while pending:
        for probe in pending:
            if all(dep not in names or dep in {p.name for p in placed} for dep in probe.after):
                placed.append(probe)
                pending.remove(probe)
                break
        else:
            raise ValueError(f"probe dependencies form a cycle: {[p.name for p in pending]}")
    return placed


class LocalExecutor:
    def __init__(
        self,
        context: RunContext,
        probes: Sequence[Probe],
        batch_size: int,
        workers: int,
        output_kind: str,
        on_skip: Callable[[Sample, str], None],
        on_interpretation: Callable[[OutputInterpretation], None],
    ) -> None:
        self.context = context
        self.probes = list(probes)
        self.batch_size = batch_size
        self.workers = workers
        self.output_kind = output_kind
        self.on_skip = on_skip
        self.on_interpretation = on_interpretation
        self.forward_seconds = 0.0
        self.load_seconds = 0.0

    def run(self, samples: Sequence[Sample], outcomes: dict[str, ProbeOutcome]) -> None:
        """Fill `outcomes[probe.name]` (pre-created by the caller) with rows, evidence and timings."""
        taps_needed = frozenset().union(*(p.taps for p in self.probes)) - {"output"}
        batches = iter_batches(samples, self.context.prep, self.batch_size, self.workers, self.on_skip)
        bar = self.context.progress(total=len(samples), desc="forward pass", unit="sample")
        tick = time.perf_counter()
        try:
            for batch in batches:
                self.load_seconds += time.perf_counter() - tick
                self._step(batch, taps_needed, outcomes)
                bar.update(len(batch))
                tick = time.perf_counter()
        finally:
            bar.close()
        for probe in reduce_order(self.probes):
            self._reduce(probe, outcomes[probe.name])

    def _step(self, batch: Batch, taps_needed: frozenset[str], outcomes: dict[str, ProbeOutcome]) -> None:
        start = time.perf_counter()
        raw = self.context.model.forward(batch.x, taps_needed)
        if self.context.interpretation is None:
            self.context.interpretation = interpret(raw["output"], self.output_kind)
            self.on_interpretation(self.context.interpretation)
        taps = Taps(raw["output"], self.context.interpretation.probabilities(raw["output"]),
                    {k: v for k, v in raw.items() if k != "output"})
        self.forward_seconds += time.perf_counter() - start
        for probe in self.probes:
            outcome = outcomes[probe.name]
            if outcome.status != "ok":
                continue
            tick = time.perf_counter()
            try:
                outcome.rows.append(probe.map(batch, taps))
            except Exception as exc:  # noqa: BLE001 - one probe's failure must not stop the audit
                outcome.fail("map", exc)
            outcome.seconds += time.perf_counter() - tick

    def _reduce(self, probe: Probe, outcome: ProbeOutcome) -> None:
        if outcome.status != "ok":
            return
        tick = time.perf_counter()
        try:
            rows = pd.concat(outcome.rows, ignore_index=True) if outcome.rows else pd.DataFrame({"id": []})
            outcome.rows = []
            outcome.evidence = probe.reduce(rows)
            outcome.tables = {k: str(p.relative_to(self.context.store.root)) for k, p in probe.write_tables(rows, self.context.store).items()}
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001
            outcome.fail("reduce", exc)
        outcome.seconds += time.perf_counter() - tick
