"""The run directory: results.json (atomic, versioned, schema-checked), per-sample tables, arrays,
artifacts; and the typed record results.json is built from.

Layout:
    results.json                    the contract between computation and rendering
    samples/<table>.parquet         per-sample rows (the tables probes declare)
    arrays/<table>/<chunk>.npz      per-sample arrays (maps, embeddings), one file per chunk as produced
    arrays/<table>/SHA256SUMS       the chunks' digests, taken while they were streamed to disk
    chunks/<table>/<chunk>.parquet  detail rows of a stage still running (merged into samples/ at its end)
    steps/<probe>.json              the result of a probe's whole-model step
    artifacts/<sha256[:20]>.<ext>   content-addressed (thumbnails, heatmaps, gallery bundles)
    report.html / report.pdf / junit.xml
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from audit.errors import InputError

SCHEMA_VERSION = "1.3"  # 1.1: probes.arrays, consumes, detail_samples; info findings; bound; model.taps. 1.2: gate. 1.3: budget, probes.cost, peak_memory
_UMASK = os.umask(0o022)
os.umask(_UMASK)
RESULTS = "results.json"
CHECKSUMS = "SHA256SUMS"  # beside an array table's chunks, in `sha256sum -c` format
REPORT_FILES = ("report.html", "report.pdf", "junit.xml")
RUN_FOLDERS = ("samples", "artifacts", "arrays", "chunks", "steps")
RUN_ENTRIES = frozenset({RESULTS, *REPORT_FILES, *RUN_FOLDERS})  # what a run writes; anything else in its folder is the user's


def atomic_write(path: Path, data: bytes) -> None:
    """Write via a temporary file and rename, so a reader never sees half a file."""
    with streamed_write(path) as out:
        out.write(data)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def dumps(data: Any) -> bytes:
    return json.dumps(data, indent=2, sort_keys=False, default=_json_default, allow_nan=False, ensure_ascii=False).encode("utf-8")


@dataclass
class ArrayTable:
    """Per-sample arrays: one key row per entry (`id` first, e.g. `id, method`) and named arrays
    whose first axis runs along the keys (a map, an embedding, a gallery bundle's images)."""

    keys: pd.DataFrame
    values: dict[str, np.ndarray]

    def __post_init__(self) -> None:
        self.keys = self.keys.reset_index(drop=True)
        for name, array in self.values.items():
            if len(array) != len(self.keys):
                raise ValueError(f"array {name!r} has {len(array)} entries for {len(self.keys)} keys")

    def __len__(self) -> int:
        return len(self.keys)

    @classmethod
    def concat(cls, parts: list[ArrayTable]) -> ArrayTable | None:
        if not parts:
            return None
        names = list(parts[0].values)
        return cls(pd.concat([p.keys for p in parts], ignore_index=True),
                   {n: np.concatenate([p.values[n] for p in parts]) for n in names})

    def by_key(self, value: str, column: str = "method") -> dict[str, np.ndarray]:
        """{id: array} of the entries whose `column` equals `value`, from the single array held."""
        (array,) = self.values.values()
        rows = np.flatnonzero(self.keys[column].to_numpy() == value)
        return {str(self.keys["id"].iat[i]): array[i] for i in rows}


class RunStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @property
    def results_path(self) -> Path:
        return self.root / RESULTS

    def prepare(self) -> None:
        """Lay out a new run in an empty folder (a run writes into a fresh staging folder, never into an
        earlier run: audit.run_folder)."""
        self.root.mkdir(parents=True, exist_ok=True)
        for sub in ("samples", "artifacts"):
            (self.root / sub).mkdir(exist_ok=True)

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def write_table(self, name: str, frame: pd.DataFrame) -> Path:
        path = self.root / "samples" / f"{name}.parquet"
        _write_parquet(path, frame)
        return path

    def read_table(self, name: str) -> pd.DataFrame | None:
        path = self.root / "samples" / f"{name}.parquet"
        return pd.read_parquet(path) if path.is_file() else None

    def write_chunk(self, name: str, chunk: int, frame: pd.DataFrame) -> Path:
        """Detail rows of one chunk, written as soon as the chunk is done."""
        path = self.root / "chunks" / name / f"{chunk:05d}.parquet"
        _write_parquet(path, frame)
        return path

    def merge_chunks(self, name: str, empty: pd.DataFrame) -> Path:
        """The finished stage's chunks, in chunk order, as samples/<name>.parquet (`empty` when no
        chunk holds rows); the chunk files are then removed."""
        folder = self.root / "chunks" / name
        files = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
        frames = [pd.read_parquet(f) for f in files]
        frames = [f for f in frames if len(f)]
        path = self.write_table(name, pd.concat(frames, ignore_index=True) if frames else empty)
        if folder.is_dir():
            shutil.rmtree(folder)
        return path

    def write_array_chunk(self, name: str, chunk: int, table: ArrayTable) -> str:
        """One chunk of an array table: its key columns and arrays in one .npz (no pickles), streamed
        to disk and hashed as it streams (never built in memory beside the arrays). Returns its
        sha256, which `write_checksums` records beside the chunks."""
        for column in table.keys.columns:
            if column.startswith("value:"):
                raise ValueError(f"key column {column!r} clashes with the array names")
        data = {f"key:{c}": _key_array(table.keys[c]) for c in table.keys.columns}
        data.update({f"value:{n}": v for n, v in table.values.items()})
        path = self.root / "arrays" / name / f"{chunk:05d}.npz"
        with streamed_write(path) as out:
            np.savez(out, **data)
        return out.hexdigest()

    def write_checksums(self, name: str, digests: dict[int, str]) -> None:
        """`arrays/<name>/SHA256SUMS` in `sha256sum -c` format, for the chunks written by this stage."""
        folder = self.root / "arrays" / name
        lines = [f"{digest}  {chunk:05d}.npz\n" for chunk, digest in sorted(digests.items())]
        if lines:
            atomic_write(folder / CHECKSUMS, "".join(lines).encode("ascii"))

    def read_array(self, name: str) -> ArrayTable | None:
        """Every chunk of an array table, in chunk order, filled into one preallocated array per name
        (the chunks are never concatenated beside the result); None when the table was never written."""
        folder = self.root / "arrays" / name
        if not folder.is_dir():
            return None
        paths = sorted(folder.glob("*.npz"))
        if not paths:
            return None
        keys: list[pd.DataFrame] = []
        layout: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        for path in paths:
            with np.load(path, allow_pickle=False) as data:
                keys.append(pd.DataFrame({k[4:]: data[k].tolist() if data[k].dtype.kind == "U" else data[k]
                                          for k in data.files if k.startswith("key:")}))
                if not layout:
                    for k in (k for k in data.files if k.startswith("value:")):
                        value = data[k]
                        layout[k[6:]] = (value.shape[1:], value.dtype)
        total = sum(len(k) for k in keys)
        values = {n: np.empty((total, *shape), dtype) for n, (shape, dtype) in layout.items()}
        start = 0
        for path, part in zip(paths, keys, strict=True):
            with np.load(path, allow_pickle=False) as data:
                for n, target in values.items():
                    chunk = data[f"value:{n}"]
                    if chunk.shape[1:] != target.shape[1:]:
                        raise InputError(f"{path}: array {n!r} has shape {chunk.shape[1:]} per entry, other chunks {target.shape[1:]}")
                    target[start : start + len(part)] = chunk
            start += len(part)
        return ArrayTable(pd.concat(keys, ignore_index=True), values)

    def write_step(self, probe: str, result: dict[str, Any]) -> Path:
        path = self.root / "steps" / f"{probe}.json"
        atomic_write(path, dumps(result))
        return path

    def write_artifact(self, data: bytes, suffix: str) -> str:
        """Store bytes by content; returns the path relative to the run folder."""
        digest = hashlib.sha256(data).hexdigest()[:20]
        relative = f"artifacts/{digest}{suffix}"
        target = self.root / relative
        if not target.exists():
            atomic_write(target, data)
        return relative

    def write_results(self, results: dict[str, Any]) -> str:
        """Atomically write results.json; returns its sha256 (what a sign-off refers to)."""
        data = dumps(results)
        atomic_write(self.results_path, data)
        return hashlib.sha256(data).hexdigest()


class _HashingWriter:
    """A write-only stream that hashes what passes through it on its way to a file. It has no
    `seek` or `tell`, so zipfile writes an .npz front to back (data descriptors) and the digest
    is that of the bytes on disk."""

    def __init__(self, fh: Any) -> None:
        self._fh = fh
        self._hash = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self._hash.update(data)
        return self._fh.write(data)

    def flush(self) -> None:
        self._fh.flush()

    def read(self, size: int = -1) -> bytes:  # numpy takes an object without `read` for a path
        raise io.UnsupportedOperation("write-only stream")

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


@contextlib.contextmanager
def streamed_write(path: Path) -> Iterator[_HashingWriter]:
    """Stream into a temporary file beside `path`, hashing as it goes; renamed into place when the
    block ends, removed when it raises (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as fh:
            writer = _HashingWriter(fh)
            yield writer
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_parquet(path: Path, frame: pd.DataFrame) -> None:
    buffer = io.BytesIO()
    frame.reset_index(drop=True).to_parquet(buffer, index=False)
    atomic_write(path, buffer.getvalue())


def _key_array(column: pd.Series) -> np.ndarray:
    values = column.to_numpy()
    return values.astype(str) if values.dtype == object else values


@dataclass
class ProbeRecord:
    """One probe's entry in results.json."""

    status: str  # ok | skipped | error
    seconds: float
    error: str | None
    reason: str | None
    title: str
    question: str
    references: list[str]
    units: dict[str, str]
    notes: list[str]
    details: dict[str, Any]
    tables: dict[str, str]
    arrays: dict[str, str] = field(default_factory=dict)
    consumes: list[str] = field(default_factory=list)
    detail_samples: int | None = None
    cost: dict[str, Any] | None = None
    peak_memory: int | None = None

    def as_dict(self) -> dict[str, Any]:
        late = ("arrays", "consumes", "detail_samples", "cost", "peak_memory")
        out = {k: v for k, v in vars(self).items() if k not in late}
        out["seconds"] = round(self.seconds, 3)
        out.update({k: getattr(self, k) for k in late})
        return out


@dataclass
class RunTimes:
    started: dt.datetime
    finished: dt.datetime
    seconds: float
    model_load_seconds: float
    forward_seconds: float
    load_seconds: float


@dataclass
class RunRecord:
    """Everything results.json holds, typed; `as_dict` lays it out in the documented order."""

    tool_version: str
    times: RunTimes
    verdict: str
    fail_on: str
    profile: str
    sample_images: bool
    model: dict[str, Any]
    manifest: dict[str, Any]
    preprocessing: dict[str, Any]
    config: dict[str, Any]
    metrics: dict[str, float]
    probes: dict[str, ProbeRecord]
    rules: list[dict[str, Any]]
    findings: list[dict[str, Any]]
    thumbnails: dict[str, str]
    provenance: dict[str, Any]
    gate: dict[str, Any]
    budget: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        t = self.times
        return {
            "schema_version": SCHEMA_VERSION,
            "tool": {"name": "model-audit", "version": self.tool_version},
            "run": {
                "started": t.started.isoformat(timespec="seconds"),
                "finished": t.finished.isoformat(timespec="seconds"),
                "seconds": round(t.seconds, 3),
                "model_load_seconds": round(t.model_load_seconds, 3),
                "forward_seconds": round(t.forward_seconds, 3),
                "load_seconds": round(t.load_seconds, 3),
                "verdict": self.verdict,
                "fail_on": self.fail_on,
                "profile": self.profile,
                "sample_images": self.sample_images,
            },
            "gate": self.gate,
            "budget": self.budget,
            "model": self.model,
            "manifest": self.manifest,
            "preprocessing": self.preprocessing,
            "config": self.config,
            "metrics": dict(sorted(self.metrics.items())),
            "probes": {name: record.as_dict() for name, record in self.probes.items()},
            "rules": self.rules,
            "findings": self.findings,
            "thumbnails": self.thumbnails,
            "provenance": self.provenance,
        }


def load_results(run_dir: Path) -> tuple[dict[str, Any], str]:
    """Read and validate results.json; returns it with the sha256 of its exact bytes."""
    path = Path(run_dir) / RESULTS
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{path}: no results.json here; is {run_dir} a model-audit run folder?") from None
    try:
        results = json.loads(data)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    validate_results(results, str(path))
    return results, hashlib.sha256(data).hexdigest()


def validate_results(results: Any, source: str) -> None:
    import jsonschema

    from audit.resources import results_schema_path

    if not isinstance(results, dict):
        raise InputError(f"{source}: results must be a JSON object")
    version = str(results.get("schema_version", ""))
    if version.split(".")[0] != SCHEMA_VERSION.split(".")[0]:
        raise InputError(f"{source}: schema_version {version or '(missing)'} is not supported (this tool reads {SCHEMA_VERSION})")
    schema = json.loads(results_schema_path().read_text(encoding="utf-8"))
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema).iter_errors(results))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        raise InputError(f"{source}: key '{where}': {error.message}")
