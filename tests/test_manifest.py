"""Manifest validation: every schema error names the file, the row and the column."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from audit.errors import InputError
from audit.manifest import load_manifest, stratified_subset

CLASSES = ["cat", "dog"]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    for name in ("a.png", "b.png", "c.png"):
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / name)
    np.save(tmp_path / "d.npy", np.zeros((4, 4), np.float32))
    return tmp_path


def write(folder: Path, text: str, name: str = "m.csv") -> Path:
    path = folder / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "row", "column", "words"),
    [
        ("id,path,label\na,a.png,cat\na,b.png,dog\n", 2, "id", "duplicate id 'a' (first used in row 1)"),
        ("path,label\na.png,cat\n,dog\n", 2, "path", "empty path"),
        ("path,label\na.png,cat\nb.png,bird\n", 2, "label", "'bird' is not one of the 2 class names"),
        ("path,label\na.png,7\n", 1, "label", "label index 7 is out of range (0..1)"),
        ("path,label\na.png,-1\n", 1, "label", "out of range"),
    ],
)
def test_schema_errors_name_row_and_column(folder: Path, text: str, row: int, column: str, words: str) -> None:
    path = write(folder, text)
    with pytest.raises(InputError) as exc:
        load_manifest(path, CLASSES)
    message = str(exc.value)
    assert message.startswith(str(path))
    assert f"row {row}, column '{column}'" in message
    assert words in message
    assert "\n" not in message


def test_label_names_need_classes(folder: Path) -> None:
    with pytest.raises(InputError, match=r"row 1, column 'label': label 'cat' is not a class index and no class names were given"):
        load_manifest(write(folder, "path,label\na.png,cat\n"))


def test_missing_path_column_and_empty_and_bad_suffix(folder: Path) -> None:
    with pytest.raises(InputError, match=r"required column 'path' is missing \(columns: file, label\)"):
        load_manifest(write(folder, "file,label\na.png,cat\n"))
    with pytest.raises(InputError, match="manifest has no rows"):
        load_manifest(write(folder, "path,label\n"))
    with pytest.raises(InputError, match=r"must be \.csv, \.jsonl or \.parquet"):
        load_manifest(write(folder, "path\n", "m.txt"))
    with pytest.raises(InputError, match="manifest not found"):
        load_manifest(folder / "nope.csv")


def test_jsonl_errors_name_the_line(folder: Path) -> None:
    path = write(folder, '{"path": "a.png"}\n{"path": "b.png"\n', "m.jsonl")
    with pytest.raises(InputError, match=r"m\.jsonl row 2: not valid JSON"):
        load_manifest(path)


def test_formats_agree(folder: Path) -> None:
    rows = [{"id": "x", "path": "a.png", "label": "dog", "domain": "sim", "weather": "snow"},
            {"id": "y", "path": "d.npy", "label": 0, "domain": "data", "weather": None}]
    write(folder, "id,path,label,domain,weather\nx,a.png,dog,sim,snow\ny,d.npy,0,data,\n")
    (folder / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    pd.DataFrame([{**r, "label": str(r["label"])} for r in rows]).to_parquet(folder / "m.parquet")
    loaded = [load_manifest(folder / f"m.{ext}", CLASSES) for ext in ("csv", "jsonl", "parquet")]
    for manifest in loaded:
        assert [(s.id, s.label, s.domain, s.meta) for s in manifest.samples] == [
            ("x", 1, "sim", {"weather": "snow"}), ("y", 0, "data", {})]
        assert manifest.domains == ["data", "sim"]


def test_unlabelled_rows_and_default_ids(folder: Path) -> None:
    manifest = load_manifest(write(folder, "path,label\na.png,\nsub/../b.png,1\n"), CLASSES)
    assert [s.id for s in manifest.samples] == ["a.png", "b.png"]
    assert [s.label for s in manifest.samples] == [None, 1]
    assert manifest.has_labels


def test_missing_and_refused_rows_are_skipped_not_fatal(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    outside = tmp_path_factory.mktemp("elsewhere")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(outside / "e.png")
    text = f"id,path\nok,a.png\ngone,zzz.png\nclimb,../{outside.name}/e.png\nabs,{outside / 'e.png'}\ntext,m.csv\n"
    manifest = load_manifest(write(folder, text))
    assert [s.id for s in manifest.samples] == ["ok"]
    reasons = {s.id: s.reason for s in manifest.skipped}
    assert reasons["gone"] == "file not found"
    assert reasons["climb"].startswith("refused") and reasons["abs"].startswith("refused")
    assert "unsupported file type" in reasons["text"]
    allowed = load_manifest(folder / "m.csv", data_roots=[outside])
    assert [s.id for s in allowed.samples] == ["ok", "climb", "abs"]


def test_a_data_set_linked_into_the_folder_needs_its_real_folder_as_data_root(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    real = tmp_path_factory.mktemp("real")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(real / "e.png")
    (folder / "linked").symlink_to(real)
    manifest = load_manifest(write(folder, "path\nlinked/e.png\n"))
    assert manifest.samples == [] and manifest.rows == 1
    (row,) = manifest.skipped
    assert (row.id, row.path) == ("linked/e.png", "linked/e.png")
    assert row.reason == (f"refused: path is outside the manifest folder and every --data-root (symlink to {real.resolve() / 'e.png'}; "
                          "a data set linked into the manifest folder needs its real folder as --data-root)")
    (sample,) = load_manifest(folder / "m.csv", data_roots=[real]).samples
    assert sample.id == "linked/e.png" and sample.path == folder / "linked" / "e.png"  # read through the link, as given


def test_a_symlink_inside_pointing_outside_is_refused(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    outside = tmp_path_factory.mktemp("outside")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(outside / "secret.png")
    (folder / "img").mkdir()
    (folder / "img" / "link.png").symlink_to(outside / "secret.png")
    (folder / "img" / "up").symlink_to(outside)
    manifest = load_manifest(write(folder, "id,path\nok,a.png\nlink,img/link.png\nvia-dir,img/up/secret.png\n"))
    assert [s.id for s in manifest.samples] == ["ok"]
    reasons = {s.id: s.reason for s in manifest.skipped}
    for sample_id in ("link", "via-dir"):
        assert reasons[sample_id].startswith("refused: path is outside the manifest folder and every --data-root (symlink to ")
        assert str(outside.resolve() / "secret.png") in reasons[sample_id]
    assert [s.id for s in load_manifest(folder / "m.csv", data_roots=[outside]).samples] == ["ok", "link", "via-dir"]


def test_a_symlink_inside_pointing_inside_is_accepted(folder: Path) -> None:
    (folder / "img").mkdir()
    (folder / "img" / "alias.png").symlink_to(folder / "a.png")
    (folder / "img" / "relative.png").symlink_to(Path("..") / "b.png")
    (folder / "same").symlink_to(folder)
    manifest = load_manifest(write(folder, "path\nimg/alias.png\nimg/relative.png\nsame/c.png\n"))
    assert [s.id for s in manifest.samples] == ["img/alias.png", "img/relative.png", "same/c.png"] and not manifest.skipped


def test_a_folder_reached_through_a_symlinked_data_root_or_manifest_folder_is_inside(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    elsewhere = tmp_path_factory.mktemp("links")
    (elsewhere / "data").symlink_to(folder)
    manifest = load_manifest(write(folder, "path\na.png\n"))
    via_link = load_manifest(elsewhere / "data" / "m.csv")  # the manifest folder itself is a link: its real folder counts
    assert [s.id for s in manifest.samples] == [s.id for s in via_link.samples] == ["a.png"]
    rooted = load_manifest(write(tmp_path_factory.mktemp("m"), f"path\n{elsewhere / 'data' / 'b.png'}\n"), data_roots=[elsewhere / "data"])
    assert len(rooted.samples) == 1


def test_a_mask_symlink_pointing_outside_keeps_the_sample_without_mask(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    outside = tmp_path_factory.mktemp("masks")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(outside / "m.png")
    (folder / "mask-link.png").symlink_to(outside / "m.png")
    manifest = load_manifest(write(folder, "path,mask\na.png,mask-link.png\nb.png,c.png\n"))
    assert [(s.id, s.mask) for s in manifest.samples] == [("a.png", None), ("b.png", folder / "c.png")]
    (warning,) = manifest.warnings
    assert (warning.id, warning.path) == ("a.png", "mask-link.png")
    assert warning.reason.startswith("mask refused: outside the manifest folder and every --data-root (symlink to ")
    assert warning.reason.endswith("; sample kept without mask")
    assert load_manifest(folder / "m.csv", data_roots=[outside]).samples[0].mask == folder / "mask-link.png"


def test_missing_mask_keeps_the_sample_with_a_warning(folder: Path) -> None:
    manifest = load_manifest(write(folder, "path,mask\na.png,nomask.png\nb.png,c.png\n"))
    assert [s.mask is None for s in manifest.samples] == [True, False]
    assert manifest.warnings[0].id == "a.png" and "mask file not found" in manifest.warnings[0].reason


def test_stratified_subset_keeps_proportions_and_is_seeded() -> None:
    from audit.manifest import Sample

    samples = [Sample(f"s{i}", Path(f"{i}.png"), i, label=0 if i < 80 else 1, domain="sim" if i % 2 else "data") for i in range(100)]
    subset = stratified_subset(samples, 20, seed=3)
    assert len(subset) == 20
    assert sum(s.label == 1 for s in subset) == 4
    assert sum(s.domain == "sim" for s in subset) == 10
    assert [s.row for s in subset] == sorted(s.row for s in subset)
    assert subset == stratified_subset(samples, 20, seed=3)
    assert subset != stratified_subset(samples, 20, seed=4)
    assert stratified_subset(samples, 500, seed=0) == samples


def test_odd_paths_are_skipped_rows_not_crashes(folder: Path) -> None:
    long_name = "x" * 300 + ".png"  # longer than a file name may be: the OS refuses it
    text = f"id,path,mask\nuser,~no-such-user-here/a.png,\nlong,{long_name},\nnul,a\x00.png,\nmask,a.png,{'y' * 300}.png\n"
    manifest = load_manifest(write(folder, text))
    reasons = {s.id: s.reason for s in manifest.skipped}
    assert reasons == {"user": "file not found", "long": "file not found", "nul": "refused: the path contains a NUL character"}
    assert [s.id for s in manifest.samples] == ["mask"] and "mask file not found" in manifest.warnings[0].reason


def test_unreadable_tables_are_input_errors(folder: Path) -> None:
    with pytest.raises(InputError, match=r"m\.csv: column 'path' appears more than once"):
        load_manifest(write(folder, "path,path \na.png,b.png\n"))
    with pytest.raises(InputError, match=r"m\.jsonl row 2: not valid JSON \(nested too deeply\)"):
        load_manifest(write(folder, '{"path": "a.png"}\n' + "[" * 100_000 + "\n", "m.jsonl"))
    (folder / "m.parquet").write_bytes(b"PAR1 not parquet PAR1")
    with pytest.raises(InputError, match=r"m\.parquet: cannot read manifest \(") as exc:
        load_manifest(folder / "m.parquet")
    assert "\n" not in str(exc.value)
    with pytest.raises(InputError, match=r"required column 'path' is missing \(columns: \\x00path\)"):
        load_manifest(write(folder, "\x00path\na.png\n"))
