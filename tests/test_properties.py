"""Properties of the two parsers that read what users write: the manifest (CSV / JSONL) and the rule
files (YAML). Whatever the input, each gives its result or its one-line error (InputError, RuleError),
never another exception; and what it accepts, it accepts consistently."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from audit.errors import InputError, RuleError
from audit.manifest import Manifest, load_manifest, read_table
from audit.rules.engine import render_message
from audit.rules.schema import MESSAGE_FIELDS, RuleSpec, load_rule_file, parse_rule

# database=None: nothing is written into the checkout (.hypothesis/); examples stay few, the machine is small
PROPERTY = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
CLASSES = ["cat", "dog", "n/a"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data folder with two images, a mask, a text file, a symlink inside and one out, and a file outside."""
    root = tmp_path_factory.mktemp("data")
    outside = tmp_path_factory.mktemp("outside")
    for name in ("a.png", "b.png"):
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / name)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(root / "mask.png")
    (root / "notes.txt").write_text("not an image")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(outside / "secret.png")
    (root / "alias.png").symlink_to(root / "a.png")
    (root / "link.png").symlink_to(outside / "secret.png")
    return root


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert text and "\n" not in text and "\r" not in text, repr(text)
    assert "Traceback" not in text and "internal error" not in text
    return text


def check_manifest(manifest: Manifest) -> None:
    ids = [s.id for s in manifest.samples] + [s.id for s in manifest.skipped]
    assert len(ids) == len(set(ids)), "ids are unique"
    assert len(manifest.samples) + len(manifest.skipped) == manifest.rows, "every row is a sample or a skipped row"
    rows = [s.row for s in manifest.samples]
    assert rows == sorted(rows) and all(1 <= r <= manifest.rows for r in rows)
    for sample in manifest.samples:
        assert sample.path.is_file() and (sample.label is None or 0 <= sample.label)
        assert sample.mask is None or sample.mask.is_file()
    assert {w.id for w in manifest.warnings} <= {s.id for s in manifest.samples}
    manifest.describe()  # what results.json records is always buildable


def load_or_refuse(path: Path, classes: list[str] | None = CLASSES) -> Manifest | None:
    try:
        manifest = load_manifest(path, classes)
    except InputError as exc:
        one_line(exc)
        return None
    check_manifest(manifest)
    try:
        assert read_table(path).shape[0] == manifest.rows, "rows count the table's data rows"
    except InputError:  # pragma: no cover - the manifest loaded, so its table reads
        raise AssertionError("the table of a loaded manifest cannot be read") from None
    return manifest


# ---------------------------------------------------------------- the manifest


@PROPERTY
@given(text=st.text(max_size=300), classes=st.sampled_from([CLASSES, None]))
def test_any_csv_text_gives_a_manifest_or_an_input_error(folder: Path, text: str, classes: list[str] | None) -> None:
    path = folder / "m.csv"
    path.write_text(text, encoding="utf-8")
    load_or_refuse(path, classes)


@PROPERTY
@given(text=st.lists(st.sampled_from([*"\n\n,,,\"' \t;.~/\x00\r", "path", "id", "label", "mask", "domain", "a.png", "b.png", "../x", "cat", "dog",
                                      "0", "1", "-1", "1.5", "link.png", "alias.png", "notes.txt", "mask.png", "path ", " path"]),
                     max_size=60).map("".join))
def test_csv_like_text_gives_a_manifest_or_an_input_error(folder: Path, text: str) -> None:
    path = folder / "m.csv"
    path.write_text(text, encoding="utf-8")
    load_or_refuse(path)


JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(10**30), max_value=10**30),
                         st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                           max_leaves=8)


@PROPERTY
@given(lines=st.lists(st.one_of(st.text(max_size=60), JSON_VALUES.map(json.dumps),
                                st.dictionaries(st.sampled_from(["id", "path", "label", "mask", "domain", "group", "x"]), JSON_VALUES,
                                                max_size=6).map(json.dumps)), max_size=8))
def test_any_jsonl_lines_give_a_manifest_or_an_input_error(folder: Path, lines: list[str]) -> None:
    path = folder / "m.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8", errors="replace")
    load_or_refuse(path)


PATHS = st.one_of(st.sampled_from(["a.png", "b.png", "./a.png", "sub/../b.png", "alias.png", "link.png", "notes.txt", "missing.png",
                                   "../outside/secret.png", "/etc/passwd", "/nowhere/x.png", "~/x.png", "~nobody-here/x.png",
                                   "a\x00.png", "x" * 300 + ".png", "mask.png", " a.png "]),
                  st.text(max_size=30))
LABELS = st.one_of(st.none(), st.sampled_from(["cat", "dog", "n/a", "bird", "0", "1", "2", "3", "-1", "1.0", "1.5", "", " "]),
                   st.integers(-3, 5), st.text(max_size=6))
