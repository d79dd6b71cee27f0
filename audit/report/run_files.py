"""Read-only access to a saved run's files, shared by the generic view model and the probe views:
its per-sample tables (each read once per render) and its artifacts (never outside the run folder)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd


def run_file(run_dir: Path, relative: str) -> Path | None:
    """The run's file at `relative`, or None when it is missing or resolves outside the run folder."""
    path = (run_dir / relative).resolve()
    if run_dir.resolve() not in path.parents or not path.is_file():
        return None
    return path


class Tables:
    """The run's per-sample Parquet tables by name (None for a table the run does not have)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self._cache: dict[str, pd.DataFrame | None] = {}

    def load(self, name: str) -> pd.DataFrame | None:
        if name not in self._cache:
            path = self.run_dir / "samples" / f"{name}.parquet"
            self._cache[name] = pd.read_parquet(path) if path.is_file() else None
        return self._cache[name]

    def top(self, name: str, column: str, n: int = 12, ascending: bool = False) -> list[dict[str, Any]]:
        """The n rows with the largest (or smallest) non-missing `column`, as dicts."""
        table = self.load(name)
        if table is None or column not in table.columns:
            return []
        rows = table.dropna(subset=[column]).sort_values(column, ascending=ascending, kind="stable").head(n)
        return [{k: v for k, v in row.items() if k != "probabilities"} for row in rows.to_dict("records")]
