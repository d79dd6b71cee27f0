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
from audit.errors import RuleError
from audit.rules.catalogue import builtin_rule_files, load_catalogue
from audit.rules.engine import ProbeState, RuleEngine, render_message
from audit.rules.schema import load_rule_file, parse_rule


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
    (finding,) = RuleEngine(metrics, lambda _: None, OK).evaluate([rule()], [waiver], today=dt.date(2030, 1, 2))
    assert finding.status == "fail"


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
    with pytest.raises(RuleError, match=r"r\.yaml: missing key 'title'"):
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
