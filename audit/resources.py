"""Where the shipped templates, rules and schema live: inside the wheel, or at the repo top level."""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
_INSTALLED = _PACKAGE / "_data"
_SOURCE = _PACKAGE.parent


def _locate(installed: str, source: str) -> Path:
    for candidate in (_INSTALLED / installed, _SOURCE / source):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(
        f"model-audit is missing its {installed!r} resources (looked in {_INSTALLED} and {_SOURCE}); "
        "reinstall the package"
    )


def templates_dir() -> Path:
    return _locate("templates", "templates")


def rules_dir() -> Path:
    return _locate("rules", "rules")


def results_schema_path() -> Path:
    return _locate("results.schema.json", "docs/results.schema.json")
