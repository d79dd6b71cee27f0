"""The rule engine, table-driven and without torch; rule files validated with errors naming file and key."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from audit.config import Waiver
from audit.errors import InputError, RuleError
from audit.findings import (
    STATUS_ORDER,
    Finding,
    Severity,
    Status,
    exit_code,
    sort_findings,
    verdict,
)
from audit.metrics.declarations import ColumnSpec, Declarations, MetricSpec, TableSpec
from audit.rules.catalogue import FORMAT_GUIDE, builtin_rule_files, load_catalogue
from audit.rules.engine import (
    ProbeState,
    RuleEngine,
    confirmation_text,
    render_message,
    threshold_text,
)
from audit.rules.schema import check_rules, load_rule_file, parse_rule


def rule(**overrides: Any):  # type: ignore[no-untyped-def]
    data = {
        "schema": "model-audit/rule/v1",
        "id": "acc",
        "title": "Accuracy floor",
        "metric": "predictions.accuracy",
        "min_support": 10,
        "thresholds": [
            {"op": "lt", "value": 0.7, "status": "fail", "severity": "high"},
            {"op": "lt", "value": 0.8, "status": "warn", "severity": "medium"},
        ],
        "message": "{scope}: {value:.0%} below {threshold:.0%} (n={n})",
        "remedy": "Fix it.",
    }
    data.update(overrides)
    return parse_rule(data, "test.yaml")


OK = {"predictions": ProbeState("ok")}


@pytest.mark.parametrize(
    ("value", "n", "status", "severity", "threshold"),
    [
        (0.65, 50, "fail", "high", 0.7),
        (0.70, 50, "warn", "medium", 0.8),  # lt is strict: 0.70 is not below 0.70
        (0.75, 50, "warn", "medium", 0.8),
        (0.85, 50, "pass", "info", 0.8),
        (0.10, 9, "skipped", "info", None),  # below min_support: never pass or fail
    ],
)
def test_thresholds_table(value: float, n: int, status: str, severity: str, threshold: float | None) -> None:
    metrics = {"predictions.accuracy": value, "predictions.accuracy:n": n}
    (finding,) = RuleEngine(metrics, lambda _: None, OK).evaluate([rule()])
    assert (finding.status, finding.severity, finding.threshold) == (status, severity, threshold)
    assert finding.n == n and finding.value == value and finding.scope == "global"
    if status == "skipped":
        assert "only 9 samples" in finding.message and "at least 10" in finding.message


@pytest.mark.parametrize(
    ("op", "limit", "value", "hit"),
    [("gt", 1, 2, True), ("ge", 2, 2, True), ("le", 1, 2, False), ("eq", 0.3, 0.1 + 0.2, True), ("ne", 1, 1, False),
     ("between", [0, 1], 0.5, True), ("between", [0, 1], 1.5, False), ("outside", [0, 1], 1.5, True)],
)
def test_operators(op: str, limit: Any, value: float, hit: bool) -> None:
    spec = rule(thresholds=[{"op": op, "value": limit, "status": "fail", "severity": "low"}], min_support=0)
    (finding,) = RuleEngine({"predictions.accuracy": value, "predictions.accuracy:n": 1}, lambda _: None, OK).evaluate([spec])
    assert (finding.status == "fail") is hit


def test_per_class_scopes_from_metrics() -> None:
    metrics = {
        "predictions.recall@class:husky": 0.4, "predictions.recall@class:husky:n": 30,
        "predictions.recall@class:wolf": 0.95, "predictions.recall@class:wolf:n": 30,
        "predictions.recall@class:fox": 0.1, "predictions.recall@class:fox:n": 3,
        "predictions.recall@domain:data/class:wolf": 0.1, "predictions.recall@domain:data/class:wolf:n": 30,
    }
    spec = rule(metric="predictions.recall", aggregate={"per": "class"}, message="{class}: {value:.0%}")
    findings = {f.scope: f for f in RuleEngine(metrics, lambda _: None, OK).evaluate([spec])}
    assert set(findings) == {"class:husky", "class:wolf", "class:fox"}
    assert findings["class:husky"].status == "fail" and findings["class:husky"].message == "husky: 40%"
    assert findings["class:wolf"].status == "pass"
    assert findings["class:fox"].status == "skipped"
    per_both = rule(metric="predictions.recall", aggregate={"per": "domain_class"})
    (both,) = RuleEngine(metrics, lambda _: None, OK).evaluate([per_both])
    assert both.scope == "domain:data/class:wolf" and both.status == "fail"


def per_sample_table(name: str) -> pd.DataFrame | None:
    if name == "predictions":
        return pd.DataFrame({"id": list("abcdef"), "class": ["wolf"] * 3 + ["husky"] * 3, "domain": ["sim", "data"] * 3,
                             "error_confidence": [0.9, None, 0.6, None, None, 0.99]})
    if name == "background":
        return pd.DataFrame({"id": list("abcdef"), "outside_ratio": [2.0, 1.8, 1.6, 1.0, 0.9, None]})
    return None


def test_per_sample_aggregation_joins_class_and_orders_evidence() -> None:
    spec = rule(metric="background.outside_ratio", aggregate={"per": "class", "stat": "mean"}, min_support=2,
                thresholds=[{"op": "gt", "value": 1.5, "status": "fail", "severity": "high"}], message="{class} {value:.2f}")
    findings = {f.scope: f for f in RuleEngine({}, per_sample_table, {"background": ProbeState("ok")}).evaluate([spec])}
    wolf, husky = findings["class:wolf"], findings["class:husky"]
    assert (wolf.status, wolf.value, wolf.n) == ("fail", pytest.approx(1.8), 3)
    assert wolf.evidence == ["a", "b", "c"]  # largest ratio first: what pushes the value over a gt limit
    assert (husky.status, husky.n) == ("pass", 2)  # the missing value is not counted
    assert husky.evidence == []


def test_evidence_spec_reads_another_column_within_scope() -> None:
    spec = rule(metric="predictions.recall", aggregate={"per": "class"}, evidence={"column": "predictions.error_confidence"})
    metrics = {"predictions.recall@class:wolf": 0.2, "predictions.recall@class:wolf:n": 30}
    (finding,) = RuleEngine(metrics, per_sample_table, OK).evaluate([spec])
    assert finding.evidence == ["a", "c"]


@pytest.mark.parametrize(
    ("state", "status", "severity", "text"),
    [
        (None, "skipped", "info", "was not run"),
        (ProbeState("skipped", "needs foreground masks"), "skipped", "info", "needs foreground masks"),
        (ProbeState("error", "map: RuntimeError: boom"), "error", "high", "failed: map: RuntimeError: boom"),
    ],
)
def test_probe_states(state: ProbeState | None, status: str, severity: str, text: str) -> None:
    probes = {} if state is None else {"predictions": state}
    (finding,) = RuleEngine({}, lambda _: None, probes).evaluate([rule()])
    assert (finding.status, finding.severity) == (status, severity)
    assert text in finding.message


def test_missing_metric_is_skipped_not_passed() -> None:
    (finding,) = RuleEngine({}, lambda _: None, OK).evaluate([rule()])
    assert finding.status == "skipped" and "no values for predictions.accuracy" in finding.message


def test_waivers_apply_until_they_expire() -> None:
    metrics = {"predictions.accuracy": 0.5, "predictions.accuracy:n": 50}
    waiver = Waiver(rule="acc", scope="global", reason="known, retraining", by="J. Doe", expires="2030-01-01")
    (finding,) = RuleEngine(metrics, lambda _: None, OK).evaluate([rule()], [waiver], today=dt.date(2029, 12, 31))
    assert finding.status == "waived" and finding.waived_status == "fail" and finding.waiver["by"] == "J. Doe"
    finding, expired = RuleEngine(metrics, lambda _: None, OK).evaluate([rule()], [waiver], today=dt.date(2030, 1, 2))
    assert finding.status == "fail"
    assert (expired.status, expired.rule, expired.scope) == ("info", "acc", "global")
    assert expired.message.startswith("waiver expired on 2030-01-01 and no longer applies (waivers.0, by J. Doe: ")


def test_messages_survive_missing_values() -> None:
    assert render_message("{scope}: {value:.1%} vs {threshold:.0%}", scope="global", value=0.5, threshold=None) == "global: 50.0% vs n/a"
    assert render_message("{threshold:.0%}", threshold=[0.1, 0.2]) == "[10%, 20%]"


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"schema": "model-audit/rule/v9"}, "key 'schema': must be 'model-audit/rule/v1'"),
        ({"thresholds": [{"op": "bigger", "value": 1, "status": "fail", "severity": "high"}]}, "key 'thresholds.0.op'"),
        ({"thresholds": [{"op": "between", "value": 1, "status": "fail", "severity": "high"}]}, "takes a list [low, high]"),
        ({"aggregate": {"per": "galaxy"}}, "key 'aggregate.per'"),
        ({"message": "{value} {colour}"}, "unknown placeholder {colour}"),
        ({"thresholds": []}, "key 'thresholds'"),
        ({"treshold": 1}, "unknown key 'treshold'"),
        ({"id": "Bad Id"}, "key 'id'"),
    ],
)
def test_malformed_rules_name_file_and_key(change: dict[str, Any], words: str) -> None:
    with pytest.raises(RuleError) as exc:
        rule(**change)
    assert str(exc.value).startswith("test.yaml: ")
    assert words in str(exc.value)


def test_missing_key_and_yaml_errors(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("schema: model-audit/rule/v1\nid: x\n")
    with pytest.raises(RuleError, match=r"r\.yaml: rule 'x': missing key 'title'"):
        load_rule_file(path)
    path.write_text("schema: [unclosed\n")
    with pytest.raises(RuleError, match=r"r\.yaml: line 2 not valid YAML"):
        load_rule_file(path)


def test_builtin_catalogue_is_valid_and_documented() -> None:
    ids = set()
    for path in builtin_rule_files():
        for spec in load_rule_file(path):
            assert path.stem == spec.id
            assert spec.rationale and spec.remedy
            ids.add(spec.id)
    assert {"accuracy-floor", "class-recall-floor", "calibration-error", "domain-accuracy-gap", "samples-skipped"} <= ids


def test_catalogue_overrides_and_extra_files(tmp_path: Path) -> None:
    extra = tmp_path / "mine.yaml"
    extra.write_text(
        "schema: model-audit/rule/v1\nid: my-floor\ntitle: Mine\nmetric: predictions.accuracy\n"
        "thresholds: [{op: lt, value: 0.99, status: fail, severity: critical}]\nmessage: m\nremedy: r\n"
    )
    rules = {r.id: r for r in load_catalogue([extra], {"accuracy-floor": {"thresholds": [{"op": "lt", "value": 0.5, "status": "fail", "severity": "low"}]},
                                                        "calibration-error": {"enabled": False}})}
    assert "my-floor" in rules and "calibration-error" not in rules
    assert rules["accuracy-floor"].thresholds[0].severity == "low"
    with pytest.raises(RuleError, match="already defined"):
        load_catalogue([extra, extra])
    with pytest.raises(RuleError, match=r"config key 'rules\.no-such-rule'"):
        load_catalogue([], {"no-such-rule": {"enabled": False}})


def test_engine_imports_no_torch() -> None:
    code = "import sys, audit.rules.engine, audit.rules.catalogue, audit.report.viewmodel; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_info_sorts_after_warn_and_never_changes_verdict_or_exit_code() -> None:
    assert [s.value for s in STATUS_ORDER] == ["error", "fail", "warn", "info", "waived", "skipped", "pass"]

    def f(status: str, severity: str, rule_id: str = "r", scope: str = "global") -> dict[str, Any]:
        return {"status": status, "severity": severity, "rule": rule_id, "scope": scope}

    findings = [f("pass", "info"), f("info", "info"), f("warn", "low"), f("warn", "high", "b"), f("warn", "high", "a"), f("error", "low")]
    assert [(x["status"], x["severity"], x["rule"]) for x in sort_findings(findings)] == [
        ("error", "low", "r"), ("warn", "high", "a"), ("warn", "high", "b"), ("warn", "low", "r"), ("info", "info", "r"), ("pass", "info", "r")]
    assert verdict([f("info", "info"), f("pass", "info")]) == "PASS"
    assert verdict([f("info", "info"), f("warn", "low")]) == "PASS WITH WARNINGS"
    assert verdict([f("fail", "low"), f("error", "low")]) == "ERROR"
    assert exit_code([f("info", "info")], "info") == 0
    assert exit_code([f("fail", "medium")], "high") == 0 and exit_code([f("fail", "high")], "high") == 1
    assert exit_code([f("error", "critical")], "never") == 0
    typed = Finding(rule="r", title="t", status=Status.FAIL, severity=Severity.HIGH, scope="global", metric="m.x", message="m")
    assert verdict([typed]) == "FAIL" and exit_code([typed], "high") == 1 and sort_findings([typed]) == [typed]


def test_findings_serialise_as_before_unless_a_bound_decided() -> None:
    plain = Finding(rule="r", title="t", status=Status.FAIL, severity=Severity.HIGH, scope="global", metric="m.x", message="m")
    assert "bound" not in plain.model_dump(mode="json") and plain.model_dump(mode="json")["status"] == "fail"
    assert plain.model_copy(update={"bound": "lo"}).model_dump(mode="json")["bound"] == "lo"


def _golden_findings(root: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    import json

    from audit.findings import sort_findings

    results = json.loads((root / "results.json").read_text())

    def table(name: str) -> pd.DataFrame | None:
        path = root / "samples" / f"{name}.parquet"
        return pd.read_parquet(path) if path.exists() else None

    states = {name: ProbeState(p["status"], p.get("error") or p.get("reason")) for name, p in results["probes"].items()}
    stored = {r["id"]: {k: v for k, v in r.items() if k != "source"} for r in results["rules"]}
    # A rule at the version the run recorded must be the same rule and judge the same; a rule whose
    # version rose since (or that is new) was changed on purpose and is tested on its own.
    rules = [r for r in load_catalogue() if r.id in stored and stored[r.id].get("version", 1) == r.version]
    assert len(rules) >= 3
    assert [{k: v for k, v in r.public_dict().items() if k != "source"} for r in rules] == [stored[r.id] for r in rules]
    found = RuleEngine(results["metrics"], table, states).evaluate(rules)
    kept = {r.id for r in rules}
    return sort_findings([f.model_dump(mode="json") for f in found]), [f for f in results["findings"] if f["rule"] in kept]


@pytest.mark.parametrize("run", ["golden-demo-smoke", "run-schema-1.0"])
def test_bundled_rules_give_the_findings_recorded_before_the_schema_grew(run: str) -> None:
    found, recorded = _golden_findings(Path(__file__).parent / "fixtures" / run)
    assert found == recorded


RECALLS = {
    "predictions.recall@class:wolf": 0.4, "predictions.recall@class:wolf:n": 30,
    "predictions.recall@class:husky": 0.9, "predictions.recall@class:husky:n": 30,
    "predictions.recall@domain:data/class:wolf": 0.2, "predictions.recall@domain:data/class:wolf:n": 30,
    "predictions.recall@domain:sim/class:wolf": 0.8, "predictions.recall@domain:sim/class:wolf:n": 5,
}


def test_per_lists_several_scope_kinds_evaluated_in_turn() -> None:
    spec = rule(metric="predictions.recall", aggregate={"per": ["class", "domain_class"]}, message="{scope}: {value:.0%}")
    assert spec.aggregate.kinds == ("class", "domain/class") and spec.public_dict()["aggregate"]["per"] == ["class", "domain/class"]
    findings = RuleEngine(RECALLS, lambda _: None, OK).evaluate([spec])
    assert [(f.scope, f.status) for f in findings] == [
        ("class:husky", "pass"), ("class:wolf", "fail"), ("domain:data/class:wolf", "fail"), ("domain:sim/class:wolf", "skipped")]
    assert findings[2].message == "domain data, class wolf: 20%"
    (missing_kind,) = [f for f in RuleEngine(RECALLS, lambda _: None, OK).evaluate([rule(metric="predictions.recall", aggregate={"per": ["class", "method"]})])
                       if f.scope.startswith("per ")]
    assert missing_kind.scope == "per method" and missing_kind.status == "skipped"
    (not_run,) = RuleEngine(RECALLS, lambda _: None, {}).evaluate([spec])
    assert not_run.scope == "per class, domain/class"
    assert rule(aggregate={"per": "domain_class"}).aggregate.per == "domain/class"  # a single kind stays a string
    for per, words in (([], "at least one scope kind"), (["class", "class"], "twice"), (["class", "galaxy"], "'galaxy'")):
        with pytest.raises(RuleError, match="key 'aggregate.per'") as exc:
            rule(aggregate={"per": per})
        assert words in str(exc.value)


def test_a_rule_without_thresholds_informs_without_judging() -> None:
    spec = rule(metric="predictions.recall", aggregate={"per": "class"}, thresholds=None, message="{class}: {value:.0%} ({status})",
                evidence={"column": "predictions.error_confidence"})
    assert spec.public_dict()["thresholds"] == []  # results.json requires the key
    assert spec.thresholds is None and not spec.judges and spec.top_severity == "info"
    findings = RuleEngine(RECALLS, per_sample_table, OK).evaluate([spec])
    assert [(f.scope, f.status, f.severity, f.message) for f in findings] == [
        ("class:husky", "info", "info", "husky: 90% (info)"), ("class:wolf", "info", "info", "wolf: 40% (info)")]
    assert findings[1].evidence == ["a", "c"] and findings[1].threshold is None
    assert verdict([f.model_dump(mode="json") for f in findings]) == "PASS"


def test_info_thresholds_note_a_value() -> None:
    spec = rule(metric="predictions.recall", aggregate={"per": "class"}, thresholds=[
        {"op": "lt", "value": 0.5, "status": "fail", "severity": "high"}, {"op": "lt", "value": 0.95, "status": "info"}])
    assert spec.thresholds[1].severity == "info" and spec.judges and spec.top_severity == "high"
    findings = {f.scope: f for f in RuleEngine(RECALLS, lambda _: None, OK).evaluate([spec])}
    assert (findings["class:wolf"].status, findings["class:husky"].status, findings["class:husky"].threshold) == ("fail", "info", 0.95)
    for threshold, words in (({"op": "lt", "value": 1, "status": "info", "severity": "high"}, "severity info"),
                             ({"op": "lt", "value": 1, "status": "warn"}, "needs a severity"),
                             ({"op": "lt", "value": 1, "status": "fail", "severity": "info"}, "needs a severity"),
                             ({"op": "lt", "value": 1, "status": "pass", "severity": "low"}, "must be one of fail, warn, info")):
        with pytest.raises(RuleError, match=r"key 'thresholds\.0") as exc:
            rule(thresholds=[threshold])
        assert words in str(exc.value)


def test_evidence_limit_up_to_a_thousand() -> None:
    assert rule(evidence={"column": "predictions.error_confidence", "limit": 1000}).evidence.limit == 1000
    with pytest.raises(RuleError, match=r"^test\.yaml: rule 'acc': key 'evidence\.limit': .*1000"):
        rule(evidence={"column": "predictions.error_confidence", "limit": 1001})
    ids = [f"s{i:04d}" for i in range(1200)]
    table = pd.DataFrame({"id": ids, "class": "wolf", "domain": "sim", "error_confidence": [i / 1200 for i in range(1200)]})
    spec = rule(metric="predictions.recall", aggregate={"per": "class"},
                evidence={"column": "predictions.error_confidence", "order": "desc", "limit": 1000})
    (finding,) = RuleEngine({"predictions.recall@class:wolf": 0.1, "predictions.recall@class:wolf:n": 30},
                            lambda name: table if name == "predictions" else None, OK).evaluate([spec])
    assert len(finding.evidence) == 1000 and finding.evidence[0] == "s1199"


GAPS = {
    "predictions.accuracy_gap@domain:data": 0.08, "predictions.accuracy_gap@domain:data:n": 40,
    "predictions.accuracy_gap@domain:data:lo": 0.06, "predictions.accuracy_gap@domain:data:hi": 0.10,
    "predictions.accuracy_gap@domain:field": 0.09, "predictions.accuracy_gap@domain:field:n": 40,
    "predictions.accuracy_gap@domain:field:lo": 0.01, "predictions.accuracy_gap@domain:field:hi": 0.17,
    "predictions.accuracy_gap@domain:lab": 0.09, "predictions.accuracy_gap@domain:lab:n": 40,
    "predictions.accuracy@domain:data": 0.81, "predictions.accuracy@domain:data:n": 40,
    "predictions.accuracy@domain:field": 0.8, "predictions.accuracy@domain:field:n": 40,
    "predictions.naming": 1.0, "predictions.convention:n": 100,
}


def gap_rule(**overrides: Any):  # type: ignore[no-untyped-def]
    data = dict(metric="predictions.accuracy_gap", aggregate={"per": "domain"}, thresholds=[
        {"op": "gt", "value": 0.05, "bound": "lo", "status": "fail", "severity": "high"},
        {"op": "gt", "value": 0.05, "status": "warn", "severity": "medium"}])
    return rule(**{**data, **overrides})


def test_thresholds_can_judge_an_interval_bound() -> None:
    findings = {f.scope: f for f in RuleEngine(GAPS, lambda _: None, OK).evaluate([gap_rule()])}
    data, field, lab = findings["domain:data"], findings["domain:field"], findings["domain:lab"]
    assert (data.status, data.bound, data.value) == ("fail", "lo", 0.08)  # the whole interval is above 5 points
    assert (field.status, field.bound) == ("warn", None)  # the point estimate is above, the interval is not clear of noise
    assert lab.status == "skipped" and "lower bound of predictions.accuracy_gap is not in this run" in lab.message
    assert "bound" in data.model_dump(mode="json") and "bound" not in field.model_dump(mode="json")
    upper = gap_rule(thresholds=[{"op": "lt", "value": 0.12, "bound": "hi", "status": "fail", "severity": "low"}])
    assert {f.scope: f.status for f in RuleEngine(GAPS, lambda _: None, OK).evaluate([upper])} == {
        "domain:data": "fail", "domain:field": "pass", "domain:lab": "skipped"}
    assert threshold_text("gt", 0.05, bound="lo") == "lower bound > 0.05" and threshold_text("gt", 0.05) == "> 0.05"
    with pytest.raises(RuleError, match="key 'thresholds': a bound is judged on a metric's interval"):
        rule(metric="background.outside_ratio", aggregate={"per": "class", "stat": "mean"},
             thresholds=[{"op": "gt", "value": 1, "bound": "lo", "status": "fail", "severity": "high"}])
    with pytest.raises(RuleError, match=r"key 'thresholds\.0\.bound'"):
        gap_rule(thresholds=[{"op": "gt", "value": 1, "bound": "mid", "status": "fail", "severity": "high"}])


def test_values_and_interval_bounds_fill_message_and_remedy() -> None:
    spec = gap_rule(values={"accuracy": "predictions.accuracy", "naming": "predictions.naming", "gap_lo": "predictions.accuracy_gap:lo"},
                    message="{domain}: {value:.0%} [{lo:.0%}, {hi:.0%}] lo again {gap_lo:.0%}, accuracy {accuracy:.0%}",
                    remedy="use convention {naming:.0f} on {domain}")
    findings = {f.scope: f for f in RuleEngine(GAPS, lambda _: None, OK).evaluate([spec])}
    assert findings["domain:data"].message == "data: 8% [6%, 10%] lo again 6%, accuracy 81%"
    assert findings["domain:data"].remedy == "use convention 1 on data"  # a run-level metric is quoted at any scope
    assert findings["domain:field"].message == "field: 9% [1%, 17%] lo again 1%, accuracy 80%"
    other_scope_only = gap_rule(values={"accuracy": "predictions.accuracy"}, message="{accuracy}")
    lab = {f.scope: f for f in RuleEngine({**GAPS, "predictions.accuracy_gap@domain:lab:lo": 0.0}, lambda _: None, OK).evaluate([other_scope_only])}
    assert lab["domain:lab"].message == "n/a"  # never another domain's accuracy
    for values, message, words in (({"value": "predictions.accuracy"}, "m", "must be a new placeholder name"),
                                   ({"better": "Accuracy"}, "m", "must be a metric name"),
                                   ({"better": "predictions.accuracy:mid"}, "m", "must be a metric name"),
                                   ({"better": "predictions.accuracy"}, "{worse}", "unknown placeholder {worse}")):
        with pytest.raises(RuleError, match="key '(values|message)'") as exc:
            rule(values=values, message=message)
        assert words in str(exc.value)
    with pytest.raises(RuleError, match=r"key 'remedy': unknown placeholder \{colour\}"):
        rule(remedy="paint it {colour}")


DECLARED = Declarations()
DECLARED.add("manifest", [MetricSpec("manifest.skipped_fraction", ("global",), "percent", "skipped share")])
DECLARED.add("predictions", [
    MetricSpec("predictions.accuracy", ("global", "domain"), "percent", "accuracy", interval=True),
    MetricSpec("predictions.accuracy_gap", ("domain",), "percent", "gap", interval=True),
    MetricSpec("predictions.recall", ("class", "domain/class"), "percent", "recall", interval=True),
    MetricSpec("predictions.support", ("class",), "count", "labelled samples"),
], [TableSpec("predictions", "map", "per sample", (ColumnSpec("error_confidence", "percent", "wrong and sure"),))])
DECLARED.add("background", [], [TableSpec("background", "detail", "per sample", (ColumnSpec("outside_ratio", "ratio", "outside"),))])


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"metric": "predictions.recal", "aggregate": {"per": "class"}}, "metric: 'predictions.recal' is not declared by any probe (closest: predictions.recall"),
        ({"metric": "background.outside_ration", "aggregate": {"per": "class", "stat": "mean"}},
         "metric: 'background.outside_ration' is not declared by any probe as a table column (closest: background.outside_ratio)"),
        ({"evidence": {"column": "predictions.error_confidenc"}}, "evidence.column: 'predictions.error_confidenc' is not declared"),
        ({"values": {"s": "predictions.suport"}}, "values.s: 'predictions.suport' is not declared by any probe (closest: predictions.support)"),
        ({"values": {"s": "predictions.support:lo"}}, "values.s: 'predictions.support' is declared without an interval"),
        ({"metric": "predictions.support", "aggregate": {"per": "class"},
          "thresholds": [{"op": "lt", "value": 1, "bound": "hi", "status": "fail", "severity": "low"}]}, "thresholds.0.bound: 'predictions.support'"),
        ({"aggregate": {"per": ["global", "class"]}}, "aggregate.per: 'predictions.accuracy' is not reported per class (it is per global, domain)"),
        ({"metric": "predictions.zzzz"}, "(no declared name is close)"),
    ],
)
def test_check_rules_names_file_key_and_closest_declared_name(change: dict[str, Any], words: str) -> None:
    check_rules([rule()], DECLARED)
    with pytest.raises(RuleError) as exc:
        check_rules([rule(**change)], DECLARED)
    assert str(exc.value).startswith("test.yaml: ") and words in str(exc.value) and "\n" not in str(exc.value)


def test_loaders_check_when_given_declarations(tmp_path: Path) -> None:
    path = tmp_path / "two.yaml"
    path.write_text(
        "- {schema: model-audit/rule/v1, id: a, title: A, metric: predictions.acuracy, message: m, remedy: r}\n"
        "- {schema: model-audit/rule/v1, id: b, title: B, metric: predictions.recal, aggregate: {per: class}, message: m, remedy: r}\n")
    assert len(load_rule_file(path)) == 2
    with pytest.raises(RuleError, match=r"two\.yaml: metric: 'predictions\.acuracy' .*closest: predictions\.accuracy.*\(and 1 more problem\)$"):
        load_rule_file(path, DECLARED)
    full = Declarations(metrics={**DECLARED.metrics}, columns={**DECLARED.columns}, owner={**DECLARED.owner})
    for spec in load_catalogue():  # declare whatever the bundled rules read that DECLARED lacks
        if not spec.aggregate.stat and spec.metric not in full.metrics:
            full.add(spec.probe, [MetricSpec(spec.metric, spec.aggregate.kinds, "number", "x",
                                             interval=any(t.bound for t in spec.thresholds or ()))])
        for ref in (spec.values or {}).values():
            name = ref.partition(":")[0]
            if name not in full.metrics:
                full.add(name.split(".")[0], [MetricSpec(name, ("global", *spec.aggregate.kinds), "number", "x", interval=True)])
        for confirmation in (c for t in spec.thresholds or () for c in t.confirmed_by or ()):
            if confirmation.metric not in full.metrics:
                full.add(confirmation.metric.split(".")[0], [MetricSpec(confirmation.metric, spec.aggregate.kinds, "points", "x", interval=True)])
        for ref in ([spec.metric] if spec.aggregate.stat else []) + ([spec.evidence.column] if spec.evidence else []):
            table, _, column = ref.partition(".")
            full.add(table, tables=[TableSpec(table, "map", "t", (ColumnSpec(column, "number", "c"),))])
    with pytest.raises(RuleError, match="two.yaml: metric"):
        load_catalogue([path], declared=full)
    overridden = load_catalogue(overrides={"class-recall-floor": {"thresholds": [
        {"op": "lt", "value": 0.5, "bound": "hi", "status": "fail", "severity": "high"}]}}, declared=full)
    assert any(r.id == "class-recall-floor" for r in overridden)
    assert load_catalogue(declared=full)  # every bundled rule passes once its names are declared
    with pytest.raises(RuleError, match=r"samples-skipped\.yaml \(overridden in the config\): thresholds\.0\.bound: .*without an interval"):
        load_catalogue(overrides={"samples-skipped": {"thresholds": [
            {"op": "lt", "value": 0.5, "bound": "hi", "status": "fail", "severity": "high"}]}}, declared=full)


def test_rules_check_cli_exits_2_with_file_key_and_closest_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    import audit.cli

    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text("schema: model-audit/rule/v1\nid: good\ntitle: G\nmetric: predictions.recall\naggregate: {per: [class, domain/class]}\n"
                    "message: m\nremedy: r\n")
    bad.write_text("schema: model-audit/rule/v1\nid: bad\ntitle: B\nmetric: predictions.recal\naggregate: {per: class}\n"
                   "thresholds: [{op: lt, value: 0.5, status: fail, severity: high}]\nmessage: m\nremedy: r\n")
    monkeypatch.setattr(audit.cli, "declared_metrics", lambda: DECLARED)
    assert audit.cli.main(["rules", "check", str(good)]) == 0
    assert "good.yaml: 1 rule(s) valid" in capsys.readouterr().out
    assert audit.cli.main(["rules", "check", str(good), str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"model-audit: error: {bad}: metric: 'predictions.recal' is not declared by any probe (closest: predictions.recall)"


def test_the_format_guide_example_is_a_valid_rule() -> None:
    import yaml

    text = FORMAT_GUIDE.split("```yaml\n", 1)[1].split("```", 1)[0]
    spec = parse_rule(yaml.safe_load(text), "guide")
    check_rules([spec], DECLARED)
    assert [t.status for t in spec.thresholds] == ["fail", "warn", "info"] and spec.thresholds[0].bound == "lo"
    findings = {f.scope: f for f in RuleEngine(GAPS, lambda _: None, OK).evaluate([spec])}
    assert findings["domain:data"].message == "data: accuracy 81.0%, 8.0 points below the reference domain's (interval 6.0 points to 10.0 points)"


def test_rule_listings_show_the_new_keys(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from audit.cli import main, rules_markdown

    spec = gap_rule(id="gap", values={"accuracy": "predictions.accuracy"}, aggregate={"per": ["domain", "global"]})
    text = rules_markdown([spec, rule(id="note", thresholds=None)])
    assert "- fail (high) if lower bound > 0.05" in text and "per domain, global;" in text and "- quotes `{accuracy}`: `predictions.accuracy`" in text
    assert "- info for every scope: informs, never judged" in text
    path = tmp_path / "note.yaml"
    path.write_text("schema: model-audit/rule/v1\nid: note\ntitle: N\nmetric: predictions.recall\naggregate: {per: [class, domain/class]}\n"
                    "message: m\nremedy: r\n")
    assert main(["rules", "list", "--rules", str(path)]) == 0
    assert "metric predictions.recall per class, domain/class, min_support 1: info, never judged" in capsys.readouterr().out


# ---------------------------------------------------------------- rule files checked in full before any compute


@pytest.mark.parametrize(
    ("value", "words"),
    [(float("nan"), "must be a finite number, not nan"), (float("inf"), "must be a finite number, not inf"),
     ("-inf", "must be a finite number, not -inf"), ("1e999", "must be a finite number, not inf"), (10**400, "too large"),
     (True, "must be a number, not true"), ("high", "must be a number, not 'high'"), ([0.1, float("nan")], "not nan")],
)
def test_threshold_values_must_be_finite_numbers(value: Any, words: str) -> None:
    op = "between" if isinstance(value, list) else "lt"
    with pytest.raises(RuleError) as exc:
        rule(thresholds=[{"op": op, "value": value, "status": "fail", "severity": "high"}])
    assert str(exc.value).startswith("test.yaml: rule 'acc': key 'thresholds.0.value': ") and words in str(exc.value)
    with pytest.raises(RuleError, match=r"key 'thresholds\.0': .*low <= high"):
        rule(thresholds=[{"op": "between", "value": [0.9, 0.1], "status": "fail", "severity": "high"}])


def test_a_nan_threshold_in_a_rule_file_or_a_config_override_is_refused_at_load(tmp_path: Path) -> None:
    from audit.config import build_config

    path = tmp_path / "nan.yaml"
    path.write_text("schema: model-audit/rule/v1\nid: nan-floor\ntitle: T\nmetric: predictions.accuracy\n"
                    "thresholds: [{op: lt, value: .nan, status: fail, severity: high}]\nmessage: m\nremedy: r\n")
    with pytest.raises(RuleError, match=rf"^{path}: rule 'nan-floor': key 'thresholds\.0\.value': must be a finite number, not nan$"):
        load_rule_file(path)
    with pytest.raises(RuleError, match=r"^config key 'rules\.accuracy-floor\.thresholds\.0\.value': must be a finite number, not inf$"):
        load_catalogue([], {"accuracy-floor": {"thresholds": [{"op": "lt", "value": float("inf"), "status": "fail", "severity": "high"}]}})
    for override, words in (({"thresholds": []}, "thresholds': list at least one threshold"), ({"min_support": -1}, "min_support'"),
                            ({"treshold": 1}, "treshold': unknown key"), ("off", "must be a mapping")):
        with pytest.raises(RuleError, match=r"^config key 'rules\.accuracy-floor") as exc:
            load_catalogue([], {"accuracy-floor": override})
        assert words in str(exc.value)
    with pytest.raises(RuleError, match=r"closest: accuracy-floor"):
        load_catalogue([], {"acuracy-floor": {"enabled": False}})
    with pytest.raises(InputError, match=r"key 'rules\.accuracy-floor\.thresholds\.0\.value': .*must be a finite number, not nan"):
        build_config({"model": "m.onnx", "manifest": "m.csv",
                      "rules": {"accuracy-floor": {"thresholds": [{"op": "lt", "value": float("nan"), "status": "fail", "severity": "high"}]}}}, {})


def test_an_override_is_validated_with_the_rule_it_changes() -> None:
    changed = {r.id: r for r in load_catalogue([], {"accuracy-floor": {"min_support": 3}})}["accuracy-floor"]
    assert changed.min_support == 3 and changed.source.endswith("accuracy-floor.yaml (overridden in the config)")
    with pytest.raises(RuleError, match=r"background-reliance\.yaml \(overridden in the config\): rule 'background-reliance': "
                                        r"key 'thresholds': a bound is judged on a metric's interval"):
        load_catalogue([], {"background-reliance": {"thresholds": [{"op": "gt", "value": 1, "bound": "lo", "status": "fail", "severity": "high"}]}})


@pytest.mark.parametrize(
    ("message", "words"),
    [
        ("{n:>99999999}", "width 99999999 is over the limit of 50"),
        ("{value:.99f}", "precision 99 is over the limit of 50"),
        ("{value:0099999}", "width 99999 is over the limit of 50"),
        ("{n:>" + "9" * 5000 + "}", "width of 5000 digits is over the limit of 50"),
        ("{value.__class__}", "placeholder {value.__class__} reads an attribute or an index"),
        ("{value[0]}", "placeholder {value[0]} reads an attribute or an index"),
        ("{rule.__class__.__init__.__globals__}", "reads an attribute"),
        ("{value!r}", "conversions (!r, !s, !a) are not supported"),
        ("{value:{n}}", "a format spec cannot hold another placeholder"),
        ("{value:>{n}}", "a format spec cannot hold another placeholder"),
        ("{}", "positional placeholder {}"),
        ("{0}", "positional placeholder {0}"),
        ("{value:c}", "not a simple format spec"),
        ("{value:x<8x}", "not a simple format spec"),
        ("{value:\n>8}", "not a simple format spec"),
        ("{colour}", "unknown placeholder {colour}"),
        ("{col\nour}", "unknown placeholder {col\\nour}"),
        ("{value", "not a valid template"),
        ("value}", "not a valid template"),
    ],
)
def test_templates_are_refused_beyond_known_fields_and_simple_specs(message: str, words: str) -> None:
    for key in ("message", "pass_message", "remedy"):
        with pytest.raises(RuleError) as exc:
            rule(**{key: message})
        text = str(exc.value)
        assert text.startswith(f"test.yaml: rule 'acc': key '{key}': ") and words in text and "\n" not in text, text


@pytest.mark.parametrize("message", ["{value:.1%}", "{value:.3f}", "{n:d}", "{n:,}", "{n:_}", "{scope:>8}", "{value:+.0%}",
                                     "{class:*^20}", "{value:08.3f}", "{value:#.3g}", "{value: .2e}", "{n:=+10,d}", "{scope:s}",
                                     "{{literal}} {value}", "{value:z.1f}", "{value:>50.50f}"])
def test_simple_format_specs_are_accepted_and_rendered(message: str) -> None:
    spec = rule(message=message, thresholds=[{"op": "lt", "value": 0.9, "status": "fail", "severity": "high"}])
    (finding,) = RuleEngine({"predictions.accuracy": 0.5, "predictions.accuracy:n": 1234}, lambda _: None, OK).evaluate([spec])
    assert finding.status == "fail" and len(finding.message) < 200
    assert finding.message == render_message(message, value=0.5, n=1234, scope="global", **{"class": None})


def test_rule_file_errors_name_the_file_the_rule_and_the_key(tmp_path: Path) -> None:
    path = tmp_path / "two.yaml"
    path.write_text("- {schema: model-audit/rule/v1, id: good, title: A, metric: predictions.accuracy, message: m, remedy: r}\n"
                    "- {schema: model-audit/rule/v1, id: wide, title: B, metric: predictions.accuracy, message: '{n:>999}', remedy: r}\n")
    with pytest.raises(RuleError, match=rf"^{path}: rule 'wide': key 'message': placeholder {{n:>999}}: width 999 is over the limit of 50$"):
        load_rule_file(path)
    with pytest.raises(RuleError, match=rf"^{path}: rule 'wide': key 'message'"):
        load_catalogue([path])
    path.write_text("- {schema: model-audit/rule/v1, id: good, title: A, metric: predictions.accuracy, message: m, remedy: r}\n"
                    "- {schema: model-audit/rule/v1, title: B, metric: predictions.accuracy, message: m, remedy: r}\n- 3\n")
    with pytest.raises(RuleError, match=rf"^{path}: rule #2: missing key 'id'$"):
        load_rule_file(path)
    path.write_text("- {schema: model-audit/rule/v1, id: same, title: A, metric: predictions.accuracy, message: m, remedy: r}\n"
                    "- {schema: model-audit/rule/v1, id: same, title: B, metric: predictions.accuracy, message: m, remedy: r}\n")
    with pytest.raises(RuleError, match=r"rule 'same': key 'id': rule #2 has the same id as rule #1"):
        load_rule_file(path)
    for text, words in (("a: 2001-13-01\n", "not valid YAML (month must be in 1..12)"), ("[" * 5000, "not valid YAML"),
                        ("- 3\n", "a rule file must be a YAML mapping")):
        path.write_text(text)
        with pytest.raises(RuleError, match=rf"^{path}: ") as exc:
            load_rule_file(path)
        assert words in str(exc.value)
    path.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(RuleError, match=r"rule file is not UTF-8 text"):
        load_rule_file(path)
    with pytest.raises(RuleError, match=r"cannot read the rule file"):
        load_rule_file(tmp_path)


def test_rules_check_cli_refuses_a_huge_width(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import audit.cli

    path = tmp_path / "wide.yaml"
    path.write_text("schema: model-audit/rule/v1\nid: wide\ntitle: W\nmetric: predictions.accuracy\nmessage: '{n:>99999999}'\nremedy: r\n")
    monkeypatch.setattr(audit.cli, "declared_metrics", lambda: DECLARED)
    assert audit.cli.main(["rules", "check", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{path}: rule 'wide': key 'message': placeholder {{n:>99999999}}: width 99999999" in err


def test_the_formatter_holds_to_the_limits_for_unchecked_text() -> None:
    assert render_message("{n:>99999999}", n=3) == render_message("{n:>" + "9" * 5000 + "}", n=3) == "3"
    assert render_message("{value:{n}}", value=0.5, n=99999) == "0.5"  # a nested width is held to the limit too
    assert render_message("{value.__class__}|{value[0]}|{value!r}", value="x") == "n/a|n/a|x"
    assert render_message("{n:c}", n=10**7) == str(10**7)


# ---------------------------------------------------------------- waivers


def _waiver(**change: Any) -> Waiver:
    return Waiver(**{"rule": "class-recall-floor", "scope": "class:fox", "reason": "rare class", "by": "J. Doe", **change})


def test_check_waivers_refuses_unknown_rules_and_impossible_scopes() -> None:
    from audit.errors import InputError
    from audit.rules.catalogue import check_waivers

    rules = load_catalogue([], {"calibration-error": {"enabled": False}})
    check_waivers([_waiver(), _waiver(scope="*"), _waiver(rule="domain-accuracy-gap", scope="domain:data")], rules,
                  classes=["fox", "wolf"], domains=["data", "sim"])
    check_waivers([_waiver(scope="class:anything")], rules)  # classes unknown yet: only the kind is checked
    cases = [
        (_waiver(rule="class-recal-floor"), None, None, "config key 'waivers.1.rule': no rule 'class-recal-floor' (closest: class-recall-floor"),
        (_waiver(rule="calibration-error", scope="global"), None, None, "config key 'waivers.1.rule': rule 'calibration-error' is switched off"),
        (_waiver(scope="domain:data"), None, None,
         "config key 'waivers.1.scope': rule 'class-recall-floor' is judged per class, domain/class, so it has no finding at scope 'domain:data'"),
        (_waiver(rule="accuracy-floor"), None, None, "is judged per global, so it has no finding at scope 'class:fox'"),
        (_waiver(scope="class:foxx"), ["fox", "wolf"], None, "config key 'waivers.1.scope': 'foxx' is not one of the run's classes (closest: fox; classes: fox, wolf)"),
        (_waiver(rule="domain-accuracy-gap", scope="domain:lab"), ["fox"], ["data", "sim"], "'lab' is not a domain of the manifest (domains: data, sim)"),
        (_waiver(rule="domain-accuracy-gap", scope="domain:lab"), None, [], "the manifest has no domain column"),
    ]
    for waiver, classes, domains, words in cases:
        with pytest.raises(InputError) as exc:
            check_waivers([_waiver(), waiver], rules, {"calibration-error": {"enabled": False}}, classes, domains)
        assert words in str(exc.value) and "\n" not in str(exc.value), str(exc.value)
    informs = rule(id="note", thresholds=None)
    with pytest.raises(InputError, match="rule 'note' only informs"):
        check_waivers([_waiver(rule="note", scope="global")], [informs])


def test_waiver_scopes_are_checked_when_the_config_is_read() -> None:
    from pydantic import ValidationError

    for scope, words in (("class:n/a", "is not a scope"), ("class:x/domain:y", "write 'domain:y/class:x'"), ("colour:red", "is not a scope"),
                         ("class:", "names no class")):
        with pytest.raises(ValidationError, match=words):
            _waiver(scope=scope)
    for change in ({"rule": "Accuracy Floor"}, {"reason": " "}, {"by": ""}):
        with pytest.raises(ValidationError):
            _waiver(**change)
    assert _waiver(scope="class:n%2Fa").scope == "class:n%2Fa"


def test_waivers_that_waive_nothing_are_reported_as_info_findings() -> None:
    spec = rule(metric="predictions.recall", aggregate={"per": "class"}, id="recall")
    waivers = [Waiver(rule="recall", scope="class:wolf", reason="known", by="A"),       # waives the failing wolf
               Waiver(rule="recall", scope="class:husky", reason="old", by="B"),       # husky passes: nothing to waive
               Waiver(rule="recall", scope="class:wolfe", reason="typo", by="C"),      # no such scope
               Waiver(rule="recall", scope="*", reason="all", by="D", expires="2020-01-01"),  # expired
               Waiver(rule="gone", scope="global", reason="renamed", by="E")]          # a rule not evaluated
    findings = RuleEngine(RECALLS, lambda _: None, OK).evaluate([spec], waivers, today=dt.date(2025, 1, 1))
    judged = {f.scope: f.status for f in findings if not f.message.startswith("waiver ")}
    assert judged == {"class:husky": "pass", "class:wolf": "waived"}
    notes = [f for f in findings if f.message.startswith("waiver ")]
    assert [(f.rule, f.scope, f.status, f.severity) for f in notes] == [
        ("recall", "class:husky", "info", "info"), ("recall", "class:wolfe", "info", "info"),
        ("recall", "per class", "info", "info"), ("gone", "global", "info", "info")]
    assert notes[0].message == "waiver waived nothing: the finding it names is pass, not warn or fail (waivers.1, by B: old)"
    assert notes[1].message == ("waiver matched no finding: rule 'recall' has no finding at scope 'class:wolfe' "
                                "(its scopes: class:husky, class:wolf) (waivers.2, by C: typo)")
    assert notes[2].message.startswith("waiver expired on 2020-01-01 and no longer applies (waivers.3")
    assert "the rule was not evaluated in this run" in notes[3].message and notes[3].title == "waiver of gone"
    assert notes[0].title == spec.title and notes[0].metric == "predictions.recall" and notes[0].remedy.startswith("Remove the waiver")
    assert verdict([f.model_dump(mode="json") for f in findings]) == "PASS"  # info never changes the verdict
    assert exit_code(findings, "info") == 0
    for f in notes:  # what results.json stores for them satisfies the finding schema
        _check_finding_schema(f.model_dump(mode="json"))


def _check_finding_schema(data: dict[str, Any]) -> None:
    import json

    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((Path(__file__).parents[1] / "docs" / "results.schema.json").read_text())
    jsonschema.validate(data, {**schema["$defs"]["finding"], "$defs": schema["$defs"]})


def test_every_rule_gives_at_least_one_finding(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = RuleEngine({}, lambda _: None, OK)
    monkeypatch.setattr(engine, "evaluate_rule", lambda spec: [])
    (finding,) = engine.evaluate([rule()])
    assert (finding.rule, finding.status, finding.message) == ("acc", "skipped", "this rule produced no finding in this run")


def test_a_metric_that_is_not_a_number_is_an_error_not_a_pass() -> None:
    """A gate must not switch itself off: NaN compares false against every limit, so it would pass."""
    metrics = {"predictions.accuracy": float("nan"), "predictions.accuracy:n": 50.0}
    (finding,) = RuleEngine(metrics, lambda _: None, OK).evaluate([rule()])
    assert (finding.status, finding.severity, finding.value) == ("error", "high", None)
    assert finding.message == "global: predictions.accuracy is not a finite number in this run, so this rule cannot judge it " \
                              "(a gate must not pass on a value it cannot read)"


# ---------------------------------------------------------------- per-domain scopes, confirmations, points


def _bundled(rule_id: str):  # type: ignore[no-untyped-def]
    return next(r for r in load_catalogue() if r.id == rule_id)


def test_recall_and_calibration_are_judged_per_domain_too() -> None:
    metrics = {**RECALLS, "predictions.ece": 0.09, "predictions.ece:n": 480, "predictions.ece@domain:data": 0.241,
               "predictions.ece@domain:data:n": 240, "predictions.ece@domain:sim": 0.025, "predictions.ece@domain:sim:n": 240}
    engine = RuleEngine(metrics, lambda _: None, OK)
    recall = {f.scope: f for f in engine.evaluate([_bundled("class-recall-floor")])}
    assert (recall["domain:data/class:wolf"].status, recall["domain:data/class:wolf"].severity) == ("fail", "high")
    assert recall["domain:data/class:wolf"].message == "only 20.0% of the 30 samples of wolf on domain data are recognised (floor 50%)"
    assert recall["class:wolf"].message == "only 40.0% of the 30 samples of wolf are recognised (floor 50%)"
    assert recall["domain:sim/class:wolf"].status == "skipped"  # 5 samples, under min_support
    ece = {f.scope: f for f in engine.evaluate([_bundled("calibration-error")])}
    assert {s: f.status for s, f in ece.items()} == {"global": "warn", "domain:data": "fail", "domain:sim": "pass"}
    assert ece["domain:data"].message.startswith("the expected calibration error is 24.1% on domain data: ")
    assert ece["global"].message.startswith("the expected calibration error is 9.0%: ")


CONFIRMED = [{"op": "gt", "value": 0.8, "status": "fail", "severity": "high", "confirmed_by": [
    {"metric": "background.bg_gap", "bound": "lo", "op": "gt", "value": 0.10},
    {"metric": "background.only_bg_excess", "bound": "lo", "op": "gt", "value": 0.10}]},
    {"op": "gt", "value": 0.8, "status": "warn", "severity": "medium"}]
COUNTERFACTUALS = {
    "background.ratio@class:a": 1.47, "background.ratio@class:a:n": 40,  # no counterfactual backs it
    "background.bg_gap@class:a": 0.0, "background.bg_gap@class:a:lo": 0.0, "background.bg_gap@class:a:hi": 0.0,
    "background.only_bg_excess@class:a": 0.12, "background.only_bg_excess@class:a:lo": 0.02, "background.only_bg_excess@class:a:hi": 0.2,
    "background.ratio@class:b": 0.84, "background.ratio@class:b:n": 40,  # the object-removed excess backs it
    "background.bg_gap@class:b": 0.05, "background.bg_gap@class:b:lo": -0.02, "background.bg_gap@class:b:hi": 0.1,
    "background.only_bg_excess@class:b": 0.82, "background.only_bg_excess@class:b:lo": 0.7, "background.only_bg_excess@class:b:hi": 0.9,
    "background.ratio@class:c": 0.9, "background.ratio@class:c:n": 40,  # no counterfactual measured
    "background.ratio@class:d": 0.5, "background.ratio@class:d:n": 40,
}
BACKGROUND_DECLARED = Declarations()
BACKGROUND_DECLARED.add("background", [
    MetricSpec("background.ratio", ("class",), "ratio", "ratio"),
    MetricSpec("background.bg_gap", ("global", "class"), "points", "gap", interval=True),
    MetricSpec("background.only_bg_excess", ("class",), "points", "excess", interval=True),
    MetricSpec("background.still_predicted", ("class",), "percent", "still"),
    MetricSpec("background.global_only", ("global",), "percent", "global"),
])


def confirmed_rule(**overrides: Any):  # type: ignore[no-untyped-def]
    return rule(**{"metric": "background.ratio", "aggregate": {"per": "class"}, "thresholds": CONFIRMED,
                   "message": "{class}: {value:.2f}x", "pass_message": "{class}: fine", **overrides})


def test_a_threshold_applies_only_when_a_counterfactual_confirms_it() -> None:
    engine = RuleEngine(COUNTERFACTUALS, lambda _: None, {"background": ProbeState("ok")},
                        units={"background.bg_gap": "points", "background.only_bg_excess": "points"})
    found = {f.scope: f for f in engine.evaluate([confirmed_rule()])}
    assert {s: (f.status, f.threshold) for s, f in found.items()} == {
        "class:a": ("warn", 0.8), "class:b": ("fail", 0.8), "class:c": ("warn", 0.8), "class:d": ("pass", 0.8)}
    assert found["class:b"].message == "b: 0.84x; fail confirmed by background.only_bg_excess lower bound 70 points (needs > 10 points)"
    assert found["class:a"].message == (
        "a: 1.47x; fail only if a counterfactual confirms it, and none does: background.bg_gap lower bound 0 points "
        "(needs > 10 points); background.only_bg_excess lower bound 2 points (needs > 10 points)")
    assert "background.bg_gap lower bound n/a" in found["class:c"].message
    assert found["class:d"].message == "b: fine".replace("b", "d")  # nothing crossed: no confirmation to report
    quoted = {f.scope: f for f in engine.evaluate([confirmed_rule(message="{class} ({confirmation})")])}
    assert quoted["class:b"].message.startswith("b (fail confirmed by background.only_bg_excess") and quoted["class:b"].message.endswith(")")
    bare = {f.scope: f for f in RuleEngine(COUNTERFACTUALS, lambda _: None, {"background": ProbeState("ok")}).evaluate([confirmed_rule()])}
    assert bare["class:b"].message.endswith("lower bound 0.7 (needs > 0.1)")  # without declared units: the numbers as they are
    assert confirmed_rule().public_dict()["thresholds"][0]["confirmed_by"][0] == {
        "metric": "background.bg_gap", "bound": "lo", "op": "gt", "value": 0.1}
    assert "confirmed_by" not in confirmed_rule().public_dict()["thresholds"][1]
    fail, warn = confirmed_rule().thresholds
    assert confirmation_text(fail) == (" when confirmed by background.bg_gap lower bound > 0.1 "
                                       "or background.only_bg_excess lower bound > 0.1") and confirmation_text(warn) == ""


@pytest.mark.parametrize(
    ("confirmation", "words"),
    [
        ({"metric": "background.bg_gapp", "bound": "lo"},
         "thresholds.0.confirmed_by.0.metric: 'background.bg_gapp' is not declared by any probe (closest: background.bg_gap"),
        ({"metric": "background.global_only"},
         "thresholds.0.confirmed_by.0.metric: 'background.global_only' is not reported per class (it is per global)"),
        ({"metric": "background.still_predicted", "bound": "lo"},
         "thresholds.0.confirmed_by.0.bound: 'background.still_predicted' is declared without an interval"),
    ],
)
def test_confirmations_are_checked_against_the_declarations(confirmation: dict[str, Any], words: str) -> None:
    check_rules([confirmed_rule()], BACKGROUND_DECLARED)
    thresholds = [{**CONFIRMED[0], "confirmed_by": [{"op": "gt", "value": 0.1, **confirmation}]}, CONFIRMED[1]]
    with pytest.raises(RuleError) as exc:
        check_rules([confirmed_rule(thresholds=thresholds)], BACKGROUND_DECLARED)
    assert str(exc.value).startswith("test.yaml: ") and words in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize(
    ("confirmation", "key", "words"),
    [
        ([], "thresholds.0.confirmed_by", "at least 1 item"),
        ([{"metric": "Gap", "op": "gt", "value": 0.1}], "thresholds.0.confirmed_by.0.metric", "pattern"),
        ([{"metric": "background.bg_gap", "bound": "mid", "op": "gt", "value": 0.1}], "thresholds.0.confirmed_by.0.bound", "'lo' or 'hi'"),
        ([{"metric": "background.bg_gap", "op": "gt", "value": float("nan")}], "thresholds.0.confirmed_by.0.value", "finite"),
        ([{"metric": "background.bg_gap", "op": "between", "value": 0.1}], "thresholds.0.confirmed_by.0", "takes a list [low, high]"),
        ([{"metric": "background.bg_gap", "op": "gt", "value": 0.1, "colour": "red"}], "thresholds.0.confirmed_by.0.colour", "unknown key"),
    ],
)
def test_malformed_confirmations_name_their_key(confirmation: list[Any], key: str, words: str) -> None:
    with pytest.raises(RuleError) as exc:
        confirmed_rule(thresholds=[{**CONFIRMED[0], "confirmed_by": confirmation}, CONFIRMED[1]])
    assert f"'{key}'" in str(exc.value) and words in str(exc.value), str(exc.value)
    with pytest.raises(RuleError, match=r"key 'thresholds\.0': .*an info threshold judges nothing"):
        confirmed_rule(thresholds=[{"op": "gt", "value": 1, "status": "info", "confirmed_by": CONFIRMED[0]["confirmed_by"]}])


@pytest.mark.parametrize(("spec", "value", "text"), [(".0pt", 0.47, "47 points"), ("+.0pt", 0.47, "+47 points"),
                                                     (".1pt", -0.081, "-8.1 points"), (".0pt", 0.01, "1 point"),
                                                     ("+.0pt", -0.01, "-1 point"), (">4.0pt", 0.05, "   5 points")])
def test_percentage_points_format(spec: str, value: float, text: str) -> None:
    spec_rule = rule(message=f"{{value:{spec}}} (limit {{threshold:{spec}}})",
                     thresholds=[{"op": "lt", "value": 0.9, "status": "fail", "severity": "high"}])
    (finding,) = RuleEngine({"predictions.accuracy": value, "predictions.accuracy:n": 50}, lambda _: None, OK).evaluate([spec_rule])
    assert finding.message == f"{text} (limit {render_message('{t:' + spec + '}', t=0.9)})"
    assert render_message("{t:.0pt}", t=0.9) == "90 points" and render_message("{t:.0pt}", t=None) == "n/a"
    with pytest.raises(RuleError, match="not a simple format spec"):
        rule(message="{value:.0ptx}")


def test_differences_of_shares_are_said_in_points() -> None:
    metrics = {"background.bg_gap@class:wolf": 0.47, "background.bg_gap@class:wolf:n": 24,
               "background.only_bg_excess@class:wolf": 0.438, "background.only_bg_excess@class:wolf:n": 24,
               "predictions.accuracy_gap@domain:data": 0.2, "predictions.accuracy_gap@domain:data:n": 240}
    engine = RuleEngine(metrics, lambda _: None, {"background": ProbeState("ok"), **OK})
    messages = {f.rule: f.message for f in engine.evaluate([_bundled(r) for r in (
        "background-swap-sensitivity", "prediction-without-object", "domain-accuracy-gap")])}
    assert "accuracy drops by 47 points when" in messages["background-swap-sensitivity"] and "(limit 30 points; 24 samples)" in messages["background-swap-sensitivity"]
    assert "still says wolf 44 points more often" in messages["prediction-without-object"] and "limit 40 points" in messages["prediction-without-object"]
    assert messages["domain-accuracy-gap"] == "accuracy on data is 20.0 points below the reference domain's (240 samples; limit 10 points)"
    assert not any("%" in m for m in messages.values())
