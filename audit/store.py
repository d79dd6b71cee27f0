"""The run directory: results.json (atomic, versioned, schema-checked), per-sample Parquet, artifacts.

Layout:
    results.json          the contract between computation and rendering
    samples/<probe>.parquet
    artifacts/<sha256[:20]>.<ext>   content-addressed (thumbnails, heatmaps, arrays)
    report.html / report.pdf / junit.xml
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from audit.errors import InputError

SCHEMA_VERSION = "1.0"
_UMASK = os.umask(0o022)
os.umask(_UMASK)
RESULTS = "results.json"
REPORT_FILES = ("report.html", "report.pdf", "junit.xml")


def atomic_write(path: Path, data: bytes) -> None:
    """Write via a temporary file and rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _json_default(value: Any) -> Any:
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def dumps(data: Any) -> bytes:
    return json.dumps(data, indent=2, sort_keys=False, default=_json_default, allow_nan=False, ensure_ascii=False).encode("utf-8")


class RunStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @property
    def results_path(self) -> Path:
        return self.root / RESULTS

    def prepare(self) -> None:
        """Create the run folder and remove an earlier run's files, so a failed re-run never leaves
        old results next to new tables. Other files in the folder (e.g. the demo's data) are kept."""
        self.root.mkdir(parents=True, exist_ok=True)
        for name in (RESULTS, *REPORT_FILES):
            (self.root / name).unlink(missing_ok=True)
        for sub in ("samples", "artifacts"):
            folder = self.root / sub
            if folder.is_dir():
                for item in folder.iterdir():
                    if item.is_file():
                        item.unlink()
            folder.mkdir(exist_ok=True)

    def write_table(self, name: str, frame: pd.DataFrame) -> Path:
        path = self.root / "samples" / f"{name}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".parquet.tmp")
        frame.reset_index(drop=True).to_parquet(tmp, index=False)
        os.replace(tmp, path)
        return path

    def read_table(self, name: str) -> pd.DataFrame | None:
        path = self.root / "samples" / f"{name}.parquet"
        return pd.read_parquet(path) if path.is_file() else None

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
