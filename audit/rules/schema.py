"""RuleSpec: the YAML rule format `model-audit/rule/v1`, validated with errors naming file and key.

`check_rules` then holds rules against what the probes declare they measure, so a misspelled
metric is refused when the rule is loaded instead of coming out `skipped` in every run.
"""

from __future__ import annotations

import difflib
import re
import string
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from audit.errors import RuleError
from audit.findings import JUDGED, SEVERITY_ORDER, Severity, Status
from audit.metrics.names import SUFFIXES

if TYPE_CHECKING:
    from audit.metrics.declarations import Declarations

SCHEMA = "model-audit/rule/v1"
SCOPE_PER = ("global", "class", "domain", "domain/class", "method", "layer", "pair", "method/class")
STATS = ("mean", "median", "min", "max", "sum", "rate", "p10", "p90", "std")
EVIDENCE_LIMIT = 1000  # ids a finding may carry; more would bloat results.json without helping a reader
THRESHOLD_STATUSES: tuple[Status, ...] = (*JUDGED, Status.INFO)
JUDGING_SEVERITIES: tuple[Severity, ...] = tuple(s for s in SEVERITY_ORDER if s is not Severity.INFO)
Bound = Literal["lo", "hi"]
BOUND_TEXT = {"lo": "lower bound", "hi": "upper bound"}
MESSAGE_FIELDS = {"scope", "value", "threshold", "n", "class", "domain", "method", "layer", "pair", "metric", "rule", "status",
                  "min_support", "lo", "hi"}
METRIC_PATTERN = r"^[a-z_]+\.[a-z0-9_.]+$"
VALUE_PATTERN = r"^[a-z_]+\.[a-z0-9_.]+(:(" + "|".join(SUFFIXES) + r"))?$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _listing(items: Iterable[str]) -> str:
    return ", ".join(str(i) for i in items)


class Threshold(_Strict):
    """One comparison; the first that holds decides the status. Listed most severe first.

    `bound` compares the metric's interval bound instead of its point estimate, so a rule can ask
    that a gap be clear of sampling noise. An `info` threshold notes a value without judging it.
    """

    op: Literal["gt", "ge", "lt", "le", "eq", "ne", "between", "outside"]
    value: float | list[float]
    status: Status
    severity: Severity | None = None
    bound: Bound | None = None

    @field_validator("status", mode="before")
    @classmethod
    def _threshold_status(cls, value: Any) -> Any:
        if value not in THRESHOLD_STATUSES:
            raise ValueError(f"must be one of {_listing(THRESHOLD_STATUSES)}")
        return value

    @model_validator(mode="after")
    def _range_ops_take_two_values(self) -> Threshold:
        ranged = self.op in ("between", "outside")
        if ranged != isinstance(self.value, list) or (ranged and len(self.value) != 2):
            raise ValueError(f"op {self.op!r} takes {'a list [low, high]' if ranged else 'a single number'}")
        return self

    @model_validator(mode="after")
    def _severity_fits_status(self) -> Threshold:
        if self.status is Status.INFO:
            if self.severity not in (None, Severity.INFO):
                raise ValueError("an info threshold has severity info (or none)")
            self.severity = Severity.INFO
        elif self.severity not in JUDGING_SEVERITIES:
            raise ValueError(f"a {self.status} threshold needs a severity: {_listing(JUDGING_SEVERITIES)}")
        return self


class Aggregate(_Strict):
    """`per` names the scope kind, or a list of kinds the rule is evaluated for one after the other;
    `stat` (per-sample mode) aggregates a per-sample column."""

    per: str | list[str] = "global"
    stat: Literal["mean", "median", "min", "max", "sum", "rate", "p10", "p90", "std"] | None = None

    @field_validator("per")
    @classmethod
    def _known_scope(cls, value: str | list[str]) -> str | list[str]:
        kinds = [value] if isinstance(value, str) else value
        if not kinds:
            raise ValueError("list at least one scope kind")
        kinds = [kind.replace("_", "/") for kind in kinds]
        unknown = [kind for kind in kinds if kind not in SCOPE_PER]
        if unknown:
            raise ValueError(f"per must be one of {_listing(SCOPE_PER)} (or a list of them), not {unknown[0]!r}")
        if len(set(kinds)) != len(kinds):
            raise ValueError("lists a scope kind twice")
        return kinds[0] if isinstance(value, str) else kinds

    @property
    def kinds(self) -> tuple[str, ...]:
        return (self.per,) if isinstance(self.per, str) else tuple(self.per)

    @property
    def text(self) -> str:
        """'class' or 'class, domain/class', for messages and listings."""
        return _listing(self.kinds)