ROWS = st.fixed_dictionaries(
    {"path": PATHS},
    optional={"id": st.one_of(st.none(), st.sampled_from(["x", "y", "a.png", "1", "1.0"]), st.text(max_size=8)), "label": LABELS,
              "mask": st.one_of(st.none(), st.sampled_from(["mask.png", "link.png", "missing.png", "../outside/secret.png"]), st.text(max_size=8)),
              "domain": st.one_of(st.none(), st.sampled_from(["sim", "data"]), st.text(max_size=6)),
              "weather": JSON_SCALARS},
)


@PROPERTY
@given(rows=st.lists(ROWS, min_size=1, max_size=8))
def test_random_rows_load_the_same_from_csv_and_jsonl(folder: Path, rows: list[dict[str, Any]]) -> None:
    columns = sorted({key for row in rows for key in row})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows([{k: "" if v is None else v for k, v in row.items()} for row in rows])
    (folder / "m.csv").write_text(buffer.getvalue(), encoding="utf-8", errors="replace")
    (folder / "m.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n", encoding="utf-8", errors="replace")
    from_csv = load_or_refuse(folder / "m.csv")
    from_jsonl = load_or_refuse(folder / "m.jsonl")
    if from_jsonl is not None:
        assert from_jsonl.rows == len(rows)
        for sample in from_jsonl.samples:  # nothing outside the folder is ever accepted, through a symlink or not
            assert sample.path.resolve().is_relative_to(folder.resolve())
            assert sample.mask is None or sample.mask.resolve().is_relative_to(folder.resolve())
        reasons = {s.id: s.reason for s in from_jsonl.skipped}
        for row in rows:
            if row["path"] == "link.png" and isinstance(row.get("id"), str) and row["id"].strip() in reasons:
                assert reasons[row["id"].strip()].startswith("refused: path is outside the manifest folder and every --data-root (symlink to ")
    simple = all(isinstance(v, str) and v == v.strip() and v.isprintable() and v not in ("", "1.0") and "\r" not in v
                 for row in rows for v in row.values() if v is not None)
    if simple and from_csv is not None and from_jsonl is not None:
        assert [s.id for s in from_csv.samples] == [s.id for s in from_jsonl.samples]
        assert [s.reason for s in from_csv.skipped] == [s.reason for s in from_jsonl.skipped]


# ---------------------------------------------------------------- the rule files

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(10**400), max_value=10**400), st.floats(),
                    st.text(max_size=20), st.dates())
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.one_of(st.text(max_size=8), st.integers()), inner,
                                                                                            max_size=3), max_leaves=10)
KEYS = ["schema", "id", "version", "title", "description", "metric", "aggregate", "min_support", "thresholds", "values",
        "message", "pass_message", "remedy", "rationale", "evidence", "references", "source"]


def valid_rule() -> dict[str, Any]:
    return {"schema": "model-audit/rule/v1", "id": "r", "title": "T", "metric": "predictions.accuracy", "message": "{value:.1%}",
            "remedy": "r", "thresholds": [{"op": "lt", "value": 0.5, "status": "fail", "severity": "high"}]}


def parse_or_refuse(data: Any) -> RuleSpec | None:
    try:
        spec = parse_rule(data, "p.yaml")
    except RuleError as exc:
        assert one_line(exc).startswith("p.yaml: ")
        return None
    for threshold in spec.thresholds or ():
        values = threshold.value if isinstance(threshold.value, list) else [threshold.value]
        assert all(math.isfinite(v) for v in values)
    return spec


@PROPERTY
@given(data=st.one_of(VALUES, st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=10)))
def test_any_mapping_gives_a_rule_or_a_rule_error(data: Any) -> None:
    parse_or_refuse(data)


@PROPERTY
@given(key=st.sampled_from(KEYS + ["op", "extra"]), value=VALUES, where=st.sampled_from(["rule", "threshold", "aggregate"]))
def test_a_valid_rule_with_one_value_changed_gives_a_rule_or_a_rule_error(key: str, value: Any, where: str) -> None:
    data = valid_rule()
    if where == "threshold":
        data["thresholds"][0][key if key in ("op", "value", "status", "severity", "bound") else "value"] = value
    elif where == "aggregate":
        data["aggregate"] = {"per": value} if key != "extra" else {"stat": value}
    else:
        data[key] = value
    parse_or_refuse(data)


@PROPERTY
@given(text=st.one_of(st.text(max_size=200),
                      st.lists(st.sampled_from([*"{}[]:,-?&*!|>'\"#\n\n  .", "schema", "id", "value", ".nan", ".inf", "2001-13-01",
                                                "model-audit/rule/v1", "thresholds", "op", "!!binary", "!!float", "---", "- "]),
                               max_size=40).map("".join)))
def test_any_yaml_text_gives_rules_or_a_rule_error(tmp_path_factory: pytest.TempPathFactory, text: str) -> None:
    path = tmp_path_factory.getbasetemp() / "prop-rule.yaml"
    path.write_text(text, encoding="utf-8", errors="replace")
    try:
        rules = load_rule_file(path)
    except RuleError as exc:
        assert one_line(exc).startswith(f"{path}:")
        return
    assert rules and all(isinstance(r, RuleSpec) for r in rules)


