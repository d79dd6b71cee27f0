"""The cost of each stage known before it starts, and the time budget that chooses sample counts."""

from __future__ import annotations

import math

import pytest

from audit.config import parse_duration
from audit.execution.costs import PassCosts, Passes, allocate, duration
from tests.conftest import run_cli


def test_durations_parse_as_people_write_them() -> None:
    assert [parse_duration(t) for t in ("10m", "1h30m", "90s", "600", "2.5h", " 1h 5m ")] == [600, 5400, 90, 600, 9000, 3900]
    for bad in ("", "ten", "5x", "m"):
        with pytest.raises(ValueError, match="not a duration"):
            parse_duration(bad)
    assert [duration(s) for s in (0.2, 45, 150, 5400)] == ["1 s", "45 s", "2 min", "1 h 30 min"]


def test_pass_costs_price_passes_by_kind() -> None:
    costs = PassCosts(forward=0.01, gradient=0.03)
    assert costs.seconds(Passes(forward=100, gradient=10) + Passes(forward=50) * 2) == pytest.approx(2.0 + 0.3)


def test_allocation_cuts_every_probe_by_one_fraction_and_keeps_floors() -> None:
    """Two probes with linear costs (2 s and 1 s a sample, 100 samples each): 150 s of budget leaves
    half of each; a floor of 80 keeps that probe at 80 and the other takes what remains."""
    def linear(per_sample: float, n: int = 100):  # type: ignore[no-untyped-def]
        return lambda limit: (min(n, limit or n), per_sample * min(n, limit or n))

    cost = {"a": linear(2.0), "b": linear(1.0)}
    assert allocate(cost, {}, 1000.0).limits == {}
    half = allocate(cost, {}, 150.0)
    assert half.met and half.limits == {"a": 50, "b": 50} and half.expected <= 150
    floored = allocate(cost, {"a": 80}, 200.0)
    assert floored.met and floored.limits["a"] == 80 and floored.limits["b"] == math.floor((200 - 160) / 1.0)
    impossible = allocate(cost, {"a": 90, "b": 90}, 10.0)
    assert not impossible.met and impossible.limits == {"a": 90, "b": 90} and impossible.expected == 270


@pytest.fixture(scope="module")
def budget_run(dataset, tmp_path_factory):  # type: ignore[no-untyped-def]
    import contextlib
    import io
    import json

    from audit.cli import main

    out = tmp_path_factory.mktemp("budget")
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        code = main(["run", "--model", f"{dataset.model_py}:build", "--weights", str(dataset.weights), "--manifest", str(dataset.manifest),
                     "--classes", str(dataset.classes_file), "--profile", "smoke", "--out", str(out), "--time-budget", "1s"])
    return code, json.loads((out / "results.json").read_text()), stderr.getvalue(), out


def test_the_plan_is_printed_with_each_stage_expected_time(budget_run) -> None:  # type: ignore[no-untyped-def]
    _, results, stderr, _ = budget_run
    lines = [line.removeprefix("model-audit: ") for line in stderr.splitlines() if line.startswith("model-audit: ")]
    plan = lines.index(next(line for line in lines if line.startswith("plan (per image: ")))
    assert lines[plan - 1].startswith("time budget 1 s: ") and "over the budget" in lines[plan - 1]
    for name, probe in results["probes"].items():
        cost = probe["cost"]
        if cost is None:
            continue
        assert probe["status"] == "ok" and cost["expected_seconds"] > 0 and cost["forward_passes"] + cost["gradient_passes"] > 0
        assert any(line.startswith(f"  {name}: {cost['samples']}") for line in lines[plan:]), name
        assert any(line.startswith(f"{name}: ") and ", expected " in line for line in lines[plan:]), name
    assert results["probes"]["attribution"]["cost"]["gradient_passes"] > 0
    assert results["budget"]["pass_costs"]["forward"] > 0 and results["budget"]["pass_costs"]["gradient"] > 0


def test_a_time_budget_cuts_samples_to_the_rules_minimum_and_says_so(budget_run, dataset) -> None:  # type: ignore[no-untyped-def]
    code, results, _, out = budget_run
    classes = len(results["model"]["classes"])
    reduced = results["budget"]["reduced"]
    assert results["budget"]["time_budget"] == 1.0 and reduced
    for name, cut in reduced.items():
        probe = results["probes"][name]
        assert cut["to"] < cut["from"] == probe["cost"]["planned_samples"] and probe["cost"]["samples"] == cut["to"]
        assert cut["to"] >= min(cut["from"], 5 * classes)
        assert any("time budget" in note and f"from {cut['from']} to {cut['to']}" in note for note in probe["notes"]), name
    swaps = next(r for r in results["rules"] if r["id"] == "background-swap-sensitivity")
    if "attribution" in reduced and results["probes"]["background"]["status"] == "ok":  # background judges attribution's maps
        assert reduced["attribution"]["to"] >= min(reduced["attribution"]["from"], swaps["min_support"] * classes)
    html = (out / "report.html").read_text()
    assert "Time budget" in html and "sample counts reduced to fit" in html


def test_a_malformed_time_budget_is_one_line_naming_the_flag(dataset, capsys) -> None:  # type: ignore[no-untyped-def]
    code, _, err = run_cli(["run", "--model", str(dataset.onnx), "--manifest", str(dataset.manifest), "--time-budget", "soon"], capsys)
    assert code != 0 and "time_budget" in err and "not a duration" in err and len(err.strip().splitlines()) == 1
