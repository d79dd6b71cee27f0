"""What a probe's report view may contribute, and the registry the generic view model reads."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, TypeVar

import pandas as pd

from audit.report.run_files import Tables

_VIEWS: dict[str, type[ProbeView]] = {}
V = TypeVar("V", bound="type[ProbeView]")


class ProbeView:
    """A probe section's view over the saved run (results and tables); never the model or data."""

    probe: ClassVar[str]

    def __init__(self, run_dir: Path, results: dict[str, Any], sample_images: bool, tables: Tables) -> None:
        self.run_dir = run_dir
        self.results = results
        self.sample_images = sample_images
        self.tables = tables  # shared with the generic view model: each table is read once per render
        self.details: dict[str, Any] = results["probes"].get(self.probe, {}).get("details", {})

    def table(self, name: str) -> pd.DataFrame | None:
        """One of the run's per-sample tables (None when the run has none of that name)."""
        return self.tables.load(name)

    def headline(self, metrics: Any) -> list[dict[str, str]]:
        """Rows for the summary's headline table: {label, value, n}."""
        return []

    def facts(self, ids: set[str]) -> dict[str, str]:
        """A caption per evidence sample id this probe can say something about."""
        return {}

    def evidence_image(self, finding: dict[str, Any], sample_id: str) -> dict[str, Any] | None:
        """The sample in the state in which it failed this probe's finding ({uri, width_mm, caption}),
        beside its original and the trusted heatmap; None: the report shows the plain thumbnail."""
        return None

    def gallery_anchor(self, finding: dict[str, Any]) -> str | None:
        """The anchor of this probe's gallery entry for the finding's scope, when it drew one."""
        return None


def register_view(cls: V) -> V:
    _VIEWS[cls.probe] = cls
    return cls


def views_for(run_dir: Path, results: dict[str, Any], sample_images: bool, tables: Tables) -> dict[str, ProbeView]:
    """A view for each probe of the run that has one (its section may use it as `view`)."""
    return {name: _VIEWS[name](run_dir, results, sample_images, tables) for name in results["probes"] if name in _VIEWS}
