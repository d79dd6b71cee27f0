"""The plan: which probes run, on which samples, in which order, and why the others are skipped.

Everything here is decided before the first pass over the data, from the config, the manifest and
the model, so a probe that cannot run says why before any work is spent on it:
- the probes selected (config and profile), with validated parameters;
- the samples (the manifest, or its stratified subset);
- how the model's output is read, and that the class names and labels fit it: decided on one fixed
  probe batch (the first `PROBE_BATCH` readable samples, whatever `--batch-size` is), so batching
  never changes the interpretation;
- per probe: the capabilities it needs, the taps it needs (the adapter must serve them and they
  must work on the probe batch), its data (e.g. masks); otherwise it is skipped with the reason;
- the order: producers of declared tables before the probes that consume them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from audit.data import Batch, Preprocessing, load_sample, read_input
from audit.errors import InputError, ModelLoadError, SampleError, first_line
from audit.manifest import Manifest, load_manifest, stratified_subset
from audit.models.outputs import OutputInterpretation, interpret
from audit.probes.base import ContractError, Probe, ProbeParams, RunContext

if TYPE_CHECKING:
    from audit.config import AuditConfig
    from audit.models.base import InputSpec, ModelAdapter

PROBE_BATCH = 16  # samples the output interpretation, class check and tap check are decided on


@dataclass(frozen=True)
class Selection:
    """The probes the config asks for, in report (registry) order, with validated parameters."""

    order: list[str]
    params: dict[str, ProbeParams]


def select_probes(config: AuditConfig, registry: dict[str, type[Probe]]) -> Selection:
    probe_params = {name: dict(values) for name, values in config.probe_params.items()}
    disabled = {name for name, values in probe_params.items() if values.pop("enabled", True) is False}
    asked = config.probes if config.probes is not None else list(registry)
    unknown = [p for p in [*asked, *probe_params] if p not in registry]
    if unknown:
        raise InputError(f"unknown probe {unknown[0]!r} (available: {', '.join(registry)})")
    selected = [p for p in asked if p not in disabled]
    return Selection(selected, {name: registry[name].make_params(config.profile, probe_params.get(name, {})) for name in selected})


def open_manifest(config: AuditConfig) -> Manifest:
    """The manifest's usable samples, or the stratified subset `--max-samples` asks for."""
    manifest = load_manifest(config.manifest, config.classes, config.data_root)
    if config.max_samples is not None:
        manifest.samples = stratified_subset(manifest.samples, config.max_samples, config.seed)
    if not manifest.samples:
        reasons = "; ".join(f"{s.id}: {s.reason}" for s in manifest.skipped[:3])
        raise InputError(f"{config.manifest}: no usable sample ({len(manifest.skipped)} rows skipped: {reasons})")
    return manifest


def check_run_inputs(config: AuditConfig, manifest: Manifest) -> None:
    """What the config says about the data, checked against the manifest before any compute: a
    `reference_domain` the manifest lacks would leave every domain comparison unjudged."""
    domains = manifest.domains
    if config.reference_domain is not None and config.reference_domain not in domains:
        listed = ", ".join(domains) if domains else "none: the manifest has no 'domain' column"
        raise InputError(f"reference_domain {config.reference_domain!r} is not a domain of {manifest.path} (domains: {listed})")


GEOMETRY_SAMPLES = 32  # readable samples a torch model's input size and channels are inferred from
LISTED_SIZES = 20  # samples of other sizes named in results.json (all are counted)


def infer_geometry(spec: InputSpec, manifest: Manifest, max_pixels: int) -> dict[str, Any] | None:
    """A torch model's input size, when not given, from the data: the most common over the first
    `GEOMETRY_SAMPLES` readable samples, ties to the first seen (one odd first image must not resize
    every input); samples of other sizes are counted and listed. Returns what was inferred, with the
    most common channel count (`channels`) for a model whose file does not fix it; None when both
    were given."""
    from audit.data import source_size

    if spec.size is not None and spec.channels is not None:
        return None
    shapes: list[tuple[int, ...]] = []
    for sample in list(manifest.samples):
        if len(shapes) == GEOMETRY_SAMPLES:
            break
        try:
            shapes.append(read_input(sample.path, max_pixels).shape)
        except SampleError as exc:
            manifest.skip(sample, str(exc))
    if not shapes:
        raise InputError(f"{manifest.path}: no sample could be read ({len(manifest.skipped)} rows skipped)")
    inferred: dict[str, Any] = {"from_samples": len(shapes), "channels": Counter(int(shape[0]) for shape in shapes).most_common(1)[0][0]}
    if spec.size is None:
        size = Counter(tuple(int(v) for v in shape[1:]) for shape in shapes).most_common(1)[0][0]
        spec.size = size  # type: ignore[assignment]
        others = []
        for sample in manifest.samples:
            try:
                own = source_size(sample.path)
            except Exception:  # noqa: BLE001 - an unreadable file is skipped, with its reason, when it is loaded
                continue
            if own != size:
                others.append({"id": sample.id, "size": list(own)})
        inferred.update(size=list(size), other_sizes=len(others), other_size_samples=others[:LISTED_SIZES])
    return inferred


def probe_batch(manifest: Manifest, prep: Preprocessing, size: int = PROBE_BATCH) -> Batch:
    """The first `size` readable samples, loaded as the forward pass loads them."""
    samples, arrays = [], []
    for sample in list(manifest.samples):
        if len(samples) == size:
            break
        try:
            arrays.append(load_sample(sample, prep))
            samples.append(sample)
        except SampleError as exc:
            manifest.skip(sample, str(exc))
    if not samples:
        raise InputError(f"{manifest.path}: no sample could be read ({len(manifest.skipped)} rows skipped)")
    raw = np.stack(arrays)
    return Batch(samples, prep.normalise(raw), raw)


