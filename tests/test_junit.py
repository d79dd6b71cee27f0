"""junit.xml agrees with the exit code: its failures and errors are exactly the findings `fail_on`
judged, and every other fail or warn finding is still a visible case."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from audit.findings import exit_code, gate
from audit.report.junit import GATE_SUITE, OTHER_SUITE, junit_xml


def finding(rule: str, status: str, severity: str, scope: str = "global") -> dict:
    return {"rule": rule, "rule_version": 1, "title": rule.replace("-", " "), "status": status, "severity": severity,
            "scope": scope, "metric": "predictions.accuracy", "value": 0.5, "message": f"{rule} says {status}",
            "remedy": "do something", "evidence": ["a", "b"] if status in ("fail", "warn") else []}


FINDINGS = [
    finding("crashed", "error", "high"),
    finding("too-low", "fail", "high", "class:wolf"),
    finding("a-bit-low", "fail", "medium", "class:fox"),
    finding("noisy", "warn", "low"),
    finding("fine", "pass", "info"),
    finding("no-masks", "skipped", "info"),
    {**finding("accepted", "waived", "high"), "waiver": {"by": "qa", "reason": "known"}},
    finding("for-the-record", "info", "info"),
]


def results(fail_on: str, saved_gate: bool = True) -> dict:
    out = {"findings": FINDINGS, "run": {"verdict": "ERROR", "fail_on": fail_on, "seconds": 1.5, "started": "2026-12-03T00:00:00+00:00"},
           "model": {"fingerprint": "ab" * 32}, "manifest": {"sha256": "cd" * 32}, "tool": {"version": "0.1.0"}}
    if saved_gate:
        out["gate"] = gate(FINDINGS, fail_on)
    return out


def suites(fail_on: str, saved_gate: bool = True) -> ET.Element:
    return ET.fromstring(junit_xml(results(fail_on, saved_gate)))


@pytest.mark.parametrize(("fail_on", "gating"), [("critical", 0), ("high", 2), ("medium", 3), ("low", 3), ("never", 0)])
@pytest.mark.parametrize("saved_gate", [True, False])
def test_failures_and_errors_are_the_findings_that_set_the_exit_code(fail_on: str, gating: int, saved_gate: bool) -> None:
    root = suites(fail_on, saved_gate)
    assert int(root.get("failures")) + int(root.get("errors")) == gating
    assert exit_code(FINDINGS, fail_on) == int(gating > 0)
    main = root.find(f"testsuite[@name='{GATE_SUITE}']")
    marked = main.findall("testcase/failure") + main.findall("testcase/error")
    assert len(marked) == gating == int(main.get("failures")) + int(main.get("errors"))
    assert sum(len(s.findall("testcase")) for s in root) == len(FINDINGS)  # every finding is a case, once
    props = {p.get("name"): p.get("value") for p in main.find("properties")}
    assert props["fail_on"] == fail_on and props["exit_code"] == str(int(gating > 0)) and props["model_fingerprint"] == "ab" * 32


def test_fails_and_warnings_below_fail_on_stay_visible_in_their_own_suite() -> None:
    root = suites("high")
    other = root.find(f"testsuite[@name='{OTHER_SUITE}']")
    cases = {c.get("classname"): c for c in other.findall("testcase")}
    assert set(cases) == {"model-audit.a-bit-low", "model-audit.noisy"}
    assert cases["model-audit.a-bit-low"].find("skipped").get("message").startswith("FAIL [medium, below fail_on high]")
    assert cases["model-audit.noisy"].find("skipped").get("message").startswith("WARN [low, below fail_on high]")
    assert int(other.get("skipped")) == 2 and int(other.get("failures")) == 0


def test_the_gate_counts_by_status_and_severity() -> None:
    decided = gate(FINDINGS, "medium")
    assert decided["exit_code"] == 1
    assert decided["gating"] == [{"rule": "crashed", "scope": "global"}, {"rule": "too-low", "scope": "class:wolf"},
                                 {"rule": "a-bit-low", "scope": "class:fox"}]
    assert decided["counts"]["by_status"] == {"error": 1, "fail": 2, "warn": 1, "info": 1, "waived": 1, "skipped": 1, "pass": 1}
    assert decided["counts"]["by_severity"] == {"critical": 0, "high": 2, "medium": 1, "low": 1, "info": 0}
