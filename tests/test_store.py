"""results.json: schema round-trip, atomic writes, clear errors for damaged files."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from audit.errors import InputError
from audit.resources import results_schema_path
from audit.store import RunStore, atomic_write, load_results


def test_results_validate_against_the_published_schema(torch_run, onnx_run) -> None:  # type: ignore[no-untyped-def]
    schema = json.loads(Path("docs/results.schema.json").read_text())
    assert results_schema_path().read_text() == Path("docs/results.schema.json").read_text()
    for run in (torch_run, onnx_run):
        jsonschema.Draft202012Validator(schema).validate(run.results)
        loaded, sha = load_results(run.out)
        assert loaded == run.results
        import hashlib

        assert sha == hashlib.sha256((run.out / "results.json").read_bytes()).hexdigest()


def test_every_finding_names_what_the_issue_requires(torch_run) -> None:  # type: ignore[no-untyped-def]
    for finding in torch_run.results["findings"]:
        assert {"rule", "title", "status", "severity", "scope", "value", "threshold", "n", "message", "evidence"} <= set(finding)
        if finding["status"] == "pass":
            assert finding["severity"] == "info"


def test_metric_names_follow_the_convention(torch_run) -> None:  # type: ignore[no-untyped-def]
    from audit.metrics.names import parse_key

    metrics = torch_run.results["metrics"]
    for key in metrics:
        parse_key(key)
    assert "predictions.accuracy:lo" in metrics and "predictions.recall@domain:data/class:red" in metrics
    assert metrics["predictions.accuracy:lo"] <= metrics["predictions.accuracy"] <= metrics["predictions.accuracy:hi"]


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        (lambda r: r.pop("findings"), "'findings' is a required property"),
        (lambda r: r.update(schema_version="2.0"), "schema_version 2.0 is not supported"),
        (lambda r: r["findings"][0].update(status="maybe"), "key 'findings/0/status'"),
        (lambda r: r["metrics"].update({"Bad Key": 1.0}), "key 'metrics'"),
        (lambda r: r.pop("gate"), "'gate' is a required property"),
    ],
)
def test_damaged_results_are_refused_with_the_key(torch_run, tmp_path: Path, damage, words: str) -> None:  # type: ignore[no-untyped-def]
    results = json.loads(json.dumps(torch_run.results))
    damage(results)
    (tmp_path / "results.json").write_text(json.dumps(results))
    with pytest.raises(InputError, match=words.replace("(", r"\(").replace(")", r"\)")):
        load_results(tmp_path)


def test_the_saved_gate_is_the_one_the_findings_give_and_older_runs_need_none(torch_run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from audit.findings import gate

    results = json.loads(json.dumps(torch_run.results))
    assert results["schema_version"] == "1.3" and results["gate"] == gate(results["findings"], results["run"]["fail_on"])
    assert results["gate"]["exit_code"] == torch_run.code
    del results["gate"]
    results["schema_version"] = "1.1"
    (tmp_path / "results.json").write_text(json.dumps(results))
    assert load_results(tmp_path)[0] == results


def test_not_json_and_not_a_run(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no results.json here"):
        load_results(tmp_path)
    (tmp_path / "results.json").write_text("{nope")
    with pytest.raises(InputError, match="not valid JSON"):
        load_results(tmp_path)


def test_atomic_write_leaves_no_partial_file(tmp_path: Path) -> None:
    target = tmp_path / "results.json"
    atomic_write(target, b"first")

    with pytest.raises(TypeError):
        atomic_write(target, object())  # type: ignore[arg-type]
    assert target.read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]
    assert oct(target.stat().st_mode & 0o777) != oct(0o600)


def test_artifacts_are_content_addressed(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    store.prepare()
    a = store.write_artifact(b"png-bytes", ".png")
    assert a == store.write_artifact(b"png-bytes", ".png")
    assert a != store.write_artifact(b"other", ".png")
    assert a.startswith("artifacts/") and (tmp_path / a).read_bytes() == b"png-bytes"
