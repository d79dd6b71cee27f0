"""The report as a reader sees it: report.html in a real browser (headless Chromium, Debian's
`chromium` package, driven by Playwright with no browser download) and every page of report.pdf
rendered to pixels.

The browser must log no error, fetch nothing but the file itself, show every image, and the two
interactive parts must work: the severity filter hides the findings of the unticked severities
(and only on screen: printing shows them all), and clicking a sample thumbnail enlarges it.

The run is the session's `torch_run` (tests/conftest.py), shared with tests/test_report.py.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

SEVERITIES = ["critical", "high", "medium", "low", "info"]


def _apt(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(["apt-get", *args], env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium; installed with apt when missing and we are root (as in CI)."""
    path = shutil.which("chromium")
    if path:
        return path
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("the browser test needs Debian's chromium package (/usr/bin/chromium): it is not installed, "
                    "and installing it (apt-get install chromium) needs root")
    install = ("install", "-y", "-qq", "chromium")
    done = _apt(*install)
    if done.returncode != 0:  # the package lists may be missing or stale: refresh them only then
        update = _apt("update", "-qq")
        assert update.returncode == 0, f"apt-get update failed:\n{update.stderr[-2000:]}"
        done = _apt(*install)
    assert done.returncode == 0, f"apt-get install chromium failed:\n{done.stderr[-2000:]}"
    path = shutil.which("chromium")
    assert path, "apt-get installed chromium but no `chromium` is on PATH"
    return path


@pytest.fixture(scope="module")
def browser(chromium: str) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            yield launched
        finally:
            launched.close()


@dataclass
class Opened:
    page: Any
    url: str
    errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)


@pytest.fixture
def report(browser: Any, torch_run) -> Iterator[Opened]:  # type: ignore[no-untyped-def]
    """report.html freshly opened in its own browser context, with everything it logs and asks for recorded."""
    url = (torch_run.out / "report.html").resolve().as_uri()
    context = browser.new_context(service_workers="block", viewport={"width": 1280, "height": 900})
    page = context.new_page()
    opened = Opened(page, url)
    page.on("console", lambda m: opened.errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: opened.errors.append(f"page error: {e}"))
    page.on("request", lambda r: opened.requests.append(r.url))
    page.on("websocket", lambda w: opened.blocked.append(w.url))

    def refuse(route: Any) -> None:
        opened.blocked.append(route.request.url)
        route.abort()

    context.route(re.compile(r"^(https?|wss?)://"), refuse)
    page.goto(url, wait_until="load")
    try:
        yield opened
    finally:
        context.close()


def test_the_report_opens_with_no_error_and_fetches_nothing(report: Opened) -> None:
    report.page.wait_for_timeout(200)  # late errors (a script after load) still count
    assert not report.errors, "\n".join(report.errors)
    assert not report.blocked, f"the report asked the network for {report.blocked}"
    others = [u for u in report.requests if u != report.url and not u.startswith("data:")]
    assert not others, f"requests besides the file itself: {others}"
    assert report.url in report.requests


def test_every_image_is_loaded(report: Opened, torch_run) -> None:  # type: ignore[no-untyped-def]
    images = report.page.eval_on_selector_all(
        "img:not(#lightbox img)", "els => els.map(e => ({alt: e.alt, complete: e.complete, width: e.naturalWidth, height: e.naturalHeight}))")
    html = (torch_run.out / "report.html").read_text()
    assert len(images) == html.count("<img ") - 1 and len(images) > 0  # every <img> but the empty lightbox
    broken = [i for i in images if not (i["complete"] and i["width"] > 0 and i["height"] > 0)]
    assert not broken, broken


def _visible(report: Opened) -> dict[str, list[bool]]:
    out: dict[str, list[bool]] = {}
    for el in report.page.locator("article.finding:not(.group)[data-severity], .verdict-item[data-severity]").all():  # a group holds several
        out.setdefault(el.get_attribute("data-severity"), []).append(el.is_visible())
    return out


