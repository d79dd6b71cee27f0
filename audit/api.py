"""The public Python API: run_audit(), render(), exit_code(). The CLI is a thin layer over this."""

from __future__ import annotations

import datetime as dt
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from audit import __version__, exit_codes
from audit.config import AuditConfig
from audit.errors import AuditError, first_line
from audit.findings import Status, exit_code, gate, sort_findings, verdict
from audit.run_folder import RunFolder
from audit.store import ProbeRecord, RunRecord, RunStore, RunTimes, load_results

if TYPE_CHECKING:
    from audit.execution.local import ProbeOutcome
    from audit.manifest import Manifest
    from audit.metrics.declarations import Declarations
    from audit.probes.base import Probe

__all__ = ["RunOutcome", "exit_code", "render", "run_audit", "sort_findings", "verdict"]

EVIDENCE_THUMBNAILS = 6  # thumbnails per non-passing finding
BUDGET_PER_CLASS = 5  # detail samples per class a time budget leaves any probe, whatever its rules need


@dataclass
class RunOutcome:
    out: Path
    results: dict[str, Any]
    results_sha256: str
    exit_code: int
    reports: dict[str, Path]
    render_error: str | None = None


def _progress_factory(say: Callable[[str], None] | None):  # type: ignore[no-untyped-def]
    """Bars for the per-sample stages (tqdm's, with the time left), each announced by a stage line first,
    with the stage's expected time where it is known: tqdm draws nothing when stderr is not a terminal
    (a CI log), and the line still says what the run is doing and for how long."""
    from tqdm.auto import tqdm

    def make(note: str | None = None, **kwargs: Any):  # type: ignore[no-untyped-def]
        if say is not None:
            total, unit = kwargs["total"], kwargs.get("unit", "item")
            say(f"{kwargs.get('desc', 'working')}: {total} {unit}{'' if total == 1 else 's'}" + (f", {note}" if note else ""))
        return tqdm(disable=True if say is None else None, leave=False, dynamic_ncols=True, **kwargs)

    return make


def run_audit(config: AuditConfig) -> RunOutcome:
    """Run the whole audit and write results.json, the per-sample tables and the reports."""
    from audit.execution.allocator import retain_freed_memory
    from audit.metrics.declarations import declarations
    from audit.plan import check_run_inputs, open_manifest, select_probes
    from audit.probes.registry import all_probes
    from audit.rules.catalogue import check_waivers, load_catalogue

    retain_freed_memory()
    started, clock = dt.datetime.now(dt.timezone.utc), time.perf_counter()
    registry = all_probes()
    declared = declarations(registry)
    rules = load_catalogue(config.rule_files, config.rules, declared=declared)  # malformed rules fail before any work
    check_waivers(config.waivers, rules, config.rules)
    selection = select_probes(config, registry)
    manifest = open_manifest(config)
    check_run_inputs(config, manifest)
    check_waivers(config.waivers, rules, config.rules, classes=config.classes, domains=manifest.domains)

    with RunFolder(config.resolved_out(), force=config.force,
                   record={"config": config.public_dict(), "manifest_sha256": manifest.sha256}) as folder:
        return _audit_into(folder, config, registry, declared, rules, selection, manifest, started, clock)


