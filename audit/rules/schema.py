"""RuleSpec: the YAML rule format `model-audit/rule/v1`, validated with errors naming file and key.

`check_rules` then holds rules against what the probes declare they measure, so a misspelled
metric is refused when the rule is loaded instead of coming out `skipped` in every run.
"""

from __future__ import annotations

import difflib
import math
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

from audit.errors import RuleError, printable
from audit.findings import JUDGED, SEVERITY_ORDER, Severity, Status
from audit.metrics.names import SUFFIXES, parse_scope, scope

if TYPE_CHECKING:
    from audit.metrics.declarations import Declarations

SCHEMA = "model-audit/rule/v1"
SCOPE_PER = ("global", "class", "domain", "domain/class", "method", "layer", "pair", "method/class", "convention")
STATS = ("mean", "median", "min", "max", "sum", "rate", "p10", "p90", "std")
EVIDENCE_LIMIT = 1000  # ids a finding may carry; more would bloat results.json without helping a reader
THRESHOLD_STATUSES: tuple[Status, ...] = (*JUDGED, Status.INFO)
JUDGING_SEVERITIES: tuple[Severity, ...] = tuple(s for s in SEVERITY_ORDER if s is not Severity.INFO)
Bound = Literal["lo", "hi"]
BOUND_TEXT = {"lo": "lower bound", "hi": "upper bound"}
MESSAGE_FIELDS = {"scope", "value", "threshold", "n", "class", "domain", "method", "layer", "pair", "metric", "rule", "status",
                  "min_support", "lo", "hi", "on_domain", "confirmation"}
TEMPLATE_KEYS = ("message", "pass_message", "remedy")  # the texts the engine formats with a finding's fields
MAX_FORMAT_WIDTH = 50  # widths and precisions in a placeholder's format spec; more only pads a report
FORMAT_TYPES = "deEfFgGn%s"
POINTS_TYPE = "pt"  # a difference of two shares in percentage points: {value:.0pt} -> "47 points" for 0.47
# [[fill]align][sign][z][#][0][width][grouping][.precision][type]: Python's format mini-language without nesting
FORMAT_SPEC = re.compile(r"(?:(?P<fill>[^{}])?(?P<align>[<>=^]))?[-+ ]?z?#?0?(?P<width>[0-9]+)?[,_]?"
                         r"(?:\.(?P<precision>[0-9]+))?(?P<type>[" + FORMAT_TYPES + r"]|" + POINTS_TYPE + r")?")
ID_PATTERN = r"^[a-z0-9][a-z0-9-]*$"
METRIC_PATTERN = r"^[a-z_]+\.[a-z0-9_.]+$"
VALUE_PATTERN = r"^[a-z_]+\.[a-z0-9_.]+(:(" + "|".join(SUFFIXES) + r"))?$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _listing(items: Iterable[str]) -> str:
    return ", ".join(str(i) for i in items)


def finite_number(value: Any) -> float:
    """A threshold value as a finite float; NaN, infinities and booleans are refused."""
    if isinstance(value, bool):
        raise ValueError(f"must be a number, not {str(value).lower()}")
    try:
        number = float(value)
    except OverflowError:
        raise ValueError("is too large for a number") from None
    except (TypeError, ValueError):
        raise ValueError(f"must be a number, not {printable(repr(value))[:40]}") from None
    if not math.isfinite(number):
        raise ValueError(f"must be a finite number, not {number}")
    return number


SCOPE_GRAMMAR = ("global, class:C, domain:D, domain:D/class:C, method:M, layer:L, pair:A->B or convention:P, as results.json "
                 "writes them (a / : % @ in a name escaped as %2F %3A %25 %40)")


def scope_problem(text: str) -> str | None:
    """Why `text` is not a scope the engine can produce (None: it is one). Segments must be in the
    engine's order (domain, class, ...) and escaped as it escapes them, or they would match nothing."""
    if text == "global":
        return None
    try:
        parts = parse_scope(text)
    except ValueError:
        return f"{printable(text)!r} is not a scope; write {SCOPE_GRAMMAR}"
    empty = [kind for kind, value in parts.items() if not value]
    if empty:
        return f"{printable(text)!r} names no {empty[0]}"
    canonical = scope(**{("class_" if kind == "class" else kind): value for kind, value in parts.items()})
    if canonical != text:
        return f"{printable(text)!r} is not written as the engine writes scopes; write {printable(canonical)!r}"
    return None


def spec_number(digits: str | None) -> int:
    """A width or precision of a format spec, capped (int() refuses very long digit strings)."""
    if digits is None:
        return 0
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) <= 9 else 10**9


def simple_spec(spec: str) -> bool:
    """Whether a format spec is one message templates may use (see check_template)."""
    match = FORMAT_SPEC.fullmatch(spec)
    return (match is not None and (match["fill"] is None or match["fill"].isprintable())
            and all(spec_number(match[p]) <= MAX_FORMAT_WIDTH for p in ("width", "precision")))


