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

from audit.data import channel_values
from audit.execution.costs import duration
from audit.findings import ATTENTION, SEVERITY_ORDER, STATUS_ORDER, exit_code
from audit.metrics.names import display_scope, metric_key, parse_key, parse_scope, scope
from audit.report.run_files import Tables, run_file
from audit.report.views import ProbeView, views_for
from audit.rules.engine import threshold_text

VERDICT_CLASS = {"PASS": "pass", "PASS WITH WARNINGS": "warn", "FAIL": "fail", "ERROR": "error"}
EVIDENCE_SHOWN = 6  # evidence thumbnails drawn per finding; the rest are listed by id
EVIDENCE_STATES_SHOWN = 4  # evidence drawn in its failed state (three panels each) per finding
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
    if unit == "points":  # a difference of two shares: 0.47 is 47 percentage points, not 47%
        return f"{100 * value:.1f} points"
    if unit == "count":
        return f"{value:,.0f}"
    if unit == "ratio":
        return f"{value:.2f}×"
    return f"{value:.3g}"


def bound_text(value: float, unit: str) -> str:
    """An interval bound beside its value: the value already names the unit when it is a word."""
    return f"{100 * value:.1f}" if unit == "points" else format_value(value, unit)


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
            out += f" [{bound_text(lo, unit)}, {bound_text(hi, unit)}]"
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
            text += markupsafe.Markup('<br><span class="ci">[{}, {}]</span>').format(bound_text(lo, unit), bound_text(hi, unit))
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
        """A PNG/JPEG/SVG artifact of the run as a data URI; refuses paths outside the run folder."""
        path = run_file(self.run_dir, relative)
        if path is None:
            return None
        mime = {".svg": "image/svg+xml", ".jpg": "image/jpeg"}.get(path.suffix, "image/png")
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


def anchor_of(prefix: str, text: str) -> str:
    return prefix + "-" + "".join(ch if ch.isalnum() else "-" for ch in text)


def _finding_view(f: dict[str, Any], units: dict[str, str], thumbs: Thumbnails, facts: dict[str, str],
                  views: dict[str, ProbeView], fail_on: str) -> dict[str, Any]:
    unit = unit_of(f["metric"], units)
    limit = threshold_text(f.get("op"), f.get("threshold"), lambda v: format_value(v, unit), f.get("bound"))
    view = views.get(f["metric"].split(".", 1)[0])
    out = {
        **f,
        "scope_display": display_scope(f["scope"]) if not f["scope"].startswith("per ") else f["scope"],
        "scope_parts": parse_scope(f["scope"]) if not f["scope"].startswith("per ") else {},
        "value_text": format_value(f.get("value"), unit) if f.get("value") is not None else "n/a",
        "limit_text": limit,
        "gating": f["status"] in ATTENTION and exit_code([f], fail_on) == 1,
        "anchor": anchor_of("finding", f"{f['rule']}-{f['scope']}-{f['status']}"),
    }
    out["gallery"] = view.gallery_anchor(out) if view is not None and f["status"] != "pass" else None
    ids = f.get("evidence", [])
    states = [view.evidence_image(out, i) if view is not None else None for i in ids[:EVIDENCE_STATES_SHOWN]]
    if any(states):  # the failed states, or nothing: an untouched original next to them would read as the failure
        images = {i: (state, None) for i, state in zip(ids, states, strict=False)}
    else:
        images = {i: (None, thumbs(i)) for i in ids[:EVIDENCE_SHOWN]}
    items = [{"id": i, "fact": facts.get(i, ""), "state": images.get(i, (None, None))[0], "thumb": images.get(i, (None, None))[1]}
             for i in ids]
    out["evidence_items"] = items
    out["evidence_shown"] = [e for e in items if e["state"] or e["thumb"]]
    out["evidence_more"] = [e for e in items if not (e["state"] or e["thumb"])]
    out["evidence_states"] = any(e["state"] for e in items)
    return out


def group_findings(findings: list[dict[str, Any]], probe_titles: dict[str, str]) -> list[dict[str, Any]]:
    """Findings of one probe on one scope (wolf's BG-gap, object-removed and background reliance)
    describe one cause: one group, one plain-words paragraph, each rule's verdict inside. Groups keep
    the order of their most urgent member."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for f in findings:
        groups.setdefault((f["metric"].split(".", 1)[0], f["scope"]), []).append(f)
    out = []
    for (probe, scope_text), members in groups.items():
        first = members[0]
        plain = next((m["plain_words"] for m in members if m.get("plain_words")), None)
        remedies: list[str] = []
        shown: dict[tuple[str, ...], str] = {}
        for m in members:
            ids = tuple(e["id"] for e in m.get("evidence_items") or [])
            if ids and not m.get("evidence_states") and ids in shown:
                m["evidence_same_as"] = shown[ids]  # one cause, one set of samples: shown once
            elif ids:
                shown.setdefault(ids, m["title"])
        for m in members:
            if m.get("remedy") and m["remedy"] not in remedies:
                remedies.append(m["remedy"])
        out.append({
            "members": members,
            "single": len(members) == 1,
            "title": first["title"] if len(members) == 1 else f"{probe_titles.get(probe, probe)}: {first['scope_display']}",
            "scope_display": first["scope_display"],
            "status": first["status"],
            "severity": first["severity"],
            "severities": sorted({m["severity"] for m in members}),
            "plain_words": plain,
            "remedies": remedies,
            "gallery": next((m["gallery"] for m in members if m.get("gallery")), None),
            "anchor": anchor_of("group", f"{probe}-{scope_text}"),
        })
    return out


def budget_text(budget: dict[str, Any], probes: dict[str, Any]) -> str | None:
    """The time budget and what it cut, for page one: a reviewer must know a sample was smaller than
    the profile's before reading a finding on it. None: no budget was set."""
    seconds = budget.get("time_budget")
    if seconds is None:
        return None
    limit = duration(seconds)
    reduced = budget.get("reduced") or {}
    if not reduced:
        return f"{limit}: every probe ran the profile's full sample"
    cuts = ", ".join(f"{probes.get(name, {}).get('title', name)} {cut['from']} → {cut['to']} samples" for name, cut in reduced.items())
    return f"{limit}: sample counts reduced to fit, stratified and never below a rule's minimum support: {cuts}"