def _audit_into(folder: RunFolder, config: AuditConfig, registry: dict[str, type[Probe]], declared: Declarations,
                rules: list[Any], selection: Any, manifest: Manifest, started: dt.datetime, clock: float) -> RunOutcome:
    """The audit proper, written into the folder's staging area and swapped into place when complete."""
    from audit.data import Preprocessing
    from audit.execution.local import LocalExecutor
    from audit.plan import build_plan, load_audited_model, probe_batch, read_output
    from audit.probes.base import RunContext
    from audit.provenance import environment
    from audit.rules.catalogue import check_waivers

    say = stage_lines(config.quiet) or (lambda line: None)
    say(f"loading the model ({config.model})")
    model, model_seconds = load_audited_model(config, manifest)
    prep = Preprocessing.create(model.input_spec.size, model.input_spec.channels, config.mean, config.std,  # type: ignore[arg-type]
                                config.max_image_pixels)
    first = probe_batch(manifest, prep)
    interpretation, classes = read_output(model, first, config.output_kind, config.classes, manifest)
    check_waivers(config.waivers, rules, config.rules, classes=list(classes), domains=manifest.domains)  # before any probe runs

    store = RunStore(folder.staging)
    store.prepare()
    context = RunContext(manifest=manifest, model=model, classes=classes, prep=prep, interpretation=interpretation,
                         seed=config.seed, profile=config.profile, sample_images=config.sample_images,
                         reference_domain=config.reference_domain, progress=_progress_factory(stage_lines(config.quiet)),
                         batch_size=config.batch_size, say=say)
    plan = build_plan(selection, registry, context, first)
    executor = LocalExecutor(context, store, plan, config.workers, on_skip=manifest.skip, chunk_samples=config.chunk_samples,
                             on_mask=manifest.mask_problem)
    executor.time_budget, executor.started = config.time_budget, clock
    executor.floors = support_floors(rules, declared, plan, len(classes), len(manifest.domains))
    outcomes = executor.run()

    metrics = {**run_metrics(manifest), **{k: v for o in outcomes.values() if o.evidence for k, v in o.evidence.metrics.items()}}
    say(f"judging {len(rules)} rules")
    findings = evaluate_rules(rules, metrics, store, outcomes, declared, config.waivers)
    thumbnails: dict[str, str] = {}
    if config.sample_images:
        from audit.thumbnails import write_thumbnails

        say("writing thumbnails of the findings' evidence")
        by_id = {s.id: s for s in manifest.samples}
        thumbnails = write_thumbnails([by_id[i] for i in thumbnail_ids(findings, outcomes) if i in by_id], prep, store)

    record = RunRecord(
        tool_version=__version__,
        times=RunTimes(started, dt.datetime.now(dt.timezone.utc), time.perf_counter() - clock, model_seconds,
                       executor.forward_seconds, executor.load_seconds),
        verdict=verdict(findings), fail_on=config.fail_on, profile=config.profile, sample_images=config.sample_images,
        model={**model.describe(), "output_kind": interpretation.kind, "num_classes": interpretation.num_classes, "classes": list(classes)},
        manifest=manifest.describe(), preprocessing={**prep.describe(), "inferred": model.input_spec.inferred}, config=config.public_dict(), metrics=metrics,
        probes={name: probe_record(registry[name], o, declared) for name, o in outcomes.items()},
        rules=[r.public_dict() for r in rules], findings=findings, thumbnails=thumbnails,
        provenance=environment(model.device, config.seed), gate=gate(findings, config.fail_on),
        budget=budget_record(config.time_budget, executor.pass_costs, outcomes),
    )
    sha = store.write_results(record.as_dict())
    try:
        reports = render(store.root, progress=stage_lines(config.quiet))
    except Exception as exc:  # noqa: BLE001 - the results are saved; the earlier run stays in place
        why = str(exc) if isinstance(exc, AuditError) else first_line(exc)
        message = (f"the reports could not be rendered ({why}); results.json is saved in {store.root} and the earlier run "
                   f"in {folder.destination} is kept; `model-audit render {store.root}` retries")
        return RunOutcome(store.root, record.as_dict(), sha, exit_codes.RENDER, {}, message)
    out = folder.commit()
    reports = {name: out / path.relative_to(store.root) for name, path in reports.items()}
    return RunOutcome(out, record.as_dict(), sha, record.gate["exit_code"], reports)


def support_floors(rules: Sequence[Any], declared: Declarations, plan: Any, classes: int, domains: int) -> dict[str, int]:
    """Fewest detail samples a time budget may leave each probe: what its rules need to judge every
    scope they are evaluated on (`min_support` per class, domain, ... times how many there are), and
    what the rules of probes that read its tables need (the background probe judges the attribution
    probe's maps); and, rules or not, `BUDGET_PER_CLASS` samples a class."""
    sizes = {"class": max(1, classes), "domain": max(1, domains)}
    floors: dict[str, int] = {probe.name: BUDGET_PER_CLASS * sizes["class"] for probe in plan.probes}
    for rule in rules:
        owner = declared.owner.get(rule.metric)
        if owner is None:
            continue
        groups = max(math.prod(sizes.get(part, 1) for part in kind.split("/")) for kind in rule.aggregate.kinds)
        floors[owner] = max(floors.get(owner, 1), rule.min_support * groups)
    for probe in reversed(plan.probes):  # consumers come after their producers
        for needed in probe.consumes:
            producer = plan.producers.get(needed.table)
            if producer is not None and probe.name in floors:
                floors[producer] = max(floors.get(producer, 1), floors[probe.name])
    return floors