def check_template(text: str, allowed: Iterable[str]) -> None:
    """Refuse what a message template may not do: unknown, positional, attribute or indexed fields
    (`{x.__class__}`, `{x[0]}`), conversions (`!r`), nested fields in a format spec, and specs beyond
    the simple ones (`.1%`, `.3f`, `d`, `,`, `>8`) or wider than MAX_FORMAT_WIDTH."""
    allowed = set(allowed)
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as exc:
        raise ValueError(f"not a valid template ({exc}); write a literal brace as {{{{ or }}}}") from None
    for _, field_name, spec, conversion in parsed:
        if field_name is None:
            continue
        shown = "{" + printable(field_name) + "}"
        if field_name == "" or field_name.isdigit():
            raise ValueError(f"positional placeholder {shown}; name a field: {_listing(sorted(allowed))}")
        if any(ch in field_name for ch in ".["):
            raise ValueError(f"placeholder {shown} reads an attribute or an index; name a field as it is: {_listing(sorted(allowed))}")
        if field_name not in allowed:
            raise ValueError(f"unknown placeholder {shown}; use {_listing(sorted(allowed))}")
        if conversion is not None:
            raise ValueError(f"placeholder {{{field_name}!{printable(conversion)}}}: conversions (!r, !s, !a) are not supported")
        spec = spec or ""
        if "{" in spec or "}" in spec:
            raise ValueError(f"placeholder {{{field_name}:{printable(spec)}}}: a format spec cannot hold another placeholder")
        match = FORMAT_SPEC.fullmatch(spec)
        if match is None or (match["fill"] is not None and not match["fill"].isprintable()):
            raise ValueError(f"placeholder {{{field_name}:{printable(spec)}}}: not a simple format spec "
                             f"(e.g. .1%, .0pt, .3f, d, ',', >8; types {_listing([*FORMAT_TYPES, POINTS_TYPE])})")
        for part in ("width", "precision"):
            number = spec_number(match[part])
            if number > MAX_FORMAT_WIDTH:
                shown_spec = spec if len(spec) <= 20 else spec[:20] + "..."
                raise ValueError(f"placeholder {{{field_name}:{shown_spec}}}: {part} {number if number < 10**9 else 'of ' + str(len(match[part])) + ' digits'} "
                                 f"is over the limit of {MAX_FORMAT_WIDTH}")