def test_severity_filter_hides_the_findings_of_unticked_severities(report: Opened) -> None:
    page = report.page
    shown = _visible(report)
    assert len(shown) >= 2, f"the run needs findings of two severities at least to test the filter: {shown}"
    assert set(shown) <= set(SEVERITIES)
    assert all(all(v) for v in shown.values()), "every finding is shown before the filter is touched"
    offered = [s for s in SEVERITIES if s in shown]  # a box for each severity a finding has, none that filters nothing
    assert page.locator(".sev-filter").evaluate_all("els => els.map(e => e.value)") == offered

    def box(severity: str) -> Any:
        return page.locator(f".filter label:has(input.sev-filter[value='{severity}'])")

    for severity in shown:
        box(severity).click()  # what a reader does: click the label
        assert not page.locator(f".sev-filter[value='{severity}']").is_checked()
        now = _visible(report)
        assert now == {s: [s != severity] * len(v) for s, v in shown.items()}, (severity, now)
        box(severity).click()
        assert _visible(report) == shown, f"ticking {severity} again shows its findings again"

    for severity in offered:
        box(severity).click()
    assert not any(any(v) for v in _visible(report).values()), "nothing ticked, nothing shown"
    page.emulate_media(media="print")
    assert all(all(v) for v in _visible(report).values()), "a printed report shows every finding, whatever the filter"
    assert not page.locator(".filter").is_visible()
    page.emulate_media(media="screen")
    box("low").click()
    assert {s: any(v) for s, v in _visible(report).items()} == {s: s == "low" for s in shown}
    assert not report.errors, report.errors


def test_clicking_a_thumbnail_enlarges_it(report: Opened) -> None:
    page = report.page
    lightbox, big = page.locator("#lightbox"), page.locator("#lightbox img")
    thumbs = page.locator(".gallery img")
    assert thumbs.count() > 0, "the run has no sample thumbnails to enlarge"
    assert not lightbox.is_visible()
    for index in range(thumbs.count()):  # every thumbnail, in the findings and in the probe sections
        thumb = thumbs.nth(index)
        thumb.scroll_into_view_if_needed()
        small = thumb.bounding_box()
        thumb.click()
        assert lightbox.is_visible()
        assert big.get_attribute("src") == thumb.get_attribute("src")
        assert page.locator("#lightbox p").inner_text() == thumb.get_attribute("data-caption")
        box = big.bounding_box()
        assert box["width"] >= 3 * small["width"] and box["height"] >= 3 * small["height"], (small, box)
        assert big.evaluate("e => e.complete && e.naturalWidth > 0")
        centre = (box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        assert page.evaluate("([x, y]) => document.getElementById('lightbox').contains(document.elementFromPoint(x, y))", centre), \
            "the enlarged image is on top of the report"
        if index % 2 == 0:
            lightbox.click()  # a click anywhere closes it
        else:
            page.keyboard.press("Escape")
        assert not lightbox.is_visible()
    assert not report.errors, report.errors


def test_every_chart_enlarges_from_the_keyboard_too(report: Opened) -> None:
    page = report.page
    lightbox, big = page.locator("#lightbox"), page.locator("#lightbox img")
    charts = page.locator("figure.chart img")
    assert charts.count() >= 3, "the run has too few charts to test"
    for index in range(charts.count()):
        chart = charts.nth(index)
        chart.scroll_into_view_if_needed()
        small = chart.bounding_box()
        chart.focus()
        page.keyboard.press("Enter")
        assert lightbox.is_visible() and big.get_attribute("src") == chart.get_attribute("src")
        box = big.bounding_box()
        assert box["width"] > small["width"] or box["height"] > small["height"], (small, box)
        page.keyboard.press("Escape")
        assert not lightbox.is_visible()
        assert page.evaluate("e => document.activeElement === e", chart.element_handle()), "focus returns to the chart"
    assert not report.errors, report.errors


def test_every_pdf_page_has_ink_and_text(torch_run) -> None:  # type: ignore[no-untyped-def]
    import numpy as np
    import pypdfium2 as pdfium

    doc = pdfium.PdfDocument(torch_run.out / "report.pdf")
    try:
        assert len(doc) >= 3
        for number in range(len(doc)):
            page = doc[number]
            pixels = np.asarray(page.render(scale=0.5).to_pil().convert("L"))
            inked = float((pixels < 200).mean())
            text = page.get_textpage().get_text_range()
            assert inked > 0.002, f"page {number + 1} is blank: {inked:.2%} of its pixels are not white"
            assert len(text.split()) >= 5, f"page {number + 1} has no text: {text!r}"
    finally:
        doc.close()