def budget_record(time_budget: float | None, costs: Any, outcomes: dict[str, ProbeOutcome]) -> dict[str, Any]:
    """What results.json says about cost: the budget, the measured pass costs, the samples it cut."""
    reduced = {name: {"from": o.cost["planned_samples"], "to": o.cost["samples"]} for name, o in outcomes.items()
               if o.cost is not None and o.cost["samples"] < o.cost["planned_samples"]}
    return {"time_budget": time_budget, "pass_costs": costs.as_dict() if costs is not None else None, "reduced": reduced}


def run_metrics(manifest: Manifest) -> dict[str, float]:
    """The run-level `manifest.*` metrics (declared in audit.metrics.declarations)."""
    rows = manifest.rows
    return {"manifest.rows": float(rows), "manifest.skipped": float(len(manifest.skipped)),
            "manifest.skipped_fraction": len(manifest.skipped) / max(rows, 1), "manifest.skipped_fraction:n": float(rows)}


def evaluate_rules(rules: list[Any], metrics: dict[str, float], store: RunStore, outcomes: dict[str, ProbeOutcome],
                   declared: Declarations, waivers: Sequence[Any]) -> list[dict[str, Any]]:
    from audit.rules.engine import ProbeState, RuleEngine

    states = {name: ProbeState(o.status, o.error or o.reason) for name, o in outcomes.items()}
    engine = RuleEngine(metrics, store.read_table, states, declared.owner, {n: s.unit for n, s in declared.metrics.items()})
    return sort_findings([f.model_dump(mode="json") for f in engine.evaluate(rules, waivers)])


def probe_record(cls: type[Probe], outcome: ProbeOutcome, declared: Declarations) -> ProbeRecord:
    evidence = outcome.evidence
    return ProbeRecord(
        status=outcome.status, seconds=outcome.seconds, error=outcome.error, reason=outcome.reason,
        title=cls.title, question=cls.question,
        references=list(dict.fromkeys(cls.references + (evidence.references if evidence else []))),
        units=declared.units(cls.name), notes=evidence.notes if evidence else [], details=evidence.details if evidence else {},
        tables=outcome.tables, arrays=outcome.arrays, consumes=[c.table for c in cls.consumes], detail_samples=outcome.detail_samples,
        cost=outcome.cost, peak_memory=outcome.peak_memory,
    )


def thumbnail_ids(findings: list[dict[str, Any]], outcomes: dict[str, ProbeOutcome]) -> list[str]:
    """Evidence of non-passing findings, then the samples the probes' own sections show."""
    wanted: list[str] = []
    for finding in findings:
        if finding["status"] in (Status.FAIL, Status.WARN, Status.WAIVED):
            wanted.extend(finding["evidence"][:EVIDENCE_THUMBNAILS])
    for outcome in outcomes.values():
        if outcome.evidence is not None:
            wanted.extend(outcome.evidence.thumbnails)
    return list(dict.fromkeys(wanted))


def render(run_dir: Path | str, formats: Sequence[str] = ("html", "pdf", "junit"),
           progress: Callable[[str], Any] | None = None) -> dict[str, Path]:
    """Render reports from the run folder alone (no model, no data set)."""
    from audit.report import write_reports

    run_dir = Path(run_dir)
    results, sha = load_results(run_dir)
    return write_reports(run_dir, results, sha, formats, progress)


def stage_lines(quiet: bool) -> Callable[[str], None] | None:
    """One line per stage on stderr (tqdm's bars show the per-sample stages); None when quiet."""
    if quiet:
        return None
    return lambda line: print(f"model-audit: {line}", file=sys.stderr, flush=True)
