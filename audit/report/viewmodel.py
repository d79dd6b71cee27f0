"""From results.json to what the templates show: sorted findings, headline numbers, formatted values.

Reads only the run folder. Every string that came from the user stays a plain string here;
the templates escape it.
"""

from __future__ import annotations

import base64
import datetime as dt
from pathlib import Path
from typing import Any

import markupsafe
import yaml

from audit.findings import SEVERITY_ORDER, STATUS_ORDER
from audit.metrics.names import display_scope, metric_key, parse_key, parse_scope, scope
from audit.report.run_files import Tables, run_file
from audit.report.views import views_for
from audit.rules.engine import threshold_text

VERDICT_CLASS = {"PASS": "pass", "PASS WITH WARNINGS": "warn", "FAIL": "fail", "ERROR": "error"}
PERCENT_HINTS = ("accuracy", "recall", "precision", "f1", "ece", "share", "fraction", "rate", "gap", "confidence")

CAPABILITY_TEXT = {
    "gradients": "Gradients to the input",
    "hooks": "Module hooks",
    "named_layers": "Named layers",
    "relu_modules": "ReLU as nn.ReLU modules",
}


def unit_of(metric: str, units: dict[str, str]) -> str:
    if metric in units:
        return units[metric]
    leaf = metric.rsplit(".", 1)[-1]
    return "percent" if any(h in leaf for h in PERCENT_HINTS) else "number"


