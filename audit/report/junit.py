"""junit.xml: one test case per finding, so CI systems show the audit like a test run.

fail is a failure and error an error; skipped and waived are skipped cases; warn and info pass,
with their text in system-out, because neither blocks a merge.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from audit.findings import Status, count_by_status


def junit_xml(results: dict[str, Any]) -> bytes:
    findings = results["findings"]
    counts = count_by_status(findings)
    suite = ET.Element("testsuite", {
        "name": "model-audit",
        "tests": str(len(findings)),
        "failures": str(counts[Status.FAIL]),
        "errors": str(counts[Status.ERROR]),
        "skipped": str(counts[Status.SKIPPED] + counts[Status.WAIVED]),
        "time": f"{results['run']['seconds']:.3f}",
        "timestamp": results["run"]["started"],
    })
    properties = ET.SubElement(suite, "properties")
    for name, value in (("verdict", results["run"]["verdict"]), ("model", results["model"].get("fingerprint", "")),
                        ("manifest", results["manifest"]["sha256"]), ("tool_version", results["tool"]["version"])):
        ET.SubElement(properties, "property", {"name": name, "value": str(value)})
    for f in findings:
        case = ET.SubElement(suite, "testcase", {"classname": f"model-audit.{f['rule']}", "name": f["scope"], "time": "0"})
        text = f"{f['message']}\nseverity: {f['severity']}\nremedy: {f.get('remedy', '')}"
        if f.get("evidence"):
            text += "\nevidence: " + ", ".join(f["evidence"])
        status = Status(f["status"])
        if status is Status.FAIL:
            node = ET.SubElement(case, "failure", {"message": f"[{f['severity']}] {f['title']}: {f['message']}", "type": f["severity"]})
            node.text = text
        elif status is Status.ERROR:
            node = ET.SubElement(case, "error", {"message": f["message"], "type": "probe-error"})
            node.text = text
        elif status in (Status.SKIPPED, Status.WAIVED):
            reason = f["message"] if status is Status.SKIPPED else f"waived by {f['waiver']['by']}: {f['waiver']['reason']}"
            ET.SubElement(case, "skipped", {"message": reason})
        elif status is Status.WARN:
            ET.SubElement(case, "system-out").text = f"WARNING [{f['severity']}] {text}"
        elif status is Status.INFO:
            ET.SubElement(case, "system-out").text = f"INFO {text}"
    ET.indent(suite)
    return ET.tostring(suite, encoding="utf-8", xml_declaration=True)


def write_junit(path: Path, results: dict[str, Any]) -> Path:
    from audit.store import atomic_write

    atomic_write(path, junit_xml(results))
    return path
