"""The rule engine: metrics and per-sample tables in, findings out. Imports no torch.

A rule reads either a precomputed metric (`predictions.recall@class:wolf`) or, with
`aggregate.stat`, a per-sample column aggregated per scope (`background.outside_ratio`, mean per
class), once for each scope kind it lists. A scope with fewer samples than `min_support` is
skipped, never passed or failed; a rule without thresholds reports `info` for every other scope.
A threshold with `confirmed_by` decides only when another metric at the same scope backs it; the
finding's message says which did, or that none did and the next threshold decided.
"""

from __future__ import annotations

import datetime as dt
import math
import string
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from audit.errors import printable
from audit.findings import JUDGED, SEVERITY_RANK, Finding, Severity, Status
from audit.metrics.names import display_scope, parse_key, parse_scope, scope, scope_kind
from audit.rules.ops import STATISTICS, SYMBOLS, compare, worse_direction
from audit.rules.schema import (
    BOUND_TEXT,
    POINTS_TYPE,
    Confirmation,
    RuleSpec,
    Threshold,
    scope_problem,
    simple_spec,
)

__all__ = ["Finding", "MetricIndex", "ProbeState", "RuleEngine", "ScopedValue", "apply_waivers", "confirmation_text", "points_text",
           "render_message", "threshold_text"]

RUN_LEVEL_PREFIXES = ("manifest",)
_SCOPE_COLUMNS = {"class": "class", "domain": "domain", "method": "method", "layer": "layer", "pair": "pair", "convention": "convention"}


@dataclass
class ProbeState:
    status: str  # "ok" | "skipped" | "error"
    reason: str | None = None


@dataclass
class ScopedValue:
    value: float
    n: int | None
    lo: float | None = None
    hi: float | None = None


class MetricIndex:
    """metrics dict -> {name: {scope: ScopedValue}}, built once per evaluation."""

    def __init__(self, metrics: dict[str, float]) -> None:
        raw: dict[tuple[str, str], dict[str | None, float]] = {}
        for key, value in metrics.items():
            parsed = parse_key(key)
            raw.setdefault((parsed.name, parsed.scope), {})[parsed.suffix] = value
        self._by_name: dict[str, dict[str, ScopedValue]] = {}
        for (name, scope_text), parts in raw.items():
            if None not in parts:
                continue
            n = parts.get("n")
            self._by_name.setdefault(name, {})[scope_text] = ScopedValue(parts[None], None if n is None else int(n), parts.get("lo"), parts.get("hi"))

    def scoped(self, name: str, per: str) -> dict[str, ScopedValue]:
        return {s: v for s, v in self._by_name.get(name, {}).items() if scope_kind(s) == per}

    def lookup(self, ref: str, scope_text: str) -> float | None:
        """`<metric>[:lo|:hi|:n]` at this scope; a metric reported only globally is read globally,
        so a per-class rule can quote a run-level number but never another scope's value."""
        name, _, suffix = ref.partition(":")
        scopes = self._by_name.get(name, {})
        sv = scopes.get(scope_text) or (scopes.get("global") if set(scopes) == {"global"} else None)
        if sv is None:
            return None
        return {"": sv.value, "lo": sv.lo, "hi": sv.hi, "n": sv.n}[suffix]


class _SafeFormatter(string.Formatter):
    """Message templates survive a missing value or threshold: they print 'n/a' instead of failing.

    Templates are checked when their rule is loaded (schema.check_template); this formatter holds to
    the same limits for any other text: a field is looked up by its whole name (no attribute or index
    access), and a format spec beyond the simple ones prints the value plainly."""

    def get_field(self, field_name: str, args: Any, kwargs: dict[str, Any]) -> tuple[Any, str]:
        return kwargs.get(field_name), field_name

    def convert_field(self, value: Any, conversion: str | None) -> Any:
        return value

    def format_field(self, value: Any, format_spec: str) -> str:
        if value is None:
            return "n/a"
        if isinstance(value, list):
            return "[" + ", ".join(self.format_field(v, format_spec) for v in value) + "]"
        if not simple_spec(format_spec):
            return str(value)
        try:
            if format_spec.endswith(POINTS_TYPE):
                return points_text(value, format_spec)
            return format(value, format_spec)
        except (TypeError, ValueError, OverflowError):
            return str(value)


