"""RuleSpec: the YAML rule format `model-audit/rule/v1`, validated with errors naming file and key."""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from audit.errors import RuleError

SCHEMA = "model-audit/rule/v1"
SCOPE_PER = ("global", "class", "domain", "domain/class", "method", "layer", "pair", "method/class")
STATS = ("mean", "median", "min", "max", "sum", "rate", "p10", "p90", "std")
Status = Literal["pass", "warn", "fail", "error", "skipped", "waived"]
FindingSeverity = Literal["critical", "high", "medium", "low", "info"]
MESSAGE_FIELDS = {"scope", "value", "threshold", "n", "class", "domain", "method", "layer", "pair", "metric", "rule", "status", "min_support"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Threshold(_Strict):
    """One comparison; the first that holds decides the status. Listed most severe first."""

    op: Literal["gt", "ge", "lt", "le", "eq", "ne", "between", "outside"]
    value: float | list[float]
    status: Literal["fail", "warn"]
    severity: Literal["critical", "high", "medium", "low"]

    @model_validator(mode="after")
    def _range_ops_take_two_values(self) -> Threshold:
        ranged = self.op in ("between", "outside")
        if ranged != isinstance(self.value, list) or (ranged and len(self.value) != 2):
            raise ValueError(f"op {self.op!r} takes {'a list [low, high]' if ranged else 'a single number'}")
        return self


class Aggregate(_Strict):
    """`per` names the scope kind; `stat` (per-sample mode) aggregates a per-sample column."""

    per: str = "global"
    stat: Literal["mean", "median", "min", "max", "sum", "rate", "p10", "p90", "std"] | None = None

    @field_validator("per")
    @classmethod
    def _known_scope(cls, value: str) -> str:
        value = value.replace("_", "/")
        if value not in SCOPE_PER:
            raise ValueError(f"per must be one of {', '.join(SCOPE_PER)}")
        return value


class EvidenceSpec(_Strict):
    """Which per-sample column orders the evidence (worst first), e.g. predictions.error_confidence."""

    column: str
    order: Literal["asc", "desc"] = "desc"
    limit: int = Field(default=8, ge=0, le=100)


class RuleSpec(_Strict):
    schema_: str = Field(alias="schema")
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")
    version: int = Field(default=1, ge=1)
    title: str
    description: str | None = None
    metric: str = Field(pattern=r"^[a-z_]+\.[a-z0-9_.]+$")
    aggregate: Aggregate = Field(default_factory=Aggregate)
    min_support: int = Field(default=1, ge=0)
    thresholds: list[Threshold] = Field(min_length=1)
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

    @field_validator("message", "pass_message")
    @classmethod
    def _known_placeholders(cls, value: str | None) -> str | None:
        if value is None:
            return value
        for _, field_name, _, _ in string.Formatter().parse(value):
            if field_name is not None and field_name not in MESSAGE_FIELDS:
                raise ValueError(f"unknown placeholder {{{field_name}}}; use {', '.join(sorted(MESSAGE_FIELDS))}")
        return value

    @property
    def probe(self) -> str:
        return self.metric.split(".", 1)[0]

    @property
    def top_severity(self) -> str:
        order = ("critical", "high", "medium", "low")
        return min((t.severity for t in self.thresholds), key=order.index)

    def public_dict(self) -> dict[str, Any]:
        data = self.model_dump(mode="json", by_alias=True, exclude_none=True)
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


def load_rule_file(path: Path) -> list[RuleSpec]:
    """A file holds one rule, or several as a YAML list or as `---`-separated documents."""
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
    return rules