class EvidenceSpec(_Strict):
    """Which per-sample column orders the evidence (worst first), e.g. predictions.error_confidence."""

    column: str
    order: Literal["asc", "desc"] = "desc"
    limit: int = Field(default=8, ge=0, le=EVIDENCE_LIMIT)


class RuleSpec(_Strict):
    """A rule without thresholds is informational: every scope it can judge gives an `info` finding."""

    schema_: str = Field(alias="schema")
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")
    version: int = Field(default=1, ge=1)
    title: str
    description: str | None = None
    metric: str = Field(pattern=METRIC_PATTERN)
    aggregate: Aggregate = Field(default_factory=Aggregate)
    min_support: int = Field(default=1, ge=0)
    thresholds: list[Threshold] | None = Field(default=None, min_length=1)
    values: dict[str, str] | None = None  # validated before the templates that may name its keys
    message: str
    pass_message: str | None = None
    remedy: str
    rationale: str | None = None
    evidence: EvidenceSpec | None = None
    references: list[str] = Field(default_factory=list)
    source: str | None = Field(default=None, exclude=True)

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @field_validator("schema_")
    @classmethod
    def _known_schema(cls, value: str) -> str:
        if value != SCHEMA:
            raise ValueError(f"must be {SCHEMA!r}")
        return value

    @field_validator("thresholds")
    @classmethod
    def _bounds_need_intervals(cls, value: list[Threshold] | None, info: ValidationInfo) -> list[Threshold] | None:
        aggregate = info.data.get("aggregate")
        if aggregate is not None and aggregate.stat and any(t.bound for t in value or ()):
            raise ValueError("a bound is judged on a metric's interval; an aggregated per-sample column (aggregate.stat) has none")
        return value

    @field_validator("values")
    @classmethod
    def _named_values(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        for name, ref in (value or {}).items():
            if not name.isidentifier() or name in MESSAGE_FIELDS:
                raise ValueError(f"{name!r} must be a new placeholder name (not one of {_listing(sorted(MESSAGE_FIELDS))})")
            if not re.fullmatch(VALUE_PATTERN, ref):
                raise ValueError(f"{name}: {ref!r} must be a metric name <probe>.<metric>[:lo|:hi|:n]")
        return value

    @field_validator("message", "pass_message", "remedy")
    @classmethod
    def _known_placeholders(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return value
        allowed = MESSAGE_FIELDS | set(info.data.get("values") or {})
        try:
            parsed = list(string.Formatter().parse(value))
        except ValueError as exc:
            raise ValueError(f"not a valid template ({exc}); write a literal brace as {{{{ or }}}}") from None
        for _, field_name, _, _ in parsed:
            if field_name is not None and field_name not in allowed:
                raise ValueError(f"unknown placeholder {{{field_name}}}; use {_listing(sorted(allowed))}")
        return value

    @property
    def probe(self) -> str:
        return self.metric.split(".", 1)[0]

    @property
    def judges(self) -> bool:
        """Whether any threshold can conclude fail or warn (otherwise the rule only informs)."""
        return any(t.status in JUDGED for t in self.thresholds or ())

    @property
    def top_severity(self) -> Severity:
        return min((t.severity for t in self.thresholds or () if t.severity), key=SEVERITY_ORDER.index, default=Severity.INFO)

    def public_dict(self) -> dict[str, Any]:
        """The rule as results.json records it; an informational rule lists no thresholds, as `[]`."""
        data = self.model_dump(mode="json", by_alias=True, exclude_none=True)
        data.setdefault("thresholds", [])
        data["source"] = self.source
        return data


def parse_rule(data: Any, source: str) -> RuleSpec:
    if not isinstance(data, dict):
        raise RuleError(f"{source}: a rule file must be a YAML mapping")
    try:
        rule = RuleSpec.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        key = ".".join(str(p) for p in error["loc"]).replace("schema_", "schema") or "(top level)"
        if error["type"] == "extra_forbidden":
            message = f"{source}: unknown key '{key}'"
        elif error["type"] == "missing":
            message = f"{source}: missing key '{key}'"
        else:
            message = f"{source}: key '{key}': {error['msg'].removeprefix('Value error, ')}"
        more = len(exc.errors()) - 1
        raise RuleError(message + (f" (and {more} more problem{'s' if more > 1 else ''})" if more else "")) from None
    rule.source = source
    return rule


def load_rule_file(path: Path, declared: Declarations | None = None) -> list[RuleSpec]:
    """A file holds one rule, or several as a YAML list or as `---`-separated documents. With
    `declared`, every metric and column the rules name must be declared by a probe."""
    try:
        documents = [d for d in yaml.safe_load_all(Path(path).read_text(encoding="utf-8")) if d is not None]
    except FileNotFoundError:
        raise RuleError(f"{path}: rule file not found") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise RuleError(f"{path}:{where} not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
    rules: list[RuleSpec] = []
    for document in documents:
        for item in document if isinstance(document, list) else [document]:
            rules.append(parse_rule(item, str(path)))
    if not rules:
        raise RuleError(f"{path}: the file holds no rule")
    if declared is not None:
        check_rules(rules, declared)
    return rules


def _split_suffix(ref: str) -> tuple[str, str | None]:
    name, sep, suffix = ref.partition(":")
    return name, suffix if sep else None


def closest_names(ref: str, pool: Iterable[str], n: int = 3) -> list[str]:
    """Declared names whose metric part is close to `ref`'s, best first. Comparing whole names would
    call every metric of the same probe close, since they share the `<probe>.` prefix."""
    names = list(pool)
    by_leaf: dict[str, list[str]] = {}
    for name in names:
        by_leaf.setdefault(name.partition(".")[2], []).append(name)
    matches = [name for leaf in difflib.get_close_matches(ref.partition(".")[2], list(by_leaf), n=n)
               for name in sorted(by_leaf[leaf], key=lambda name: -difflib.SequenceMatcher(None, ref, name).ratio())]
    return matches[:n] or difflib.get_close_matches(ref, names, n=n, cutoff=0.8)


def _undeclared(ref: str, pool: Iterable[str], what: str) -> str:
    close = closest_names(ref, pool)
    hint = f"closest: {_listing(close)}" if close else "no declared name is close"
    return f"{ref!r} is not declared by any probe{what} ({hint})"


def rule_problems(rule: RuleSpec, declared: Declarations) -> list[str]:
    """`key: problem` for each name the rule reads that no probe declares, in the rule's key order."""
    metrics, columns = declared.metrics, declared.columns
    problems: list[str] = []

    def need_metric(key: str, ref: str) -> None:
        name, suffix = _split_suffix(ref)
        if name not in metrics:
            problems.append(f"{key}: {_undeclared(name, metrics, '')}")
        elif suffix in ("lo", "hi") and not metrics[name].interval:
            problems.append(f"{key}: {name!r} is declared without an interval, so it has no :{suffix} bound")

    def need_column(key: str, ref: str) -> None:
        if ref not in columns:
            problems.append(f"{key}: {_undeclared(ref, columns, ' as a table column')}")

    if rule.aggregate.stat:
        need_column("metric", rule.metric)
    else:
        need_metric("metric", rule.metric)
        spec = metrics.get(rule.metric)
        if spec is not None:
            missing = [kind for kind in rule.aggregate.kinds if kind not in spec.scopes]
            if missing:
                problems.append(f"aggregate.per: {rule.metric!r} is not reported per {missing[0]} (it is per {_listing(spec.scopes)})")
    for i, threshold in enumerate(rule.thresholds or ()):
        if threshold.bound is not None and rule.metric in metrics:
            need_metric(f"thresholds.{i}.bound", f"{rule.metric}:{threshold.bound}")
    for name, ref in (rule.values or {}).items():
        need_metric(f"values.{name}", ref)
    if rule.evidence is not None:
        need_column("evidence.column", rule.evidence.column)
    return list(dict.fromkeys(problems))


def check_rules(rules: Iterable[RuleSpec], declared: Declarations) -> None:
    """Raise one RuleError line `<file>: <key>: <problem>` for the first undeclared name, counting the rest."""
    problems = [f"{rule.source or rule.id}: {problem}" for rule in rules for problem in rule_problems(rule, declared)]
    if problems:
        more = len(problems) - 1
        raise RuleError(problems[0] + (f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""))
