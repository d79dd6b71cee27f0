"""report.html: one self-contained file (figures and thumbnails embedded, no network requests)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2
import markupsafe

from audit.report.figures import Charts
from audit.resources import templates_dir


def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir())),
        autoescape=True,  # every user-supplied string (class names, paths, metadata) is escaped
        undefined=jinja2.ChainableUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=["jinja2.ext.do"],
    )
    env.globals["charts"] = Charts()
    env.filters["negate"] = lambda values: [not v for v in values]
    return env


def render_html(view: dict[str, Any]) -> str:
    folder = templates_dir()
    env = environment()
    return env.get_template("report.html.j2").render(
        **view,
        css=markupsafe.Markup((folder / "report.css").read_text(encoding="utf-8")),  # our own files, not user text
        print_css=markupsafe.Markup((folder / "print.css").read_text(encoding="utf-8")),
    )


def write_html(path: Path, html: str) -> Path:
    from audit.store import atomic_write

    atomic_write(path, html.encode("utf-8"))
    return path