FIELD_VALUES = st.one_of(st.none(), st.floats(), st.integers(-(10**20), 10**20), st.text(max_size=10),
                         st.lists(st.floats(allow_nan=False), min_size=2, max_size=2))


@PROPERTY
@given(template=st.one_of(st.text(max_size=40),
                          st.lists(st.one_of(st.sampled_from(sorted(MESSAGE_FIELDS)).map(lambda f: "{" + f),
                                             st.sampled_from([":", ".", "}", "{", "!r", "[0]", ">", "<", "^", "=", "+", ",", "_", "%", "f", "d",
                                                              "e", "g", "s", "c", "x", "0", "9", "50", "51", "99999"])), max_size=8).map("".join)),
       values=st.dictionaries(st.sampled_from(sorted(MESSAGE_FIELDS)), FIELD_VALUES))
def test_an_accepted_template_always_renders_and_stays_small(template: str, values: dict[str, Any]) -> None:
    spec = parse_or_refuse({**valid_rule(), "message": template})
    if spec is None:
        return
    text = render_message(spec.message, **values)
    longest = max((len(str(v)) for v in values.values()), default=0)
    assert len(text) <= len(template) + template.count("{") * (120 + 3 * longest)


THRESHOLDS = st.one_of(
    st.builds(lambda op, value, status, severity: {"op": op, "value": value, "status": status, "severity": severity},
              st.sampled_from(["gt", "ge", "lt", "le", "eq", "ne"]), st.floats(allow_nan=False, allow_infinity=False, width=32),
              st.sampled_from(["fail", "warn"]), st.sampled_from(["critical", "high", "medium", "low"])),
    st.builds(lambda op, a, b: {"op": op, "value": sorted([a, b]), "status": "info"}, st.sampled_from(["between", "outside"]),
              st.integers(-100, 100), st.integers(-100, 100)),
)
VALID_RULES = st.builds(
    lambda rid, per, thresholds, min_support, message, values: {
        "schema": "model-audit/rule/v1", "id": rid, "title": "A title", "metric": "predictions.recall", "aggregate": {"per": per},
        "min_support": min_support, **({"thresholds": thresholds} if thresholds else {}), "values": values,
        "message": message + "".join(f" {{{name}}}" for name in values), "remedy": "Do {rule} again."},
    st.from_regex(r"[a-z0-9][a-z0-9-]{0,12}", fullmatch=True), st.sampled_from(["global", "class", ["class", "domain/class"], "method"]),
    st.lists(THRESHOLDS, max_size=3), st.integers(0, 10**6),
    st.sampled_from(["{scope}: {value:.1%}", "{class} {n:,} {threshold}", "{value:>8.3f} of {min_support:d}", "plain {{braces}}"]),
    st.dictionaries(st.from_regex(r"q[a-z_]{0,6}", fullmatch=True), st.just("predictions.accuracy:lo"), max_size=2),
)


@PROPERTY
@given(data=VALID_RULES)
def test_valid_rules_round_trip_through_yaml(tmp_path_factory: pytest.TempPathFactory, data: dict[str, Any]) -> None:
    spec = parse_rule(data, "gen.yaml")
    assert parse_rule(spec.model_dump(mode="json", by_alias=True, exclude_none=True), "gen.yaml") == spec
    path = tmp_path_factory.getbasetemp() / "prop-round-trip.yaml"
    public = {k: v for k, v in spec.public_dict().items() if k != "source"}
    if not public["thresholds"]:
        del public["thresholds"]  # the file format leaves an informational rule's thresholds out
    path.write_text(yaml.safe_dump(public, sort_keys=False))
    (again,) = load_rule_file(path)
    assert {k: v for k, v in again.public_dict().items() if k != "source"} == {k: v for k, v in spec.public_dict().items() if k != "source"}


@PROPERTY
@given(scope=st.one_of(st.text(max_size=20), st.lists(st.sampled_from(["class:", "domain:", "pair:", "group:", "x", "/", "%2F", "%", "->", "global", "*"]),
                                                      max_size=5).map("".join)))
def test_any_waiver_scope_is_accepted_as_a_scope_the_engine_writes_or_refused(scope: str) -> None:
    from pydantic import ValidationError

    from audit.config import Waiver
    from audit.metrics.names import parse_scope
    from audit.metrics.names import scope as build_scope

    try:
        waiver = Waiver(rule="r", scope=scope, reason="why", by="me")
    except ValidationError as exc:
        assert "\n" not in exc.errors()[0]["msg"]
        return
    if waiver.scope not in ("*", "global"):
        parts = parse_scope(waiver.scope)
        assert build_scope(**{("class_" if k == "class" else k): v for k, v in parts.items()}) == waiver.scope