_FORMATTER = _SafeFormatter()


def render_message(template: str, **fields: Any) -> str:
    return _FORMATTER.format(template, **fields)


def points_text(value: float, spec: str = ".0pt") -> str:
    """A difference of two shares in percentage points: `.0pt` gives '47 points' for 0.47, `+.0pt`
    '+47 points'. `%` would say '47%', which reads as a relative change of 47 percent."""
    number = format(100 * float(value), spec.removesuffix(POINTS_TYPE) + "f")
    try:
        one = abs(float(number.strip().replace(",", "").replace("_", ""))) == 1
    except ValueError:
        one = False
    return f"{number} point{'' if one else 's'}"


def _uses(template: str, field_name: str) -> bool:
    return any(name == field_name for _, name, _, _ in string.Formatter().parse(template))


def _quantity(value: float | None, unit: str | None) -> str:
    """A confirming metric's value or limit in its declared unit (its number alone when unknown)."""
    if value is None:
        return "n/a"
    if unit == "points":
        return points_text(value, ".0pt")
    if unit == "percent":
        return f"{value:.1%}"
    if unit == "ratio":
        return f"{value:.2f}x"
    return f"{value:.3g}"


TableLoader = Callable[[str], "pd.DataFrame | None"]


class RuleEngine:
    def __init__(
        self,
        metrics: dict[str, float],
        tables: TableLoader,
        probes: dict[str, ProbeState],
        owners: Mapping[str, str] | None = None,
        units: Mapping[str, str] | None = None,
    ) -> None:
        self.index = MetricIndex(metrics)
        self.tables = tables
        self.probes = probes
        self.owners = owners or {}  # declared metric or "<table>.<column>" -> the probe that produces it
        self.units = units or {}  # declared metric -> unit, for the confirmation text of a finding
        self._table_cache: dict[str, pd.DataFrame | None] = {}

    def evaluate(self, rules: Iterable[RuleSpec], waivers: Iterable[Any] = (), today: dt.date | None = None) -> list[Finding]:
        """Every rule's findings, waivers applied. Nothing is dropped silently: a rule gives at least
        one finding, and a waiver that waived nothing comes back as an `info` finding saying why."""
        rules = list(rules)
        findings: list[Finding] = []
        for rule in rules:
            found = self.evaluate_rule(rule)
            findings.extend(found or [self._blank(rule, Status.SKIPPED, "this rule produced no finding in this run")])
        return apply_waivers(findings, waivers, today or dt.date.today(), rules)

    def evaluate_rule(self, rule: RuleSpec) -> list[Finding]:
        probe = self.owners.get(rule.metric, rule.probe)  # a table column (`background_methods.x`) belongs to its probe
        state = ProbeState("ok") if probe in RUN_LEVEL_PREFIXES else self.probes.get(probe)
        if state is None:
            return [self._blank(rule, Status.SKIPPED, f"the {probe} probe was not run in this audit")]
        if state.status == "error":
            return [self._blank(rule, Status.ERROR, f"the {probe} probe failed: {state.reason}")]
        if state.status == "skipped":
            return [self._blank(rule, Status.SKIPPED, f"the {probe} probe was skipped: {state.reason}")]
        findings: list[Finding] = []
        for per in rule.aggregate.kinds:
            values = self._sample_values(rule, per) if rule.aggregate.stat else self.index.scoped(rule.metric, per)
            if not values:
                findings.append(self._blank(rule, Status.SKIPPED, f"no values for {rule.metric} per {per} in this run", (per,)))
            findings.extend(self._judge(rule, scope_text, values[scope_text]) for scope_text in sorted(values))
        return findings

    def _blank(self, rule: RuleSpec, status: Status, message: str, kinds: tuple[str, ...] | None = None) -> Finding:
        """A finding for a rule (or one of its scope kinds) that produced no value to judge."""
        severity = rule.top_severity if status is Status.ERROR else Severity.INFO
        kinds = kinds or rule.aggregate.kinds
        return Finding(rule=rule.id, rule_version=rule.version, title=rule.title, status=status, severity=severity,
                       scope="global" if kinds == ("global",) else "per " + ", ".join(kinds), metric=rule.metric, message=message,
                       remedy=render_message(rule.remedy, metric=rule.metric, rule=rule.id, status=status, min_support=rule.min_support))

    def _judge(self, rule: RuleSpec, scope_text: str, sv: ScopedValue) -> Finding:
        n = sv.n if sv.n is not None else 0
        parts = parse_scope(scope_text)
        fields = {"scope": display_scope(scope_text), "value": sv.value, "n": n, "metric": rule.metric, "rule": rule.id,
                  "min_support": rule.min_support, "lo": sv.lo, "hi": sv.hi, "confirmation": "",
                  "on_domain": f" on domain {parts['domain']}" if "domain" in parts else "", **parts,
                  **{name: self.index.lookup(ref, scope_text) for name, ref in (rule.values or {}).items()}}
        base = dict(rule=rule.id, rule_version=rule.version, title=rule.title, scope=scope_text, metric=rule.metric,
                    value=sv.value, n=n, remedy=render_message(rule.remedy, **fields))
        if sv.n is None or n < rule.min_support:
            return Finding(**base, status=Status.SKIPPED, severity=Severity.INFO,
                           message=f"{display_scope(scope_text)}: only {n} samples; this rule needs at least {rule.min_support}")
        if not rule.thresholds:
            fields["status"] = Status.INFO
            return Finding(**base, status=Status.INFO, severity=Severity.INFO, message=render_message(rule.message, **fields),
                           evidence=self._evidence(rule, scope_text))
        judged = [sv.value if t.bound is None else getattr(sv, t.bound) for t in rule.thresholds]
        if any(isinstance(v, float) and not math.isfinite(v) for v in judged):
            worst = max(rule.thresholds, key=lambda t: SEVERITY_RANK[t.severity])
            return Finding(**{**base, "value": None}, status=Status.ERROR, severity=worst.severity,
                           message=f"{display_scope(scope_text)}: {rule.metric} is not a finite number in this run, "
                                   "so this rule cannot judge it (a gate must not pass on a value it cannot read)")
        hit: Threshold | None = None
        notes: list[str] = []  # why a crossed threshold that needs confirmation did or did not decide
        for threshold in rule.thresholds:
            if threshold.bound is not None and getattr(sv, threshold.bound) is None:
                return Finding(**base, status=Status.SKIPPED, severity=Severity.INFO,
                               message=f"{display_scope(scope_text)}: the {BOUND_TEXT[threshold.bound]} of {rule.metric} "
                                       "is not in this run, and this rule judges it")
            if compare(threshold.op, sv.value if threshold.bound is None else getattr(sv, threshold.bound), threshold.value):
                if threshold.confirmed_by:
                    readings = [(c, self.index.lookup(c.ref, scope_text)) for c in threshold.confirmed_by]
                    backing = [(c, v) for c, v in readings if v is not None and math.isfinite(v) and compare(c.op, v, c.value)]
                    if not backing:
                        notes.append(f"{threshold.status} only if a counterfactual confirms it, and none does: "
                                     + "; ".join(self._reading(c, v) for c, v in readings))
                        continue
                    notes.append(f"{threshold.status} confirmed by " + "; ".join(self._reading(c, v) for c, v in backing))
                hit = threshold
                break
        limit = hit or rule.thresholds[-1]
        fields["threshold"] = limit.value
        fields["status"] = hit.status if hit else Status.PASS
        fields["confirmation"] = "; ".join(notes)
        decided = dict(threshold=limit.value, op=limit.op, bound=limit.bound)
        if hit is None:
            return Finding(**base, **decided, status=Status.PASS, severity=Severity.INFO,
                           message=self._message(rule.pass_message or rule.message, fields))
        return Finding(**base, **decided, status=hit.status, severity=hit.severity, message=self._message(rule.message, fields),
                       evidence=self._evidence(rule, scope_text))

    def _reading(self, confirmation: Confirmation, value: float | None) -> str:
        """'background.bg_gap lower bound 71 points (needs > 10 points)'."""
        unit = self.units.get(confirmation.metric)
        limit = threshold_text(confirmation.op, confirmation.value, lambda v: _quantity(v, unit))
        bound = f" {BOUND_TEXT[confirmation.bound]}" if confirmation.bound else ""
        return f"{confirmation.metric}{bound} {_quantity(value, unit)} (needs {limit})"

    @staticmethod
    def _message(template: str, fields: dict[str, Any]) -> str:
        """The rendered template; a confirmation it does not quote is appended, so it is never lost."""
        text = render_message(template, **fields)
        if fields["confirmation"] and not _uses(template, "confirmation"):
            text = f"{text}; {fields['confirmation']}"
        return text

    def _table(self, name: str) -> pd.DataFrame | None:
        """A per-sample table with `class` and `domain` columns (joined from predictions if absent)."""
        if name not in self._table_cache:
            table = self.tables(name)
            if table is not None and name != "predictions" and not {"class", "domain"} <= set(table.columns):
                base = self.tables("predictions")
                if base is not None:
                    keep = ["id"] + [c for c in ("class", "domain") if c not in table.columns]
                    table = table.merge(base[keep], on="id", how="left")
            self._table_cache[name] = table
        return self._table_cache[name]

    def _grouped(self, column_ref: str, per: str) -> tuple[pd.DataFrame, str, list[str]] | None:
        table_name, _, column = column_ref.partition(".")
        table = self._table(table_name)
        if table is None or column not in table.columns:
            return None
        keys = [] if per == "global" else [_SCOPE_COLUMNS[k] for k in per.split("/")]
        if any(k not in table.columns for k in keys):
            return None
        return table, column, keys

    def _sample_values(self, rule: RuleSpec, per: str) -> dict[str, ScopedValue]:
        grouped = self._grouped(rule.metric, per)
        if grouped is None:
            return {}
        table, column, keys = grouped
        stat = STATISTICS[rule.aggregate.stat]  # type: ignore[index]
        values: dict[str, ScopedValue] = {}
        for scope_text, frame in _groups(table, keys):
            data = pd.to_numeric(frame[column], errors="coerce").dropna().to_numpy(dtype=np.float64)
            if len(data) == 0:
                continue
            value = stat(data)
            if np.isfinite(value):
                values[scope_text] = ScopedValue(value, len(data))
        return values

    def _evidence(self, rule: RuleSpec, scope_text: str) -> list[str]:
        spec = rule.evidence
        if spec is None and rule.aggregate.stat is None:
            return []
        column_ref = spec.column if spec else rule.metric
        order = spec.order if spec else worse_direction(rule.thresholds[0].op) if rule.thresholds else "desc"
        limit = spec.limit if spec else 8
        per = scope_kind(scope_text)
        grouped = self._grouped(column_ref, "global" if per == "global" else per)
        if grouped is None:
            return []
        table, column, _ = grouped
        frame = table
        for kind, value in parse_scope(scope_text).items():
            frame = frame[frame[_SCOPE_COLUMNS[kind]] == value]
        values = pd.to_numeric(frame[column], errors="coerce")
        frame = frame.assign(_v=values).dropna(subset=["_v"]).sort_values("_v", ascending=order == "asc", kind="stable")
        return [str(i) for i in frame["id"].head(limit)]


