"""The local executor: the shared forward pass, then each probe's own stages, all model passes its own.

Stage one runs the model once per batch with the taps every planned probe needs and hands each
probe's `map` the batch. Then, probe by probe in the plan's order (producers before consumers), it
asks the probe which samples its own passes need (`select`), loads them with the same loader,
workers and skip handling as stage one, calls `detail` per batch and writes the rows and arrays to
the run store chunk by chunk as they are produced, runs the declared whole-model `step`, and calls
`reduce`. A probe that raises at any step is marked `error` with the step and its message and is not
called again; the others and the report still complete. A probe whose required input comes from a
probe that was skipped or failed is skipped with the reason.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from audit.data import Batch, iter_batches, iter_groups
from audit.errors import first_line
from audit.execution.allocator import release_freed_memory
from audit.execution.costs import RENDER_RESERVE, PassCosts, allocate, duration
from audit.manifest import Sample
from audit.probes.base import (
    ContractError,
    DetailBatch,
    DetailPlan,
    Evidence,
    MapOutput,
    Probe,
    ProbeData,
    ProbeInputs,
    RunContext,
    Taps,
)
from audit.store import ArrayTable, RunStore

if TYPE_CHECKING:
    from audit.plan import Plan

CHUNK_SAMPLES = 256  # detail samples per chunk written to the run store (whole batches, so chunks never split one)
MAP_CHUNK_BYTES = 32 << 20  # stage-one arrays (embeddings) buffered per table before a chunk is written


@dataclass
class ProbeOutcome:
    status: str = "ok"  # ok | skipped | error
    seconds: float = 0.0
    error: str | None = None
    reason: str | None = None
    rows: list[pd.DataFrame] = field(default_factory=list)
    evidence: Evidence | None = None
    tables: dict[str, str] = field(default_factory=dict)  # name -> path relative to the run folder
    arrays: dict[str, str] = field(default_factory=dict)
    detail_samples: int | None = None
    cost: dict[str, Any] | None = None  # the forecast: samples (planned and chosen), passes, expected seconds
    peak_memory: int | None = None  # peak resident memory of the process up to the end of this probe, bytes
    map_arrays: dict[str, MapArrayWriter] = field(default_factory=dict)  # stage-one arrays, streamed per chunk

    def fail(self, stage: str, exc: BaseException) -> None:
        self.status = "error"
        self.error = f"{stage}: {first_line(exc)}"
        self.rows = []

    def skip(self, reason: str) -> None:
        self.status = "skipped"
        self.reason = reason
        self.rows = []


class MapArrayWriter:
    """One stage-one array table: batches buffered until MAP_CHUNK_BYTES, then written as a chunk
    (streamed and hashed by the store), so an embedding of every sample is on disk, not in memory."""

    def __init__(self, store: RunStore, name: str, limit: int = MAP_CHUNK_BYTES) -> None:
        self.store = store
        self.name = name
        self.limit = limit
        self.parts: list[ArrayTable] = []
        self.buffered = 0
        self.digests: dict[int, str] = {}

    def add(self, table: ArrayTable) -> None:
        self.parts.append(table)
        self.buffered += sum(v.nbytes for v in table.values.values())
        if self.buffered >= self.limit:
            self.flush()

    def flush(self) -> None:
        merged = ArrayTable.concat(self.parts)
        self.parts, self.buffered = [], 0
        if merged is not None and len(merged):
            chunk = len(self.digests)
            self.digests[chunk] = self.store.write_array_chunk(self.name, chunk, merged)

    def finish(self) -> None:
        self.flush()
        self.store.write_checksums(self.name, self.digests)


class DetailStage:
    """One probe's detail batches, cut into chunks of whole batches; each chunk is loaded, run and
    written to the store on its own, so chunks may run in any order, on other workers, or again."""

    def __init__(self, probe: Probe, plan: DetailPlan, rows: pd.DataFrame, context: RunContext, store: RunStore,
                 workers: int, chunk_samples: int = CHUNK_SAMPLES, progress: Callable[[int], Any] | None = None) -> None:
        self.probe = probe
        self.plan = plan
        self.rows = rows.set_index("id", drop=False)
        self.context = context
        self.store = store
        self.workers = workers
        self.progress = progress
        self.samples = {s.id: s for s in context.manifest.samples}  # stage one has dropped the unreadable ones
        self.chunks: list[list[int]] = []
        self.digests: dict[str, dict[int, str]] = {}  # array table -> chunk -> sha256 of its file
        filled = chunk_samples  # samples in the last chunk; a full one starts the next
        for index, batch in enumerate(plan.batches):
            if filled >= chunk_samples:
                self.chunks.append([])
                filled = 0
            self.chunks[-1].append(index)
            filled += len(batch.ids)

    def run(self, chunks: Iterable[int] | None = None) -> None:
        for chunk in range(len(self.chunks)) if chunks is None else chunks:
            self.run_chunk(chunk)

    def run_chunk(self, chunk: int) -> None:
        specs = [self.plan.batches[i] for i in self.chunks[chunk]]
        tables: dict[str, list[pd.DataFrame]] = {}
        arrays: dict[str, list[ArrayTable]] = {}
        for position, batch in self.load([s.ids for s in specs], [s.inputs for s in specs]):
            spec, index = specs[position], self.chunks[chunk][position]
            loaded = DetailBatch(index, spec.kind, batch.samples, self.rows_of(batch.samples),
                                 batch.raw if spec.inputs else None, batch.x if spec.inputs else None)
            output = self.probe.detail(loaded)
            for name, frame in output.tables.items():
                self._declared(name, "rows")
                tables.setdefault(name, []).append(frame)
            for name, table in output.arrays.items():
                self._declared(name, "array")
                arrays.setdefault(name, []).append(table)
            if self.progress is not None:
                self.progress(len(loaded))
        for name, frames in tables.items():
            self.store.write_chunk(name, chunk, pd.concat(frames, ignore_index=True))
        for name, parts in arrays.items():
            merged = ArrayTable.concat(parts)
            if merged is not None:
                self.digests.setdefault(name, {})[chunk] = self.store.write_array_chunk(name, chunk, merged)

    def load(self, groups: Sequence[Sequence[str]], inputs: Sequence[bool] | bool = True) -> Iterable[tuple[int, Batch]]:
        """The samples of each group of ids (samples dropped from the audit are left out)."""
        samples = [[self.samples[i] for i in ids if i in self.samples] for ids in groups]
        return iter_groups(samples, self.context.prep, self.workers, None, load=inputs)

    def rows_of(self, samples: Sequence[Sample]) -> pd.DataFrame:
        return self.rows.loc[[s.id for s in samples]].reset_index(drop=True)

    def step_batch(self) -> DetailBatch | None:
        """The whole-model step's samples, loaded as one batch."""
        for _, batch in self.load([self.plan.step]):
            return DetailBatch(-1, "step", batch.samples, self.rows_of(batch.samples), batch.raw, batch.x)
        return None

    def finish(self) -> dict[str, str]:
        """Merge the detail row tables into samples/ and record the array chunks' digests; returns
        name -> relative path of the row tables."""
        for name, digests in self.digests.items():
            self.store.write_checksums(name, digests)
        out = {}
        for spec in self.probe.provides:
            if spec.stage == "detail" and spec.kind == "rows":
                empty = pd.DataFrame({c: [] for c in [*spec.keys, *(c.name for c in spec.columns)]})
                out[spec.name] = self.store.relative(self.store.merge_chunks(spec.name, empty))
        return out

    def _declared(self, name: str, kind: str) -> None:
        spec = self.probe.table_spec(name)
        if spec.stage != "detail" or spec.kind != kind:
            raise ContractError(f"{self.probe.name} returned {kind} {name!r} from detail, declared as a {spec.stage} {spec.kind} table")


