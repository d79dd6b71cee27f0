"""junit.xml: one test case per finding, so CI systems show the audit like a test run."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any


def junit_xml(results: dict[str, Any]) -> bytes:
    findings = results["findings"]
    counts = {s: sum(1 for f in findings if f["status"] == s) for s in ("fail", "error", "skipped", "waived")}
    suite = ET.Element("testsuite", {
        "name": "model-audit",
        "tests": str(len(findings)),
        "failures": str(counts["fail"]),
        "errors": str(counts["error"]),
        "skipped": str(counts["skipped"] + counts["waived"]),
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
        if f["status"] == "fail":
            node = ET.SubElement(case, "failure", {"message": f"[{f['severity']}] {f['title']}: {f['message']}", "type": f["severity"]})
            node.text = text
        elif f["status"] == "error":
            node = ET.SubElement(case, "error", {"message": f["message"], "type": "probe-error"})
            node.text = text
        elif f["status"] in ("skipped", "waived"):
            reason = f["message"] if f["status"] == "skipped" else f"waived by {f['waiver']['by']}: {f['waiver']['reason']}"
            ET.SubElement(case, "skipped", {"message": reason})
        elif f["status"] == "warn":
            ET.SubElement(case, "system-out").text = f"WARNING [{f['severity']}] {text}"
    ET.indent(suite)
    return ET.tostring(suite, encoding="utf-8", xml_declaration=True)


def write_junit(path: Path, results: dict[str, Any]) -> Path:
    from audit.store import atomic_write

    atomic_write(path, junit_xml(results))
    return path