def preprocessing_text(preprocessing: dict[str, Any]) -> str:
    """The normalisation the model was audited with, and whether the user stated it or it was assumed."""
    text = (f"mean {channel_values(preprocessing.get('mean') or [])}, std {channel_values(preprocessing.get('std') or [])}"
            " on pixels in [0, 1]")
    stated = preprocessing.get("stated")
    if stated is False:
        return text + " (assumed: no --mean/--std was given)"
    if stated is True:
        return text + " (as given)"
    return text


def gate_view(results: dict[str, Any], findings: list[dict[str, Any]]) -> dict[str, Any]:
    """What the CI gate (`fail_on`) decided, in words, and which findings decided it."""
    gate = results.get("gate") or {}
    fail_on = str(gate.get("fail_on") or results["run"].get("fail_on", "high"))
    code = int(gate["exit_code"]) if "exit_code" in gate else exit_code(findings, fail_on)
    gating = [f for f in findings if f.get("gating")]
    if fail_on == "never":
        words = "fail_on: never, so no finding fails the gate; exit code 0"
    elif code:
        words = (f"fail_on: {fail_on}: {len(gating)} finding(s) failed at severity {fail_on} or above, "
                 "so the gate fails (exit code 1)")
    else:
        words = f"fail_on: {fail_on}: no finding failed at severity {fail_on} or above, so the gate passes (exit code 0)"
    return {"fail_on": fail_on, "exit_code": code, "text": words, "gating": gating}


def verdict_reason(verdict: str, attention: list[dict[str, Any]]) -> str:
    """One line on why the verdict is what it is: the most urgent findings by rule and scope."""
    if not attention:
        return "Every judged rule passed."
    status = attention[0]["status"]
    worst = [f for f in attention if f["status"] == status]
    named = "; ".join(f"{_lower_first(f['title'].split(' (')[0])} ({f['scope_display']})" for f in worst[:3])
    more = f"; and {len(worst) - 3} more" if len(worst) > 3 else ""
    word = {"error": "could not be judged", "fail": "failed", "warn": "warned"}[status]
    return f"{len(worst)} {'finding' if len(worst) == 1 else 'findings'} {word}: {named}{more}."


def _lower_first(text: str) -> str:
    """'A class is ...' -> 'a class is ...'; an acronym ('ECE', 'BG-gap') keeps its case."""
    word = text.split(" ", 1)[0]
    return text if len(word) > 1 and not word[1:2].islower() else text[:1].lower() + text[1:]


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
    fail_on = str((results.get("gate") or {}).get("fail_on") or results["run"].get("fail_on", "high"))
    findings = [_finding_view(f, units, thumbs, facts, views, fail_on) for f in results["findings"]]
    lines = explanations(results)
    for f in findings:
        f["plain_words"] = lines.get((f["metric"].split(".", 1)[0], f["scope"]))
    by_status = {s: [f for f in findings if f["status"] == s] for s in STATUS_ORDER}
    attention = by_status["error"] + by_status["fail"] + by_status["warn"]
    counts = {s: sum(1 for f in attention if f["severity"] == s) for s in SEVERITY_ORDER}
    probe_titles = {name: probe.get("title", name) for name, probe in results["probes"].items()}
    groups = group_findings(attention, probe_titles)

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
        unit = unit_of(rule.get("metric", ""), units)
        rule["threshold_lines"] = [
            f"{t['status']} ({t['severity']}) if {threshold_text(t['op'], t['value'], lambda v, u=unit: format_value(v, u), t.get('bound'))}"
            for t in rule.get("thresholds", [])
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
        "groups": groups,
        "filter_severities": [s for s in SEVERITY_ORDER if any(f["severity"] == s for f in attention + by_status["waived"])],
        "gate": gate_view(results, findings),
        "verdict_reason": verdict_reason(results["run"]["verdict"], attention),
        "preprocessing_text": preprocessing_text(results.get("preprocessing", {})),
        "budget_text": budget_text(results.get("budget") or {}, results.get("probes", {})),
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