def read_output(model: ModelAdapter, batch: Batch, output_kind: str, classes: list[str] | None,
                manifest: Manifest) -> tuple[OutputInterpretation, tuple[str, ...]]:
    """How to read the output, and the class names; labels outside the model's classes are an error."""
    try:
        raw = model.forward(batch.x)["output"]
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - the model cannot run on the data at all: nothing to audit
        raise ModelLoadError(f"the model fails on the first {len(batch)} samples ({first_line(exc)}); "
                             "check --input-size, --channels, --layout and --mean/--std") from None
    interpretation = interpret(raw, output_kind)
    k = interpretation.num_classes
    if classes and len(classes) != k:
        source = model.files[0].path if model.files else "the model"
        raise InputError(f"--classes: {len(classes)} class names were given ({', '.join(classes[:4])}{', ...' if len(classes) > 4 else ''}) "
                         f"but {source} outputs {k} classes; the names must list the model's outputs in order")
    for sample in manifest.samples:
        if sample.label is not None and sample.label >= k:
            raise InputError(f"{manifest.path} row {sample.row}, column 'label': label index {sample.label} is out of range (the model has {k} classes)")
    return interpretation, tuple(classes) if classes else tuple(str(i) for i in range(k))


@dataclass
class Plan:
    order: list[str]  # every selected probe, report order
    probes: list[Probe]  # the probes that run, producers before consumers
    skipped: dict[str, str]  # selected probes that do not run, and why
    producers: dict[str, str]  # declared table -> the probe that provides it


def producers_of(registry: dict[str, type[Probe]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, cls in registry.items():
        for spec in cls.provides:
            if spec.name in out:
                raise ContractError(f"table {spec.name!r} is provided by both {out[spec.name]} and {name}")
            if spec.name != name and not spec.name.startswith(f"{name}_"):
                raise ContractError(f"{name} provides {spec.name!r}; its tables are named {name} or {name}_<what>")
            out[spec.name] = name
    return out


def build_plan(selection: Selection, registry: dict[str, type[Probe]], context: RunContext, batch: Batch) -> Plan:
    """Instantiate the selected probes and decide which run; `batch` is the probe batch."""
    model = context.model
    producers = producers_of(registry)
    skipped: dict[str, str] = {}
    candidates: list[Probe] = []
    for name in selection.order:
        probe = registry[name](selection.params[name], context)
        missing = model.missing(registry[name].requires)
        reason = "; ".join(f"needs {c.value}: {why}" for c, why in missing.items()) or probe.skip_reason()
        reason = reason or next((f"needs tap {tap}: {why}" for tap in sorted(probe.taps()) if (why := model.tap_reason(tap))), None)
        if reason:
            skipped[name] = reason
        else:
            candidates.append(probe)
    failing = _failing_taps(model, batch, frozenset().union(*(p.taps() for p in candidates)))
    runnable = []
    for probe in candidates:
        broken = sorted(set(probe.taps()) & set(failing))
        if broken:
            skipped[probe.name] = f"needs tap {broken[0]}, which fails on the first samples: {failing[broken[0]]}"
        else:
            runnable.append(probe)
    return Plan(list(selection.order), execution_order(runnable, producers), skipped, producers)


def _failing_taps(model: ModelAdapter, batch: Batch, taps: frozenset[str]) -> dict[str, str]:
    """The taps that raise on the probe batch, each with its error (tried together, then alone)."""
    if not taps:
        return {}
    try:
        model.forward(batch.x, taps)
        return {}
    except Exception:  # noqa: BLE001 - find out which tap it was
        pass
    failing = {}
    for tap in sorted(taps):
        try:
            model.forward(batch.x, frozenset({tap}))
        except Exception as exc:  # noqa: BLE001
            failing[tap] = first_line(exc)
    return failing


def execution_order(probes: list[Probe], producers: dict[str, str]) -> list[Probe]:
    """Selection order, except that a probe comes after the producers of what it consumes."""
    names = {p.name for p in probes}
    placed: list[Probe] = []
    pending = list(probes)
    while pending:
        for probe in pending:
            needs = {producers.get(c.table) for c in probe.consumes} & names - {probe.name}
            if needs <= {p.name for p in placed}:
                placed.append(probe)
                pending.remove(probe)
                break
        else:
            raise ContractError(f"probe inputs form a cycle: {[p.name for p in pending]}")
    return placed


def load_audited_model(config: AuditConfig, manifest: Manifest) -> tuple[ModelAdapter, float]:
    """The model, with what its file does not fix taken from the data (a torch model's input size and
    channels: `infer_geometry`); returns it and the seconds it took to load."""
    import time

    from audit.models import InputSpec, is_onnx, load_model, resolve_device

    device = resolve_device(config.device)
    spec = InputSpec(channels=config.channels, size=tuple(config.input_size) if config.input_size else None, layout=config.layout)
    found = None if is_onnx(config.model) else infer_geometry(spec, manifest, config.max_image_pixels)  # ONNX files fix theirs
    tick = time.perf_counter()
    model = load_model(config.model, spec, device, config.weights, config.output_name, embedding_layer=config.embedding_layer,
                       trust_pickle=config.trust_pickle)
    seconds = time.perf_counter() - tick
    if found is not None:
        if model.input_spec.channels is None:  # neither given nor fixed by the model's first convolution
            model.input_spec.channels = found["channels"]
        else:
            del found["channels"]
        model.input_spec.inferred = found if {"size", "channels"} & set(found) else None
    return model, seconds
