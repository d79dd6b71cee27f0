"""Rendering: the saved run in, report.html / report.pdf / junit.xml out. Never imports torch."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def write_reports(run_dir: Path, results: dict[str, Any], results_sha256: str, formats: Sequence[str] = ("html", "pdf", "junit"),
                  progress: Callable[[str], Any] | None = None) -> dict[str, Path]:
    """`progress` gets one line before each step: the PDF takes the longest (about 20 s for the demo)."""
    from audit.report.junit import write_junit

    say = progress or (lambda line: None)
    written: dict[str, Path] = {}
    if "html" in formats or "pdf" in formats:
        from audit.report.html import render_html, write_html
        from audit.report.viewmodel import build_view

        say("rendering the report (figures and sample images)")
        html = render_html(build_view(run_dir, results, results_sha256))
        if "html" in formats:
            written["html"] = write_html(run_dir / "report.html", html)
        if "pdf" in formats:
            from audit.report.pdf import write_pdf

            say("writing report.pdf (the longest step of rendering)")
            written["pdf"] = write_pdf(run_dir / "report.pdf", html, run_dir)
    if "junit" in formats:
        say("writing junit.xml")
        written["junit"] = write_junit(run_dir / "junit.xml", results)
    return written
