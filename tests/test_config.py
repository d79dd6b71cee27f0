"""Config file + flags: flags win, paths resolve against the config's folder, errors name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from audit.cli import build_parser, config_from_args, rules_markdown
from audit.config import build_config, read_config_file
from audit.errors import InputError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "audit.yaml"
    path.write_text(text)
    return path


def test_flags_win_and_paths_resolve_against_the_config(tmp_path: Path) -> None:
    (tmp_path / "classes.txt").write_text("a\nb\n")
    path = write(tmp_path, "model: nets/m.onnx\nmanifest: data/m.csv\nclasses: classes.txt\nseed: 3\nprofile: smoke\n"
                           "input-size: [32, 32]\nmodel_card: {name: net, version: 2.1}\nwaivers:\n"
                           "  - {rule: accuracy-floor, reason: known, by: me, expires: 2030-01-01}\n")
    args = build_parser().parse_args(["run", "--config", str(path), "--seed", "7"])
    config = config_from_args(args)
    assert config.model == tmp_path / "nets" / "m.onnx" and config.manifest == tmp_path / "data" / "m.csv"
    assert config.classes == ["a", "b"] and config.seed == 7 and config.profile == "smoke"
    assert config.input_size == (32, 32) and config.model_card.version == "2.1"
    assert str(config.waivers[0].expires) == "2030-01-01"
    assert config.public_dict()["model"] == str(tmp_path / "nets" / "m.onnx")


def test_factory_paths_in_config(tmp_path: Path) -> None:
    data = read_config_file(write(tmp_path, "model: nets.py:build\nmanifest: m.csv\n"))
    assert data["model"] == f"{tmp_path / 'nets.py'}:build"
    data = read_config_file(write(tmp_path, "model: mypkg.nets:build\nmanifest: m.csv\n"))
    assert data["model"] == "mypkg.nets:build"


def test_probe_mapping_and_rule_overrides(tmp_path: Path) -> None:
    data = read_config_file(write(tmp_path, "model: m.onnx\nmanifest: m.csv\nprobes:\n  predictions: {bootstrap: 10}\n"
                                            "rules:\n  accuracy-floor: {min_support: 5}\n"))
    config = build_config(data, {})
    assert config.probe_params == {"predictions": {"bootstrap": 10}}
    assert config.rules["accuracy-floor"].min_support == 5
    listed = build_config(read_config_file(write(tmp_path, "model: m.onnx\nmanifest: m.csv\nprobes: [predictions]\nrules: [x.yaml]\n")), {})
    assert listed.probes == ["predictions"] and listed.rule_files == [tmp_path / "x.yaml"]


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("model: m.onnx\nmanifest: m.csv\nbatchsize: 3\n", "audit.yaml: unknown key 'batchsize'"),
        ("model: m.onnx\nmanifest: m.csv\nfail_on: sometimes\n", "key 'fail_on'"),
        ("model: m.onnx\nmanifest: m.csv\nrules: {accuracy-floor: {thresholds: [{op: lt}]}}\n", "key 'rules.accuracy-floor.thresholds.0.value'"),
        ("model: m.onnx\nmanifest: m.csv\nstd: [0.5, 0]\n", "std must not contain 0"),
        ("model: [unclosed\n", "not valid YAML"),
        ("manifest: m.csv\n", "missing --model"),
        ("- just\n- a list\n", "must be a mapping"),
    ],
)
def test_config_errors_name_the_key(tmp_path: Path, text: str, words: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(InputError) as exc:
        build_config(read_config_file(path), {}, source=str(path))
    assert words in str(exc.value)
    assert "\n" not in str(exc.value)


def test_probe_params_are_validated(dataset, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from audit.api import run_audit

    config = build_config({}, {"model": str(dataset.onnx), "manifest": str(dataset.manifest), "out": tmp_path,
                               "probe_params": {"predictions": {"bootstrapp": 5}}, "quiet": True, "classes": ["r", "g", "b"]})
    with pytest.raises(InputError, match="probes.predictions: unknown key 'bootstrapp'"):
        run_audit(config)


def test_disabled_probe_leaves_its_rules_skipped(run_factory, dataset, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = write(tmp_path, "probes:\n  predictions: {enabled: false}\n")
    run = run_factory(["--model", str(dataset.onnx), "--config", str(path)])
    assert "predictions" not in run.results["probes"]
    statuses = {f["rule"]: f["status"] for f in run.results["findings"]}
    assert statuses["accuracy-floor"] == "skipped" and statuses["samples-skipped"] == "warn"


def test_rules_doc_is_generated_from_the_catalogue() -> None:
    from audit.rules.catalogue import load_catalogue

    assert Path("docs/rules.md").read_text() == rules_markdown(load_catalogue())


def test_readme_starts_with_the_two_commands() -> None:
    text = Path("README.md").read_text()
    block = text.split("```")[1]
    assert [line.split()[1] for line in block.strip().splitlines()[1:]] == ["demo", "test"]