def _groups(table: pd.DataFrame, keys: list[str]) -> Iterable[tuple[str, pd.DataFrame]]:
    if not keys:
        yield "global", table
        return
    for values, frame in table.dropna(subset=keys).groupby(keys, sort=True):
        values = values if isinstance(values, tuple) else (values,)
        parts = {("class_" if k == "class" else k): str(v) for k, v in zip(keys, values, strict=True)}
        yield scope(**parts), frame


WAIVER_REMEDY = ("Remove the waiver, or correct its rule or scope: `model-audit rules list` names the rules, "
                 "and results.json the scopes of their findings.")


def _expiry(waiver: Any) -> dt.date | None:
    expires = getattr(waiver, "expires", None)
    return dt.date.fromisoformat(str(expires)[:10]) if expires else None


def _expired(waiver: Any, today: dt.date) -> bool:
    expiry = _expiry(waiver)
    return expiry is not None and expiry < today


def apply_waivers(findings: list[Finding], waivers: Iterable[Any], today: dt.date,
                  rules: Iterable[RuleSpec] = ()) -> list[Finding]:
    """A matching, unexpired waiver marks a warn/fail finding `waived` and records who and why.

    A waiver that waives nothing (expired, naming no finding, or naming only findings that are not
    warn or fail) is appended as an `info` finding of its rule at its scope, its message starting
    `waiver ...` and naming it (`waivers.<index>`), so a typo or a stale waiver is seen. `rules`
    (those evaluated) give such a finding its title and metric."""
    indexed = list(enumerate(waivers))
    active = [(i, w) for i, w in indexed if not _expired(w, today)]
    used: set[int] = set()
    out = []
    for finding in findings:
        matching = [(i, w) for i, w in active if w.rule == finding.rule and w.scope in (finding.scope, "*")]
        if matching and finding.status in JUDGED:
            used.update(i for i, _ in matching)
            match = matching[0][1]
            finding = finding.model_copy(update={
                "waived_status": finding.status,
                "status": Status.WAIVED,
                "waiver": {"by": match.by, "reason": match.reason, "expires": str(match.expires) if match.expires else None},
            })
        out.append(finding)
    by_id = {rule.id: rule for rule in rules}
    for i, waiver in indexed:
        if i in used:
            continue
        named = [f for f in findings if f.rule == waiver.rule and waiver.scope in (f.scope, "*")]
        if _expired(waiver, today):
            why = f"waiver expired on {_expiry(waiver).isoformat()} and no longer applies"  # type: ignore[union-attr]
        elif not named:
            scopes = sorted({f.scope for f in findings if f.rule == waiver.rule})
            why = (f"waiver matched no finding: rule {waiver.rule!r} has no finding at scope {printable(waiver.scope)!r}"
                   + (f" (its scopes: {', '.join(scopes[:5])}{', ...' if len(scopes) > 5 else ''})" if scopes else
                      " (the rule was not evaluated in this run)"))
        else:
            statuses = sorted({str(f.status) for f in named})
            why = f"waiver waived nothing: the finding{'s' if len(named) > 1 else ''} it names {'are' if len(named) > 1 else 'is'} " \
                  f"{' / '.join(statuses)}, not warn or fail"
        out.append(_waiver_finding(i, waiver, why, by_id.get(waiver.rule)))
    return out