class LocalExecutor:
    def __init__(self, context: RunContext, store: RunStore, plan: Plan, workers: int,
                 on_skip: Callable[[Sample, str], None], chunk_samples: int = CHUNK_SAMPLES,
                 on_mask: Callable[[Sample, str, bool], None] | None = None) -> None:
        self.context = context
        self.store = store
        self.plan = plan
        self.workers = workers
        self.on_skip = on_skip
        self.on_mask = on_mask  # the shared pass checks every mask it meets and reports problems here
        self.chunk_samples = chunk_samples
        self.forward_seconds = 0.0
        self.load_seconds = 0.0
        self.time_budget: float | None = None  # seconds the whole audit may take, counted from `started`
        self.started = time.perf_counter()
        self.floors: Mapping[str, int] = {}  # fewest detail samples a budget may leave each probe (its rules' min_support)
        self.pass_costs: PassCosts | None = None

    def run(self) -> dict[str, ProbeOutcome]:
        """Outcomes of every selected probe (report order): the planned ones run, the others skipped."""
        outcomes = {name: ProbeOutcome() for name in self.plan.order}
        for name, reason in self.plan.skipped.items():
            outcomes[name].skip(reason)
        self.shared_pass(list(self.context.manifest.samples), outcomes)
        self.forecast(outcomes)
        for probe in self.plan.probes:
            self.run_probe(probe, outcomes)
        return outcomes

    def forecast(self, outcomes: dict[str, ProbeOutcome]) -> None:
        """Price every live probe's detail stage before any starts, from the passes its plan needs and
        what a pass costs on this model; under a time budget, choose the detail sample counts that fit
        (the probes re-select with `sample_limit`). Prints the plan. A probe whose select fails here
        gets no forecast; it fails in its own turn, with its own stage."""
        live = [p for p in self.plan.probes if outcomes[p.name].status == "ok"]
        rows = {}
        for probe in live:
            outcome = outcomes[probe.name]
            outcome.rows = [pd.concat(outcome.rows, ignore_index=True)] if outcome.rows else []
            rows[probe.name] = outcome.rows[0] if outcome.rows else pd.DataFrame({"id": []})

        def planned(probe: Probe, limit: int | None) -> Any:
            probe.sample_limit = limit
            try:
                plan = probe.select(rows[probe.name], ProbeInputs(self.store, probe.consumes, set()))
                return (plan, probe.passes(plan)) if plan is not None else None
            except Exception:  # noqa: BLE001 - the probe's own select reports it, in its turn
                return None
            finally:
                probe.sample_limit = None

        full = {p.name: planned(p, None) for p in live}
        priced = {name: value for name, value in full.items() if value is not None}
        if not priced:
            return
        from audit.probes.model_functions import pass_timers

        needs_gradient = any(passes.gradient > 0 for _, passes in priced.values())
        try:
            self.pass_costs = pass_timers(self.context, needs_gradient)
        except Exception as exc:  # noqa: BLE001 - no forecast is no reason to stop the audit
            self.context.say(f"plan: the pass costs could not be measured ({first_line(exc)}); no time estimates")
            return
        costs = self.pass_costs
        by_name = {p.name: p for p in live}

        def priced_at(name: str) -> Callable[[int | None], tuple[int, float]]:
            def price(limit: int | None) -> tuple[int, float]:
                value = full[name] if limit is None else planned(by_name[name], limit)
                return (0, 0.0) if value is None else (value[0].loaded, costs.seconds(value[1]))
            return price

        limits: dict[str, int] = {}
        if self.time_budget is not None:
            spent = time.perf_counter() - self.started
            available = self.time_budget - spent - RENDER_RESERVE
            allocation = allocate({name: priced_at(name) for name in priced}, self.floors, available)
            limits = allocation.limits
            self.context.say(f"time budget {duration(self.time_budget)}: {duration(spent)} spent, {duration(RENDER_RESERVE)} kept for "
                             f"the reports, {duration(max(available, 0))} for the probes' own passes"
                             + ("" if allocation.met else f"; the rules' minimum samples need {duration(allocation.expected)}, over the budget"))
        self.context.say(f"plan (per image: {costs.forward * 1e3:.1f} ms forward, {costs.gradient * 1e3:.1f} ms forward+backward):")
        total = 0.0
        for name, (plan, passes) in priced.items():
            probe = by_name[name]
            chosen, chosen_passes = (planned(probe, limits[name]) if name in limits else None) or (plan, passes)
            if name in limits:
                probe.sample_limit = limits[name]
            expected = costs.seconds(chosen_passes)
            outcomes[name].cost = cost_record(chosen, chosen_passes, expected, plan.loaded)
            total += expected
            reduced = f" of {plan.loaded} (time budget)" if chosen.loaded < plan.loaded else ""
            self.context.say(f"  {name}: {chosen.loaded}{reduced} samples, expected {duration(expected)}")
        self.context.say(f"  all probes: expected {duration(total)}")

    def shared_pass(self, samples: Sequence[Sample], outcomes: dict[str, ProbeOutcome]) -> None:
        batches = iter_batches(samples, self.context.prep, self.context.batch_size, self.workers, self.on_skip,
                               on_mask=self.on_mask)
        bar = self.context.progress(total=len(samples), desc="forward pass", unit="sample")
        tick = start = time.perf_counter()
        first = True
        try:
            for batch in batches:
                self.load_seconds += time.perf_counter() - tick
                taps = self._forward(batch, outcomes)
                if taps is not None:
                    self._map(batch, taps, outcomes)
                bar.update(len(batch))
                if first and len(batch) < len(samples):  # the first batch prices the rest
                    rate = (time.perf_counter() - start) / max(1, len(batch))
                    self.context.say(f"forward pass: expected {duration(rate * len(samples))} for {len(samples)} samples")
                first = False
                tick = time.perf_counter()
        finally:
            bar.close()
        for outcome in outcomes.values():
            for writer in outcome.map_arrays.values():
                try:
                    writer.finish()
                except Exception as exc:  # noqa: BLE001 - a disk problem fails this probe, not the audit
                    outcome.fail("map", exc)
            outcome.map_arrays = {}

    def _live(self, outcomes: dict[str, ProbeOutcome]) -> list[Probe]:
        return [p for p in self.plan.probes if outcomes[p.name].status == "ok"]

    def _forward(self, batch: Batch, outcomes: dict[str, ProbeOutcome]) -> Taps | None:
        """The model's output and the live probes' taps for one batch. A failing tap fails the probes
        that need it (the pass is repeated without it); a failing plain pass skips the batch's samples."""
        start = time.perf_counter()
        needed = frozenset().union(*(p.taps() for p in self._live(outcomes)))
        try:
            raw = self.context.model.forward(batch.x, needed)
        except Exception as exc:  # noqa: BLE001 - contained: a tap or a batch, never the audit
            if not needed:
                for sample in batch.samples:
                    self.on_skip(sample, f"the forward pass failed on its batch ({first_line(exc)})")
                return None
            for probe in self._live(outcomes):
                if probe.taps():
                    outcomes[probe.name].fail("forward", exc)
            self.forward_seconds += time.perf_counter() - start
            return self._forward(batch, outcomes)
        interpretation = self.context.interpretation
        taps = Taps(raw["output"], interpretation.probabilities(raw["output"]), {k: v for k, v in raw.items() if k != "output"})
        self.forward_seconds += time.perf_counter() - start
        return taps

    def _map(self, batch: Batch, taps: Taps, outcomes: dict[str, ProbeOutcome]) -> None:
        for probe in self._live(outcomes):
            outcome = outcomes[probe.name]
            tick = time.perf_counter()
            try:
                result = probe.map(batch, taps)
                if isinstance(result, MapOutput):
                    for name, table in result.arrays.items():
                        spec = probe.table_spec(name)
                        if spec.stage != "map" or spec.kind != "array":
                            raise ContractError(f"{probe.name} returned array {name!r} from map, declared as a {spec.stage} {spec.kind} table")
                        if name not in outcome.map_arrays:
                            outcome.map_arrays[name] = MapArrayWriter(self.store, name)
                        outcome.map_arrays[name].add(table)
                    result = result.rows
                outcome.rows.append(result)
            except Exception as exc:  # noqa: BLE001 - one probe's failure must not stop the audit
                outcome.fail("map", exc)
            outcome.seconds += time.perf_counter() - tick

    def missing_input(self, probe: Probe, outcomes: dict[str, ProbeOutcome]) -> str | None:
        """Why a required input of `probe` is not there (its producer skipped, failed or not run)."""
        for needed in probe.consumes:
            if needed.optional:
                continue
            producer = self.plan.producers.get(needed.table)
            if producer is None:
                return f"needs table {needed.table!r}, which no probe provides"
            state = outcomes.get(producer)
            if state is None:
                return f"needs {producer}'s {needed.table!r}; the {producer} probe was not run in this audit"
            if state.status == "skipped":
                return f"needs {producer}'s {needed.table!r}; the {producer} probe was skipped: {state.reason}"
            if state.status == "error":
                return f"needs {producer}'s {needed.table!r}; the {producer} probe failed: {state.error}"
        return None

    def run_probe(self, probe: Probe, outcomes: dict[str, ProbeOutcome]) -> None:
        """select, detail, step and reduce of one probe, contained."""
        outcome = outcomes[probe.name]
        if outcome.status != "ok":
            return
        reason = self.missing_input(probe, outcomes)
        if reason is not None:
            outcome.skip(reason)
            return
        available = {t for t, p in self.plan.producers.items() if p in outcomes and outcomes[p].status == "ok" and p != probe.name}
        release_freed_memory()  # what earlier stages freed must not sit under this one's peak
        tick = time.perf_counter()
        stage = "select"
        try:
            rows = pd.concat(outcome.rows, ignore_index=True) if outcome.rows else pd.DataFrame({"id": []})
            outcome.rows = []
            tables = self._write_map_table(probe, rows)
            inputs = ProbeInputs(self.store, probe.consumes, available)
            plan = probe.select(rows, inputs)
            step = None
            if plan is not None:
                stage = "detail"
                outcome.detail_samples = plan.samples
                detail = DetailStage(probe, plan, rows, self.context, self.store, self.workers, self.chunk_samples)
                expected = self._expected(probe, plan, outcome)
                bar = self.context.progress(total=plan.samples, desc=probe.name, unit="sample",
                                            note=f"expected {duration(expected)}" if expected is not None else None)
                detail.progress = bar.update
                try:
                    with probe.detail_session():
                        detail.run()
                        if plan.step:
                            stage = "step"
                            self.context.say(f"{probe.name}: its whole-model step on {len(plan.step)} samples")
                            batch = detail.step_batch()
                            step = probe.step(batch) if batch is not None else None
                finally:
                    bar.close()
                if step is not None:
                    self.store.write_step(probe.name, step)
                tables.update(detail.finish())
            stage = "reduce"
            own = _OwnTables(self.store, tables)
            evidence = probe.reduce(ProbeData(rows, own, lambda name: self._own_array(probe, name), step, inputs, self.store.write_artifact))
            for name, frame in evidence.tables.items():
                if probe.table_spec(name).stage != "reduce":
                    raise ContractError(f"{probe.name} returned table {name!r} from reduce, declared as a {probe.table_spec(name).stage} table")
                tables[name] = self.store.relative(self.store.write_table(name, frame))
            outcome.evidence = evidence
            outcome.tables = tables
            outcome.arrays = {s.name: f"arrays/{s.name}" for s in probe.provides
                              if s.kind == "array" and (self.store.root / "arrays" / s.name).is_dir()}
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - one probe's failure must not stop the audit
            outcome.fail(stage, exc)
        outcome.seconds += time.perf_counter() - tick
        if probe.sample_limit is not None and outcome.evidence is not None and outcome.cost is not None:
            outcome.evidence.notes.append(
                f"The time budget ({duration(self.time_budget or 0)}) cut this probe's detail sample from "
                f"{outcome.cost['planned_samples']} to {outcome.cost['samples']} samples, stratified as before and no fewer "
                f"than its rules need to judge a scope.")
        outcome.peak_memory = peak_memory()

    def _expected(self, probe: Probe, plan: DetailPlan, outcome: ProbeOutcome) -> float | None:
        """Seconds the plan about to run costs at the measured rates; its forecast is updated to it (the
        real select has the other probes' tables, the forecast had none)."""
        if self.pass_costs is None:
            return None
        try:
            passes = probe.passes(plan)
        except Exception:  # noqa: BLE001 - an estimate, never a failure
            return None
        expected = self.pass_costs.seconds(passes)
        outcome.cost = cost_record(plan, passes, expected, (outcome.cost or {}).get("planned_samples", plan.loaded))
        return expected

    def _write_map_table(self, probe: Probe, rows: pd.DataFrame) -> dict[str, str]:
        specs = [s for s in probe.provides if s.stage == "map" and s.kind == "rows"]
        if len(specs) > 1:
            raise ContractError(f"{probe.name} declares {len(specs)} map tables; map returns one")
        return {s.name: self.store.relative(self.store.write_table(s.name, rows)) for s in specs}

    def _own_array(self, probe: Probe, name: str) -> ArrayTable | None:
        if probe.table_spec(name).kind != "array":
            raise ContractError(f"{probe.name} reads {name!r} as an array; it is declared as rows")
        return self.store.read_array(name)


class _OwnTables(dict):  # type: ignore[type-arg]
    """A probe's own tables by name, read from the store when first asked for."""

    def __init__(self, store: RunStore, paths: dict[str, str]) -> None:
        super().__init__()
        self._store = store
        self._paths = paths

    def __missing__(self, name: str) -> pd.DataFrame:
        if name not in self._paths:
            raise KeyError(name)
        self[name] = frame = self._store.read_table(name)
        return frame


def peak_memory() -> int:
    """Peak resident memory of this process so far, in bytes: Linux's VmHWM, which starts at zero in
    a new process (ru_maxrss starts at the parent's peak: a small audit started from a large Python
    process would report the parent's memory); elsewhere ru_maxrss (KiB on Linux, bytes on macOS)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def cost_record(plan: DetailPlan, passes: Any, expected: float, planned_samples: int) -> dict[str, Any]:
    """A probe's forecast as results.json keeps it (`probes.*.cost`); `expected` is its seconds at the measured pass costs."""
    return {"samples": plan.loaded, "planned_samples": planned_samples, "forward_passes": round(passes.forward),
            "gradient_passes": round(passes.gradient), "expected_seconds": round(expected, 3)}
