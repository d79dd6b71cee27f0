"""The public Python API: run_audit(), render(), exit_code(). The CLI is a thin layer over this."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from audit import __version__
from audit.config import SEVERITY_RANK, AuditConfig
from audit.errors import AuditError, InputError, first_line
from audit.manifest import Manifest, Sample, load_manifest, stratified_subset
from audit.store import SCHEMA_VERSION, RunStore, load_results

FINDING_ORDER = {"error": 0, "fail": 1, "warn": 2, "waived": 3, "skipped": 4, "pass": 5}


@dataclass
class RunOutcome:
    out: Path
    results: dict[str, Any]
    results_sha256: str
    exit_code: int
    reports: dict[str, Path]
    render_error: str | None = None


def verdict(findings: Iterable[dict[str, Any]]) -> str:
    statuses = {f["status"] for f in findings}
    if "error" in statuses:
        return "ERROR"
    if "fail" in statuses:
        return "FAIL"
    if "warn" in statuses:
        return "PASS WITH WARNINGS"
    return "PASS"


def exit_code(findings: Iterable[dict[str, Any]], fail_on: str) -> int:
    """1 when a fail or error finding is at least as severe as `fail_on`, else 0."""
    if fail_on == "never":
        return 0
    limit = SEVERITY_RANK[fail_on]
    return int(any(f["status"] in ("fail", "error") and SEVERITY_RANK[f["severity"]] >= limit for f in findings))


def sort_findings(findings: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(findings, key=lambda f: (FINDING_ORDER[f["status"]], -SEVERITY_RANK[f["severity"]], f["rule"], f["scope"]))


def _progress_factory(quiet: bool):  # type: ignore[no-untyped-def]
    from tqdm.auto import tqdm

    def make(**kwargs: Any):  # type: ignore[no-untyped-def]
        return tqdm(disable=True if quiet else None, leave=False, dynamic_ncols=True, **kwargs)

    return make


def _first_readable(manifest: Manifest) -> np.ndarray:
    """The first sample that reads, to infer input size and channels for torch models."""
    from audit.data import read_input
    from audit.errors import SampleError

    for sample in list(manifest.samples):
        try:
            return read_input(sample.path)
        except SampleError as exc:
            manifest.skip(sample, str(exc))
    raise InputError(f"{manifest.path}: no sample could be read ({len(manifest.skipped)} rows skipped)")


def run_audit(config: AuditConfig) -> RunOutcome:
    """Run the whole audit and write results.json, the per-sample tables and the reports."""
    from audit.data import Preprocessing, load_sample
    from audit.execution.allocator import retain_freed_memory
    from audit.execution.local import LocalExecutor, ProbeOutcome
    from audit.models import InputSpec, is_onnx, load_model, resolve_device
    from audit.probes.base import RunContext
    from audit.probes.registry import all_probes
    from audit.provenance import environment
    from audit.rules.catalogue import load_catalogue
    from audit.rules.engine import ProbeState, RuleEngine

    retain_freed_memory()
    started = dt.datetime.now(dt.timezone.utc)
    clock = time.perf_counter()
    progress = _progress_factory(config.quiet)

    rules = load_catalogue(config.rule_files, config.rules)  # malformed rules fail before any work
    registry = all_probes()
    probe_params = {name: dict(values) for name, values in config.probe_params.items()}
    disabled = {name for name, values in probe_params.items() if values.pop("enabled", True) is False}
    selected = [p for p in (config.probes if config.probes is not None else list(registry)) if p not in disabled]
    unknown = [p for p in [*selected, *probe_params] if p not in registry]
    if unknown:
        raise InputError(f"unknown probe {unknown[0]!r} (available: {', '.join(registry)})")
    params = {name: registry[name].make_params(config.profile, probe_params.get(name, {})) for name in selected}

    manifest = load_manifest(config.manifest, config.classes, config.data_root)
    if config.max_samples is not None:
        manifest.samples = stratified_subset(manifest.samples, config.max_samples, config.seed)
    if not manifest.samples:
        reasons = "; ".join(f"{s.id}: {s.reason}" for s in manifest.skipped[:3])
        raise InputError(f"{config.manifest}: no usable sample ({len(manifest.skipped)} rows skipped: {reasons})")

    device = resolve_device(config.device)
    spec = InputSpec(channels=config.channels, size=tuple(config.input_size) if config.input_size else None, layout=config.layout)
    if not is_onnx(config.model) and (spec.size is None):
        first = _first_readable(manifest)
        spec.size = (int(first.shape[1]), int(first.shape[2]))
    tick = time.perf_counter()
    model = load_model(config.model, spec, device, config.weights, config.output_name)
    model_seconds = time.perf_counter() - tick
    if model.input_spec.channels is None:
        model.input_spec.channels = int(_first_readable(manifest).shape[0])
    prep = Preprocessing.create(model.input_spec.size, model.input_spec.channels, config.mean, config.std)  # type: ignore[arg-type]

    store = RunStore(config.resolved_out())
    store.prepare()
    classes: list[str] = list(config.classes) if config.classes else []

    def load_inputs(samples: Sequence[Sample]) -> tuple[list[Sample], np.ndarray]:
        good, arrays = [], []
        for sample in samples:
            try:
                arrays.append(load_sample(sample, prep))
                good.append(sample)
            except AuditError:
                continue
        empty = np.zeros((0, prep.channels, *prep.input_size), np.float32)
        return good, np.stack(arrays) if arrays else empty

    context = RunContext(manifest=manifest, model=model, classes=classes, prep=prep, store=store, seed=config.seed,
                         profile=config.profile, sample_images=config.sample_images,
                         reference_domain=config.reference_domain, load_inputs=load_inputs, progress=progress,
                         batch_size=config.batch_size)

    def on_interpretation(interpretation: Any) -> None:
        k = interpretation.num_classes
        if classes and len(classes) != k:
            raise InputError(f"{len(classes)} class names were given but the model outputs {k} classes")
        if not classes:
            classes.extend(str(i) for i in range(k))
        for sample in manifest.samples:
            if sample.label is not None and sample.label >= k:
                raise InputError(f"{manifest.path} row {sample.row}, column 'label': label index {sample.label} is out of range (the model has {k} classes)")

    outcomes: dict[str, ProbeOutcome] = {}
    probes = []
    for name in selected:
        cls = registry[name]
        probe = cls(params[name], context)
        outcome = outcomes[name] = ProbeOutcome()
        missing = model.missing(cls.requires)
        reason = "; ".join(f"needs {c.value}: {why}" for c, why in missing.items()) or probe.skip_reason()
        if reason:
            outcome.status, outcome.reason = "skipped", reason
        else:
            probes.append(probe)

    executor = LocalExecutor(context, probes, config.batch_size, config.workers, config.output_kind,
                             on_skip=lambda sample, reason: manifest.skip(sample, reason), on_interpretation=on_interpretation)
    executor.run(list(manifest.samples), outcomes)
    if context.interpretation is None:
        raise InputError(f"{config.manifest}: no sample could be read ({len(manifest.skipped)} rows skipped)")

    metrics: dict[str, float] = {}
    rows_total = manifest.rows
    metrics["manifest.rows"] = float(rows_total)
    metrics["manifest.skipped"] = float(len(manifest.skipped))
    metrics["manifest.skipped_fraction"] = len(manifest.skipped) / max(rows_total, 1)
    metrics["manifest.skipped_fraction:n"] = float(rows_total)
    for outcome in outcomes.values():
        if outcome.evidence is not None:
            metrics.update(outcome.evidence.metrics)

    states = {name: ProbeState(o.status, o.error or o.reason) for name, o in outcomes.items()}
    engine = RuleEngine(metrics, store.read_table, states)
    findings = [f.model_dump(mode="json") for f in engine.evaluate(rules, config.waivers)]
    findings = sort_findings(findings)

    thumbnails: dict[str, str] = {}
    if config.sample_images:
        from audit.thumbnails import write_thumbnails

        wanted = _thumbnail_ids(findings, store)
        by_id = {s.id: s for s in manifest.samples}
        thumbnails = write_thumbnails([by_id[i] for i in wanted if i in by_id], prep, store)

    results = {
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": "model-audit", "version": __version__},
        "run": {
            "started": started.isoformat(timespec="seconds"),
            "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(time.perf_counter() - clock, 3),
            "model_load_seconds": round(model_seconds, 3),
            "forward_seconds": round(executor.forward_seconds, 3),
            "load_seconds": round(executor.load_seconds, 3),
            "verdict": verdict(findings),
            "fail_on": config.fail_on,
            "profile": config.profile,
            "sample_images": config.sample_images,
        },
        "model": {
            **model.describe(),
            "output_kind": context.interpretation.kind,
            "num_classes": context.interpretation.num_classes,
            "classes": classes,
        },
        "manifest": manifest.describe(),
        "preprocessing": prep.describe(),
        "config": config.public_dict(),
        "metrics": dict(sorted(metrics.items())),
        "probes": {
            name: {
                "status": o.status,
                "seconds": round(o.seconds, 3),
                "error": o.error,
                "reason": o.reason,
                "title": registry[name].title,
                "question": registry[name].question,
                "references": list(dict.fromkeys(registry[name].references + (o.evidence.references if o.evidence else []))),
                "units": registry[name].units,
                "notes": o.evidence.notes if o.evidence else [],
                "details": o.evidence.details if o.evidence else {},
                "tables": o.tables,
            }
            for name, o in outcomes.items()
        },
        "rules": [r.public_dict() for r in rules],
        "findings": findings,
        "thumbnails": thumbnails,
        "provenance": environment(device, config.seed),
    }
    sha = store.write_results(results)
    reports, render_error = {}, None
    try:
        reports = render(store.root)
    except AuditError as exc:
        render_error = str(exc)
    except Exception as exc:  # noqa: BLE001 - the results are saved; `model-audit render` can retry
        render_error = f"rendering failed ({first_line(exc)}); results.json is saved, retry with `model-audit render {store.root}`"
    return RunOutcome(store.root, results, sha, exit_code(findings, config.fail_on), reports, render_error)


def _thumbnail_ids(findings: list[dict[str, Any]], store: RunStore, per_finding: int = 6, errors: int = 12) -> list[str]:
    """Evidence of non-passing findings, then the most confident mistakes for the predictions section."""
    wanted: list[str] = []
    for finding in findings:
        if finding["status"] in ("fail", "warn", "waived"):
            wanted.extend(finding["evidence"][:per_finding])
    table = store.read_table("predictions")
    if table is not None and "error_confidence" in table:
        worst = table.dropna(subset=["error_confidence"]).sort_values("error_confidence", ascending=False, kind="stable")
        wanted.extend(worst["id"].astype(str).head(errors))
    return list(dict.fromkeys(wanted))


def render(run_dir: Path | str, formats: Sequence[str] = ("html", "pdf", "junit")) -> dict[str, Path]:
    """Render reports from the run folder alone (no model, no data set)."""
    from audit.report import write_reports

    run_dir = Path(run_dir)
    results, sha = load_results(run_dir)
    return write_reports(run_dir, results, sha, formats)
