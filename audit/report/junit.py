"""junit.xml: the audit as test suites, so CI systems show it like a test run and agree with the exit code.

Two suites inside <testsuites>:
- `model-audit` (the gate): one case per finding the gate judged. Its failures and errors are
  exactly the findings that make the exit code 1 under `fail_on`; every other finding passes there.
  A CI that fails a build on any JUnit failure therefore fails it exactly when `model-audit` exits 1.
- `model-audit (not gating)`: the fail, error and warn findings below `fail_on`, each as a case
  with a `<skipped>` element whose message starts with the status. GitLab, Jenkins and GitHub test
  reporters list skipped cases with their message, so these stay visible in the CI's UI without
  turning the build red; the text is also in each case's system-out for tools that show only that.

Skipped and waived findings are skipped cases of the gate suite; every case carries its status,
severity, rule and value as properties. Suite properties give the verdict, `fail_on`, the exit code
and `model_fingerprint` (sha256 over the model's file hashes, the same value as results.json's
`model.fingerprint`).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from audit.findings import ATTENTION, Status, gate, gates

GATE_SUITE = "model-audit"
OTHER_SUITE = "model-audit (not gating)"


def _gate(results: dict[str, Any]) -> dict[str, Any]:
    """The saved gate, or (runs from before schema 1.2) the same computed from the findings."""
    saved = results.get("gate")
    return saved if saved else gate(results["findings"], results["run"].get("fail_on", "high"))


def _text(f: dict[str, Any]) -> str:
    text = f"{f['message']}\nstatus: {f['status']}\nseverity: {f['severity']}\nremedy: {f.get('remedy', '')}"
    if f.get("evidence"):
        text += "\nevidence: " + ", ".join(f["evidence"])
    return text


def _case(suite: ET.Element, f: dict[str, Any]) -> ET.Element:
    case = ET.SubElement(suite, "testcase", {"classname": f"model-audit.{f['rule']}", "name": f["scope"], "time": "0"})
    properties = ET.SubElement(case, "properties")
    for name in ("status", "severity", "rule_version", "value"):
        if f.get(name) is not None:
            ET.SubElement(properties, "property", {"name": name, "value": str(f[name])})
    return case


def _suite(root: ET.Element, name: str, results: dict[str, Any], cases: int, failures: int, errors: int, skipped: int) -> ET.Element:
    return ET.SubElement(root, "testsuite", {
        "name": name, "tests": str(cases), "failures": str(failures), "errors": str(errors), "skipped": str(skipped),
        "time": f"{results['run']['seconds']:.3f}", "timestamp": results["run"]["started"],
    })


def junit_xml(results: dict[str, Any]) -> bytes:
    findings = results["findings"]
    decision = _gate(results)
    fail_on = decision["fail_on"]
    gating = [f for f in findings if gates(f, fail_on)]
    others = [f for f in findings if f["status"] in ATTENTION and not gates(f, fail_on)]
    judged = [f for f in findings if not (f["status"] in ATTENTION and not gates(f, fail_on))]
    root = ET.Element("testsuites", {"name": "model-audit", "tests": str(len(findings)),
                                     "failures": str(sum(f["status"] == Status.FAIL for f in gating)),
                                     "errors": str(sum(f["status"] == Status.ERROR for f in gating))})
    main = _suite(root, GATE_SUITE, results, len(judged), sum(f["status"] == Status.FAIL for f in gating),
                  sum(f["status"] == Status.ERROR for f in gating),
                  sum(f["status"] in (Status.SKIPPED, Status.WAIVED) for f in judged))
    properties = ET.SubElement(main, "properties")
    for name, value in (("verdict", results["run"]["verdict"]), ("fail_on", fail_on), ("exit_code", decision["exit_code"]),
                        ("model_fingerprint", results["model"].get("fingerprint", "")),
                        ("manifest", results["manifest"]["sha256"]), ("tool_version", results["tool"]["version"])):
        ET.SubElement(properties, "property", {"name": name, "value": str(value)})
    for f in judged:
        case = _case(main, f)
        status = Status(f["status"])
        if gates(f, fail_on) and status is Status.FAIL:
            node = ET.SubElement(case, "failure", {"message": f"[{f['severity']}] {f['title']}: {f['message']}", "type": f["severity"]})
            node.text = _text(f)
        elif gates(f, fail_on):
            node = ET.SubElement(case, "error", {"message": f["message"], "type": "probe-error"})
            node.text = _text(f)
        elif status in (Status.SKIPPED, Status.WAIVED):
            reason = f["message"] if status is Status.SKIPPED else f"waived by {f['waiver']['by']}: {f['waiver']['reason']}"
            ET.SubElement(case, "skipped", {"message": reason})
        elif status is Status.INFO:
            ET.SubElement(case, "system-out").text = f"INFO {_text(f)}"
    if others:
        extra = _suite(root, OTHER_SUITE, results, len(others), 0, 0, len(others))
        for f in others:
            case = _case(extra, f)
            below = f"below fail_on {fail_on}" if fail_on != "never" else "fail_on never"
            ET.SubElement(case, "skipped", {"message": f"{f['status'].upper()} [{f['severity']}, {below}] {f['title']}: {f['message']}"})
            ET.SubElement(case, "system-out").text = f"{f['status'].upper()} {_text(f)}"
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def write_junit(path: Path, results: dict[str, Any]) -> Path:
    from audit.store import atomic_write

    atomic_write(path, junit_xml(results))
    return path