def _waiver_finding(index: int, waiver: Any, why: str, rule: RuleSpec | None) -> Finding:
    """The `info` finding that reports a waiver that waived nothing."""
    kinds = rule.aggregate.kinds if rule is not None else ("global",)
    scope_text = str(waiver.scope)
    if scope_text == "*" or scope_problem(scope_text):  # the rule as a whole, as an unevaluated rule's finding names it
        scope_text = "global" if kinds == ("global",) else "per " + ", ".join(kinds)
    who = f"waivers.{index}, by {printable(waiver.by)}: {printable(waiver.reason)}"
    return Finding(rule=str(waiver.rule), rule_version=rule.version if rule else 1,
                   title=rule.title if rule else f"waiver of {printable(waiver.rule)}", status=Status.INFO, severity=Severity.INFO,
                   scope=scope_text, metric=rule.metric if rule else "", message=f"{why} ({who})", remedy=WAIVER_REMEDY)


def threshold_text(op: str | None, threshold: float | list[float] | None,
                   fmt: Callable[[float], str] = lambda v: f"{v:.3g}", bound: str | None = None) -> str:
    """'< 70.0%' / 'in [0.1, 0.2]' / 'lower bound > 5.0%' for reports and listings."""
    if op is None or threshold is None:
        return ""
    prefix = f"{BOUND_TEXT[bound]} " if bound else ""
    if isinstance(threshold, list):
        return f"{prefix}{SYMBOLS[op]} [{fmt(threshold[0])}, {fmt(threshold[1])}]"
    return f"{prefix}{SYMBOLS[op]} {fmt(threshold)}"


def confirmation_text(threshold: Threshold, fmt: Callable[[float], str] = lambda v: f"{v:.3g}") -> str:
    """' when confirmed by background.bg_gap lower bound > 0.1 or ...' for listings ('' without confirmed_by),
    appended to threshold_text so a listed limit says it does not decide alone."""
    if not threshold.confirmed_by:
        return ""
    return " when confirmed by " + " or ".join(
        f"{c.metric} {threshold_text(c.op, c.value, fmt, c.bound)}" for c in threshold.confirmed_by)