class _Comparison(_Strict):
    """`op` against `value`, optionally on an interval bound (`bound: lo | hi`) instead of the point
    estimate, so a rule can ask that a gap be clear of sampling noise."""

    op: Literal["gt", "ge", "lt", "le", "eq", "ne", "between", "outside"]
    value: float | list[float]

    @field_validator("value", mode="before")
    @classmethod
    def _finite_values(cls, value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [finite_number(v) for v in value]
        return finite_number(value)

    @model_validator(mode="after")
    def _range_ops_take_two_values(self) -> _Comparison:
        ranged = self.op in ("between", "outside")
        if ranged != isinstance(self.value, list) or (ranged and len(self.value) != 2):
            raise ValueError(f"op {self.op!r} takes {'a list [low, high]' if ranged else 'a single number'}")
        if ranged and self.value[0] > self.value[1]:  # type: ignore[index]
            raise ValueError(f"op {self.op!r} takes [low, high] with low <= high, not {self.value}")
        return self


class Confirmation(_Comparison):
    """Another metric at the finding's scope that backs a threshold: `{metric, bound, op, value}`.

    A proxy measurement (where attribution falls) can look alarming for reasons that are not the
    defect asked about; a counterfactual on the same scope (the answer changes when the background
    does) says whether the model depends on it. A threshold with `confirmed_by` applies only when
    one of them holds; otherwise the next threshold is tried."""

    metric: str = Field(pattern=METRIC_PATTERN)
    bound: Bound | None = None

    @property
    def ref(self) -> str:
        """`<metric>[:lo|:hi]`, as MetricIndex.lookup and `values:` read it."""
        return f"{self.metric}:{self.bound}" if self.bound else self.metric


class Threshold(_Comparison):
    """One comparison; the first that holds (and, with `confirmed_by`, is confirmed) decides the
    status. Listed most severe first. An `info` threshold notes a value without judging it."""

    status: Status
    severity: Severity | None = None
    bound: Bound | None = None
    confirmed_by: list[Confirmation] | None = Field(default=None, min_length=1)

    @field_validator("status", mode="before")
    @classmethod
    def _threshold_status(cls, value: Any) -> Any:
        if value not in THRESHOLD_STATUSES:
            raise ValueError(f"must be one of {_listing(THRESHOLD_STATUSES)}")
        return value

    @model_validator(mode="after")
    def _only_verdicts_are_confirmed(self) -> Threshold:
        if self.confirmed_by and self.status is Status.INFO:
            raise ValueError("confirmed_by backs a fail or warn verdict; an info threshold judges nothing")
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
    id: str = Field(pattern=ID_PATTERN)
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

    @field_validator(*TEMPLATE_KEYS)
    @classmethod
    def _known_placeholders(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None:
            check_template(value, MESSAGE_FIELDS | set(info.data.get("values") or {}))
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


_UNION_MEMBER = re.compile(r"^(str|int|float|bool|none|(list|dict|tuple|function-\w+|union|tagged-union|chain|nullable)\[.*\])$")


def _error_key(error: Any) -> str:
    """The dotted key of a pydantic error, without the union member names pydantic adds to it."""
    loc = [str(p) for p in error["loc"]]
    kept = [p for i, p in enumerate(loc) if not (_UNION_MEMBER.match(p) and not (error["type"] == "extra_forbidden" and i == len(loc) - 1))]
    return printable(".".join(kept).replace("schema_", "schema")) or "(top level)"


def _who(data: Any, position: int | None) -> str:
    """`rule 'x': ` when the rule has a well-formed id, `rule #2: ` in a file of several without one."""
    rule_id = data.get("id") if isinstance(data, dict) else None
    if isinstance(rule_id, str) and re.fullmatch(ID_PATTERN, rule_id):
        return f"rule {rule_id!r}: "
    return f"rule #{position}: " if position is not None else ""


def parse_rule(data: Any, source: str, position: int | None = None) -> RuleSpec:
    """One rule from a parsed YAML mapping; a RuleError names the source, the rule id (or its
    position, 1-based, in a file of several) and the key."""
    if not isinstance(data, dict):
        raise RuleError(f"{source}: {_who(data, position)}a rule {'' if position is not None else 'file '}must be a YAML mapping")
    try:
        rule = RuleSpec.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        key, who = _error_key(error), _who(data, position)
        if error["type"] == "extra_forbidden":
            message = f"{source}: {who}unknown key '{key}'"
        elif error["type"] == "missing":
            message = f"{source}: {who}missing key '{key}'"
        else:
            message = f"{source}: {who}key '{key}': {printable(error['msg'].removeprefix('Value error, '))}"
        more = len(exc.errors()) - 1
        raise RuleError(message + (f" (and {more} more problem{'s' if more > 1 else ''})" if more else "")) from None
    rule.source = source
    return rule


def load_rule_file(path: Path, declared: Declarations | None = None) -> list[RuleSpec]:
    """A file holds one rule, or several as a YAML list or as `---`-separated documents. With
    `declared`, every metric and column the rules name must be declared by a probe."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RuleError(f"{path}: rule file not found") from None
    except UnicodeDecodeError:
        raise RuleError(f"{path}: rule file is not UTF-8 text") from None
    except OSError as exc:
        raise RuleError(f"{path}: cannot read the rule file ({exc.strerror or type(exc).__name__})") from None
    try:
        documents = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise RuleError(f"{path}:{where} not valid YAML ({printable(getattr(exc, 'problem', None) or exc)})") from None
    except RecursionError:
        raise RuleError(f"{path}: not valid YAML (nested too deeply)") from None
    except Exception as exc:  # noqa: BLE001 - PyYAML's constructors raise plain errors: 2001-13-01, a bare `!!float`
        text = str(exc).strip()
        raise RuleError(f"{path}: not valid YAML ({printable(text.splitlines()[0] if text else type(exc).__name__)})") from None
    items = [item for document in documents for item in (document if isinstance(document, list) else [document])]
    if not items:
        raise RuleError(f"{path}: the file holds no rule")
    several = len(items) > 1
    rules = [parse_rule(item, str(path), i if several else None) for i, item in enumerate(items, start=1)]
    seen: dict[str, int] = {}
    for i, rule in enumerate(rules, start=1):
        if rule.id in seen:
            raise RuleError(f"{path}: rule {rule.id!r}: key 'id': rule #{i} has the same id as rule #{seen[rule.id]}")
        seen[rule.id] = i
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
        for j, confirmation in enumerate(threshold.confirmed_by or ()):
            key = f"thresholds.{i}.confirmed_by.{j}"
            if confirmation.metric not in metrics:
                need_metric(f"{key}.metric", confirmation.metric)
                continue
            spec = metrics[confirmation.metric]
            missing = [kind for kind in rule.aggregate.kinds if kind not in spec.scopes]
            if missing:
                problems.append(f"{key}.metric: {confirmation.metric!r} is not reported per {missing[0]} "
                                f"(it is per {_listing(spec.scopes)}), so it cannot confirm this rule's findings")
            if confirmation.bound is not None:
                need_metric(f"{key}.bound", confirmation.ref)
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
