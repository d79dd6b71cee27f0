"""report.pdf: the same HTML laid out for paper by weasyprint, fetching nothing outside the run."""

from __future__ import annotations

import logging
from pathlib import Path
from urllib.parse import unquote, urlparse

from weasyprint import HTML
from weasyprint.urls import URLFetcher, URLFetcherResponse


class RunFolderFetcher(URLFetcher):
    """Serves data: URIs and files inside the run folder; refuses everything else (network, /etc, ...)."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__(allowed_protocols=["data", "file"])
        self.run_dir = Path(run_dir).resolve()

    def fetch(self, url: str, headers: dict[str, str] | None = None) -> URLFetcherResponse:
        if url.startswith("data:"):
            return super().fetch(url, headers)
        parsed = urlparse(url)
        if parsed.scheme != "file":
            raise ValueError(f"model-audit reports load nothing from outside the run folder: {url}")
        path = Path(unquote(parsed.path)).resolve()
        if path != self.run_dir and self.run_dir not in path.parents:
            raise ValueError(f"refusing {path}: outside the run folder {self.run_dir}")
        return super().fetch(url, headers)


def write_pdf(path: Path, html: str, run_dir: Path) -> Path:
    from audit.store import atomic_write

    logging.getLogger("weasyprint").setLevel(logging.ERROR)
    logging.getLogger("fontTools").setLevel(logging.ERROR)
    document = HTML(string=html, base_url=str(Path(run_dir).resolve()) + "/", url_fetcher=RunFolderFetcher(run_dir), media_type="print")
    atomic_write(path, document.write_pdf())
    return path
