"""Findings: their statuses and severities, the one order reports and listings sort them in, the
verdict and the exit code. Every module that ranks or counts findings takes them from here, so a
new status (like `info`) is placed once. Imports no torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from enum import StrEnum
from typing import Any, TypeVar

from pydantic import BaseModel, Field, SerializerFunctionWrapHandler, model_serializer


class Status(StrEnum):
    """What a rule concluded for one scope. `info` informs without judging: it never changes the
    verdict or the exit code."""

    ERROR = "error"
    FAIL = "fail"
    WARN = "warn"
    INFO = "info"
    WAIVED = "waived"
    SKIPPED = "skipped"
    PASS = "pass"


class Severity(StrEnum):
    CRITICAL = "critical"
    HIGH = "high"
    MEDIUM = "medium"
    LOW = "low"
    INFO = "info"


# Most urgent first: what needs action, then what informs, then what was accepted or not judged.
STATUS_ORDER: tuple[Status, ...] = (Status.ERROR, Status.FAIL, Status.WARN, Status.INFO, Status.WAIVED, Status.SKIPPED, Status.PASS)
SEVERITY_ORDER: tuple[Severity, ...] = (Severity.CRITICAL, Severity.HIGH, Severity.MEDIUM, Severity.LOW, Severity.INFO)
STATUS_RANK: dict[str, int] = {s.value: i for i, s in enumerate(STATUS_ORDER)}  # 0 = most urgent
SEVERITY_RANK: dict[str, int] = {s.value: len(SEVERITY_ORDER) - i for i, s in enumerate(SEVERITY_ORDER)}  # critical 5 .. info 1
JUDGED: tuple[Status, ...] = (Status.FAIL, Status.WARN)  # what a threshold may conclude besides info
BLOCKING: tuple[Status, ...] = (Status.ERROR, Status.FAIL)  # what --fail-on counts
ATTENTION: tuple[Status, ...] = (Status.ERROR, Status.FAIL, Status.WARN)  # what the report lists first
NEVER = "never"  # --fail-on value that keeps the exit code 0


class Finding(BaseModel):
    """One rule's conclusion for one scope, as results.json stores it."""

    rule: str
    rule_version: int = 1
    title: str
    status: Status
    severity: Severity
    scope: str
    metric: str
    value: float | None = None
    threshold: float | list[float] | None = None
    op: str | None = None
    bound: str | None = None  # "lo" / "hi" when the deciding threshold judged an interval bound
    n: int = 0
    message: str
    remedy: str = ""
    evidence: list[str] = Field(default_factory=list)
    waiver: dict[str, Any] | None = None
    waived_status: Status | None = None

    @model_serializer(mode="wrap")
    def _omit_unused_bound(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Findings judged on point values serialise exactly as before bounds existed."""
        data: dict[str, Any] = handler(self)
        if data.get("bound") is None:
            data.pop("bound", None)
        return data

    @property
    def key(self) -> str:
        """Findings are identified across runs by rule + scope."""
        return f"{self.rule}|{self.scope}"


AnyFinding = Mapping[str, Any] | Finding
F = TypeVar("F", bound=AnyFinding)


def _get(finding: AnyFinding, name: str) -> Any:
    return finding[name] if isinstance(finding, Mapping) else getattr(finding, name)


def sort_findings(findings: Iterable[F]) -> list[F]:
    """Status order, then most severe first, then rule id and scope: stable across runs."""
    return sorted(findings, key=lambda f: (STATUS_RANK[_get(f, "status")], -SEVERITY_RANK[_get(f, "severity")],
                                           _get(f, "rule"), _get(f, "scope")))


def verdict(findings: Iterable[AnyFinding]) -> str:
    """ERROR, FAIL, PASS WITH WARNINGS or PASS; info, waived and skipped findings do not count."""
    statuses = {_get(f, "status") for f in findings}
    if Status.ERROR in statuses:
        return "ERROR"
    if Status.FAIL in statuses:
        return "FAIL"
    if Status.WARN in statuses:
        return "PASS WITH WARNINGS"
    return "PASS"


def gates(finding: AnyFinding, fail_on: str) -> bool:
    """Whether this finding alone makes the exit code 1: a fail or error at least as severe as `fail_on`."""
    return fail_on != NEVER and _get(finding, "status") in BLOCKING and SEVERITY_RANK[_get(finding, "severity")] >= SEVERITY_RANK[fail_on]


def exit_code(findings: Iterable[AnyFinding], fail_on: str) -> int:
    """1 when a fail or error finding is at least as severe as `fail_on` (a severity or `never`), else 0."""
    return int(any(gates(f, fail_on) for f in findings))


def gate(findings: Sequence[AnyFinding], fail_on: str) -> dict[str, Any]:
    """What the CI gate decided, as results.json records it once for JUnit, the CLI and the report:
    `fail_on`, the exit code, the findings that decided it (rule and scope), and counts by status (all
    findings) and by severity (the findings that need attention: error, fail, warn)."""
    attention = [f for f in findings if _get(f, "status") in ATTENTION]
    return {
        "fail_on": fail_on,
        "exit_code": exit_code(findings, fail_on),
        "gating": [{"rule": _get(f, "rule"), "scope": _get(f, "scope")} for f in findings if gates(f, fail_on)],
        "counts": {
            "by_status": {s.value: n for s, n in count_by_status(findings).items()},
            "by_severity": {s.value: sum(1 for f in attention if _get(f, "severity") == s) for s in SEVERITY_ORDER},
        },
    }


def count_by_status(findings: Iterable[AnyFinding], statuses: Sequence[Status] = STATUS_ORDER) -> dict[Status, int]:
    """How many findings have each status, in `statuses` order (zeros included)."""
    counts = dict.fromkeys(statuses, 0)
    for finding in findings:
        status = Status(_get(finding, "status"))
        if status in counts:
            counts[status] += 1
    return counts