def format_value(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    if unit == "percent":
        return f"{value:.1%}"
    if unit == "count":
        return f"{value:,.0f}"
    if unit == "ratio":
        return f"{value:.2f}×"
    return f"{value:.3g}"


class MetricReader:
    """Typed access to the flat metrics, for templates: value, interval, n, formatted text."""

    def __init__(self, metrics: dict[str, float], units: dict[str, str]) -> None:
        self.metrics = metrics
        self.units = units

    def get(self, name: str, scope: str = "global", suffix: str | None = None) -> float | None:
        key = metric_key(name, scope)
        return self.metrics.get(f"{key}:{suffix}" if suffix else key)

    def text(self, name: str, scope: str = "global", interval: bool = True) -> str:
        value = self.get(name, scope)
        unit = unit_of(name, self.units)
        if value is None:
            return "n/a"
        out = format_value(value, unit)
        lo, hi = self.get(name, scope, "lo"), self.get(name, scope, "hi")
        if interval and lo is not None and hi is not None:
            out += f" [{format_value(lo, unit)}, {format_value(hi, unit)}]"
        return out

    def cell(self, name: str, scope: str = "global") -> markupsafe.Markup:
        """Value with its interval on a second, smaller line: keeps wide tables inside the page."""
        value = self.get(name, scope)
        unit = unit_of(name, self.units)
        if value is None:
            return markupsafe.Markup("n/a")
        lo, hi = self.get(name, scope, "lo"), self.get(name, scope, "hi")
        text = markupsafe.escape(format_value(value, unit))
        if lo is not None and hi is not None:
            text += markupsafe.Markup('<br><span class="ci">[{}, {}]</span>').format(format_value(lo, unit), format_value(hi, unit))
        return text

    def scopes(self, name: str, kind: str) -> list[str]:
        """Scopes of one kind for which `name` has a value, e.g. every `class:C` of predictions.recall."""
        from audit.metrics.names import scope_kind

        found = []
        for key in self.metrics:
            parsed = parse_key(key)
            if parsed.suffix is None and parsed.name == name and scope_kind(parsed.scope) == kind:
                found.append(parsed.scope)
        return sorted(found)


class Thumbnails:
    """id -> data URI of the thumbnail written into the run (none when sample images are off)."""

    def __init__(self, run_dir: Path, mapping: dict[str, str], enabled: bool) -> None:
        self.run_dir = run_dir
        self.mapping = mapping if enabled else {}
        self._cache: dict[str, str | None] = {}

    def __call__(self, sample_id: str) -> str | None:
        if sample_id not in self._cache:
            self._cache[sample_id] = self.artifact(self.mapping[sample_id]) if sample_id in self.mapping else None
        return self._cache[sample_id]

    def artifact(self, relative: str) -> str | None:
        """A PNG/SVG artifact of the run as a data URI; refuses paths outside the run folder."""
        path = run_file(self.run_dir, relative)
        if path is None:
            return None
        mime = "image/svg+xml" if path.suffix == ".svg" else "image/png"
        return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def explanations(results: dict[str, Any]) -> dict[tuple[str, str], str]:
    """(metric prefix, scope) -> the plain-words line a probe wrote for that scope."""
    out = {}
    for name, probe in results["probes"].items():
        for scope_text, sentence in probe.get("details", {}).get("explanations", {}).items():
            out[(name, scope_text)] = sentence
    return out


def rule_limit(rules: list[dict[str, Any]], rule_id: str, status: str = "fail") -> float | None:
    """The first single-valued threshold of a rule with the given status, to draw as a line."""
    for rule in rules:
        if rule.get("id") == rule_id:
            for t in rule.get("thresholds", []):
                if t["status"] == status and not isinstance(t["value"], list):
                    return float(t["value"])
    return None


def _finding_view(f: dict[str, Any], units: dict[str, str], thumbs: Thumbnails, facts: dict[str, str]) -> dict[str, Any]:
    unit = unit_of(f["metric"], units)
    limit = threshold_text(f.get("op"), f.get("threshold"), lambda v: format_value(v, unit), f.get("bound"))
    evidence = [{"id": i, "thumb": thumbs(i), "fact": facts.get(i, "")} for i in f.get("evidence", [])]
    return {
        **f,
        "scope_display": display_scope(f["scope"]) if not f["scope"].startswith("per ") else f["scope"],
        "scope_parts": parse_scope(f["scope"]) if not f["scope"].startswith("per ") else {},
        "value_text": format_value(f.get("value"), unit) if f.get("value") is not None else "n/a",
        "limit_text": limit,
        "evidence_items": evidence,
        "anchor": "finding-" + "".join(ch if ch.isalnum() else "-" for ch in f"{f['rule']}-{f['scope']}"),
    }


def inferred_text(inferred: dict[str, Any] | None) -> str | None:
    """One sentence for the CLI summary and the report's first page; None when nothing was inferred."""
    if not inferred or ("size" not in inferred and "channels" not in inferred):
        return None
    parts = []
    if "size" in inferred:
        h, w = inferred["size"]
        parts.append(f"input size {h} x {w}")
    if "channels" in inferred:
        parts.append(f"{inferred['channels']} channel(s)")
    text = f"{' and '.join(parts)} inferred from the most common among the first {inferred['from_samples']} readable samples"
    others = inferred.get("other_sizes", 0)
    if others:
        text += f"; {others} sample(s) of other sizes are resized to it (give --input-size to choose)"
    return text


def build_view(run_dir: Path, results: dict[str, Any], results_sha256: str) -> dict[str, Any]:
    units: dict[str, str] = {}
    for probe in results["probes"].values():
        units.update(probe.get("units", {}))
    reader = MetricReader(results["metrics"], units)
    sample_images = results.get("run", {}).get("sample_images", True)
    thumbs = Thumbnails(run_dir, results.get("thumbnails", {}), sample_images)
    tables = Tables(run_dir)
    views = views_for(run_dir, results, sample_images, tables)
    shown = {i for f in results["findings"] if f["status"] != "pass" for i in f.get("evidence", [])}
    facts = {k: v for view in views.values() for k, v in view.facts(shown).items()}
    findings = [_finding_view(f, units, thumbs, facts) for f in results["findings"]]
    lines = explanations(results)
    for f in findings:
        f["plain_words"] = lines.get((f["metric"].split(".", 1)[0], f["scope"]))
    by_status = {s: [f for f in findings if f["status"] == s] for s in STATUS_ORDER}
    attention = by_status["error"] + by_status["fail"] + by_status["warn"]
    counts = {s: sum(1 for f in attention if f["severity"] == s) for s in SEVERITY_ORDER}

    card = dict(results["config"].get("model_card") or {})
    name = card.get("name") or Path(str(results["config"].get("model", "model"))).name
    version = card.get("version") or ""
    finished = results["run"].get("finished", "")
    try:
        date = dt.datetime.fromisoformat(finished).strftime("%Y-%m-%d %H:%M UTC")
    except ValueError:
        date = finished

    sections = []
    for probe_name, probe in results["probes"].items():
        sections.append({"name": probe_name, **probe, "anchor": f"probe-{probe_name}", "view": views.get(probe_name)})

    references: list[str] = []
    for probe in results["probes"].values():
        if probe["status"] == "ok":
            references.extend(r for r in probe.get("references", []) if r not in references)

    rules = results.get("rules", [])
    for rule in rules:
        rule["threshold_lines"] = [
            f"{t['status']} ({t['severity']}) if {threshold_text(t['op'], t['value'], bound=t.get('bound'))}" for t in rule.get("thresholds", [])
        ]
    capabilities = [
        {"name": CAPABILITY_TEXT.get(k, k), "available": v["available"], "reason": v["reason"]}
        for k, v in results["model"].get("capabilities", {}).items()
    ]
    config = {k: v for k, v in results["config"].items() if v not in (None, [], {})}
    return {
        "results": results,
        "metrics": reader,
        "thumb": thumbs,
        "sample_images": sample_images,
        "title": f"Model audit: {name}" + (f" {version}" if version else ""),
        "model_name": name,
        "model_version": version,
        "model_card": {k: v for k, v in card.items() if v and k not in ("name", "version")},
        "verdict": results["run"]["verdict"],
        "verdict_class": VERDICT_CLASS[results["run"]["verdict"]],
        "date": date,
        "tool_version": results["tool"]["version"],
        "input_inferred": inferred_text(results.get("preprocessing", {}).get("inferred")),
        "results_sha256": results_sha256,
        "short_sha": results_sha256[:12],
        "counts": counts,
        "status_counts": {s: len(v) for s, v in by_status.items()},
        "attention": attention,
        "top_findings": attention[:10],
        "waived": by_status["waived"],
        "informed": by_status["info"],
        "passed": by_status["pass"],
        "skipped_findings": by_status["skipped"],
        "headline": [row for view in views.values() for row in view.headline(reader)],
        "sections": sections,
        "capabilities": capabilities,
        "references": references,
        "rules": rules,
        "config_yaml": yaml.safe_dump(config, sort_keys=True, allow_unicode=True, width=100),
        "display_scope": display_scope,
        "tables": tables,
        "rule_limit": lambda rule_id, status="fail": rule_limit(rules, rule_id, status),
        "scope_of": lambda **parts: scope(**parts),
    }
