"""The manifest: which samples to audit, with labels, masks, domains and metadata.

Schema problems (a missing column, a duplicate id, an unknown label) stop the run with one line
naming the file, row and column. Problems with one sample's file (missing, refused) skip that row;
the skipped rows are listed in the report so nothing disappears silently. A sample or mask path is
refused when where it really leads (every symlink followed) is outside the manifest folder and every
--data-root (those resolved too): a symlink inside the folder cannot bring in a file from elsewhere.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from audit.errors import InputError, printable

KNOWN_COLUMNS = ("id", "path", "label", "mask", "domain", "group")
SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".npy"}


@dataclass(frozen=True)
class Sample:
    """One row of the manifest, paths resolved. `row` is 1-based, counting data rows only."""

    id: str
    path: Path
    row: int
    label: int | None = None
    mask: Path | None = None
    domain: str | None = None
    group: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SkippedRow:
    id: str
    path: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"id": self.id, "path": self.path, "reason": self.reason}


@dataclass
class Manifest:
    path: Path
    sha256: str
    samples: list[Sample]
    skipped: list[SkippedRow]
    classes: list[str] | None
    rows: int
    columns: list[str]
    warnings: list[SkippedRow] = field(default_factory=list)

    @property
    def has_labels(self) -> bool:
        return any(s.label is not None for s in self.samples)

    @property
    def has_masks(self) -> bool:
        return any(s.mask is not None for s in self.samples)

    @property
    def domains(self) -> list[str]:
        return sorted({s.domain for s in self.samples if s.domain is not None})

    def skip(self, sample: Sample, reason: str) -> None:
        """Drop a sample whose file turned out unreadable during the run."""
        self.samples = [s for s in self.samples if s.id != sample.id]
        self.skipped.append(SkippedRow(sample.id, str(sample.path), reason))

    def mask_problem(self, sample: Sample, reason: str, kept: bool) -> None:
        """List a mask that could not be read (the sample stays, without it) or was resized."""
        self.warnings.append(SkippedRow(sample.id, str(sample.mask), reason))
        if not kept:
            self.samples = [replace(s, mask=None) if s.id == sample.id else s for s in self.samples]

    def describe(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "sha256": self.sha256,
            "rows": self.rows,
            "samples": len(self.samples),
            "columns": self.columns,
            "labelled": sum(s.label is not None for s in self.samples),
            "with_mask": sum(s.mask is not None for s in self.samples),
            "domains": {d: sum(s.domain == d for s in self.samples) for d in self.domains},
            "skipped": [s.as_dict() for s in self.skipped],
            "warnings": [s.as_dict() for s in self.warnings],
        }


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_table(path: Path) -> pd.DataFrame:
    """Read CSV / JSONL / Parquet into a frame of Python objects, missing cells as None."""
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise InputError(f"{path}: manifest must be .csv, .jsonl or .parquet (got {path.suffix or 'no suffix'!r})")
    if not path.is_file():
        raise InputError(f"{path}: manifest not found")
    try:
        frame = _read(path, kind)
    except InputError:
        raise
    except _reader_errors(kind) as exc:
        text = str(exc).strip()
        why = f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
        raise InputError(f"{path}: cannot read manifest ({printable(why)})") from None
    frame.columns = [printable(str(c).strip()) for c in frame.columns]
    duplicates = sorted({c for c in frame.columns if list(frame.columns).count(c) > 1})
    if duplicates:
        raise InputError(f"{path}: column {duplicates[0]!r} appears more than once")
    return frame.astype(object).where(frame.notna(), None)


def _reader_errors(kind: str) -> tuple[type[BaseException], ...]:
    """What reading a damaged manifest raises: the parsers' errors, and for Parquet pyarrow's own."""
    errors: tuple[type[BaseException], ...] = (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError, csv.Error,
                                               OSError, ValueError, TypeError, OverflowError, RecursionError, MemoryError)
    if kind == "parquet":
        try:
            import pyarrow

            errors += (pyarrow.ArrowException, NotImplementedError, KeyError, IndexError)
        except ImportError:  # pragma: no cover - pandas then says it needs an engine (ImportError)
            errors += (ImportError,)
    return errors


def _read(path: Path, kind: str) -> pd.DataFrame:
    if kind == "csv":
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
        return frame.replace({"": None})
    if kind == "parquet":
        return pd.read_parquet(path)
    records = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path} row {number}: not valid JSON ({exc.msg})") from None
            except RecursionError:
                raise InputError(f"{path} row {number}: not valid JSON (nested too deeply)") from None
            if not isinstance(record, dict):
                raise InputError(f"{path} row {number}: each line must be a JSON object")
            records.append(record)
    return pd.DataFrame.from_records(records)


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or (isinstance(value, str) and not value.strip())


def _text(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _parse_label(value: Any, classes: Sequence[str] | None, where: str) -> int:
    text = _text(value)
    if classes is not None and text in classes:
        return list(classes).index(text)
    try:
        index = int(text)
    except ValueError:
        if classes is None:
            raise InputError(
                f"{where}: label {text!r} is not a class index and no class names were given (--classes)"
            ) from None
        raise InputError(f"{where}: label {text!r} is not one of the {len(classes)} class names") from None
    if index < 0 or (classes is not None and index >= len(classes)):
        limit = f"0..{len(classes) - 1}" if classes is not None else ">= 0"
        raise InputError(f"{where}: label index {index} is out of range ({limit})")
    return index


OUTSIDE = "outside the manifest folder and every --data-root"
LINK_HINT = "a data set linked into the manifest folder needs its real folder as --data-root"
NUL = "the path contains a NUL character"


def _absolute(path: Path) -> Path:
    """Absolute and normalised ('..' removed) without following symlinks: the path a sample is read
    from and its default id are the ones the manifest gives."""
    return Path(os.path.normpath(os.path.abspath(path)))


def _real(path: Path) -> Path:
    """Where the path really leads, every symlink followed (os.path.realpath)."""
    return Path(os.path.realpath(path))


def _inside(path: Path, roots: Sequence[Path]) -> bool:
    return any(path == root or root in path.parents for root in roots)


def _expand(text: str) -> Path:
    """`~` and `~user` expanded; a `~name` of no known user stays as written."""
    try:
        return Path(text).expanduser()
    except RuntimeError:
        return Path(text)


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # a name too long for the file system
        return False


@dataclass(frozen=True)
class _Roots:
    """The manifest folder and the --data-roots, as given (normalised) and as they really are."""

    base: Path
    given: list[Path]
    real: list[Path]

    @classmethod
    def of(cls, manifest: Path, data_roots: Sequence[Path | str]) -> _Roots:
        base = _absolute(manifest).parent
        given = [base] + [_absolute(_expand(str(r))) for r in data_roots]
        return cls(base, given, [_real(r) for r in given])

    def locate(self, text: str) -> tuple[Path, Path, str | None]:
        """(the path as given, normalised; the path it leads to; why it is refused, or None). A path is
        refused when what it really leads to is outside every root: a '..' that climbs out, an
        absolute path elsewhere, or a symlink inside that points outside."""
        if "\x00" in text:
            return Path(text.replace("\x00", "")), Path(), NUL
        given = _expand(text)
        normal = _absolute(given if given.is_absolute() else self.base / given)
        real = _real(normal)
        if _inside(real, self.real):
            return normal, real, None
        if _inside(normal, self.given):
            return normal, real, f"{OUTSIDE} (symlink to {real}; {LINK_HINT})"
        return normal, real, OUTSIDE


def load_manifest(
    path: Path | str,
    classes: Sequence[str] | None = None,
    data_roots: Sequence[Path | str] = (),
) -> Manifest:
    """Read and validate a manifest; rows whose files are missing or refused are skipped, not fatal."""
    path = Path(path)
    frame = read_table(path)
    if "path" not in frame.columns:
        raise InputError(f"{path}: required column 'path' is missing (columns: {', '.join(frame.columns) or 'none'})")
    if frame.empty:
        raise InputError(f"{path}: manifest has no rows")
    roots = _Roots.of(path, data_roots)
    base = roots.base
    extra = [c for c in frame.columns if c not in KNOWN_COLUMNS]

    samples: list[Sample] = []
    skipped: list[SkippedRow] = []
    warnings: list[SkippedRow] = []
    seen: dict[str, int] = {}
    for row_number, record in enumerate(frame.to_dict("records"), start=1):
        def where(column: str) -> str:
            return f"{path} row {row_number}, column {column!r}"

        raw_path = record["path"]
        if _is_missing(raw_path):
            raise InputError(f"{where('path')}: empty path")
        given_text = _text(raw_path)
        given = _expand(given_text)
        resolved, _, refused = roots.locate(given_text)
        sample_id = _text(record["id"]) if not _is_missing(record.get("id")) else _default_id(given, resolved, base)
        if sample_id in seen:
            raise InputError(f"{where('id')}: duplicate id {sample_id!r} (first used in row {seen[sample_id]})")
        seen[sample_id] = row_number

        label = None
        if not _is_missing(record.get("label")):
            label = _parse_label(record["label"], classes, where("label"))

        meta = {c: _json_value(record[c]) for c in extra if not _is_missing(record.get(c))}
        domain = None if _is_missing(record.get("domain")) else _text(record["domain"])
        group = None if _is_missing(record.get("group")) else _text(record["group"])

        if refused:
            skipped.append(SkippedRow(sample_id, str(given), f"refused: {refused if refused == NUL else 'path is ' + refused}"))
            continue
        if resolved.suffix.lower() not in IMAGE_SUFFIXES:
            skipped.append(SkippedRow(sample_id, str(given), f"unsupported file type {resolved.suffix or '(none)'!r}"))
            continue
        if not _is_file(resolved):
            skipped.append(SkippedRow(sample_id, str(given), "file not found"))
            continue

        mask = None
        if not _is_missing(record.get("mask")):
            mask_text = _text(record["mask"])
            mask_path, _, mask_refused = roots.locate(mask_text)
            if mask_refused:
                warnings.append(SkippedRow(sample_id, str(_expand(mask_text)), f"mask refused: {mask_refused}; sample kept without mask"))
            elif not _is_file(mask_path):
                warnings.append(SkippedRow(sample_id, str(_expand(mask_text)), "mask file not found; sample kept without mask"))
            else:
                mask = mask_path
        samples.append(Sample(sample_id, resolved, row_number, label, mask, domain, group, meta))

    return Manifest(
        path=_absolute(path),
        sha256=sha256_file(path),
        samples=samples,
        skipped=skipped,
        classes=list(classes) if classes is not None else None,
        rows=len(frame),
        columns=list(frame.columns),
        warnings=warnings,
    )


def _default_id(given: Path, resolved: Path, base: Path) -> str:
    try:
        return resolved.relative_to(base).as_posix()
    except ValueError:
        return given.as_posix()


def _json_value(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def stratified_subset(samples: Sequence[Sample], limit: int, seed: int) -> list[Sample]:
    """At most `limit` samples, drawn per (domain, label) stratum in proportion, manifest order kept."""
    if len(samples) <= limit:
        return list(samples)
    rng = np.random.default_rng(seed)
    strata: dict[tuple[str, str], list[int]] = {}
    for index, sample in enumerate(samples):
        strata.setdefault((str(sample.domain), str(sample.label)), []).append(index)
    keys = sorted(strata)
    exact = {k: limit * len(strata[k]) / len(samples) for k in keys}
    quota = {k: int(math.floor(exact[k])) for k in keys}
    remainder = limit - sum(quota.values())
    for k in sorted(keys, key=lambda k: (-(exact[k] - quota[k]), k))[:remainder]:
        quota[k] += 1
    chosen: list[int] = []
    for k in keys:
        members = strata[k]
        chosen.extend(rng.choice(members, size=min(quota[k], len(members)), replace=False).tolist())
    return [samples[i] for i in sorted(chosen)]

