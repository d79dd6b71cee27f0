"""The report a board reads on paper: evidence in the state it failed in, every non-passing finding
in the summary, one cause told once, and nothing outside the page margins.

Runs on the demo's model and data (smoke profile): once with every probe (the session's demo run)
and once with only predictions and background swaps, the probes the evidence tests need.
"""

from __future__ import annotations

import html as html_lib
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from audit.findings import ATTENTION

MM = 72 / 25.4
MARGINS_MM = {"left": 16.0, "right": 16.0}  # templates/print.css @page
TOLERANCE_MM = 0.75  # half a border's width and rounding


@pytest.fixture(scope="module")
def lean(demo_audit):  # type: ignore[no-untyped-def]
    return demo_audit(["predictions", "background"], fail_on="high")


def finding(results: dict, rule: str, scope: str) -> dict:
    return next(f for f in results["findings"] if f["rule"] == rule and f["scope"] == scope)


def card_html(html: str, anchor_fragment: str) -> str:
    """The HTML of the finding article holding the element whose id starts with the fragment."""
    start = html.index(f'id="{anchor_fragment}')
    return html[html.rindex("<article", 0, start): html.index("</article>", start)]


def test_background_swap_evidence_shows_the_swapped_inputs_with_the_models_answers(lean) -> None:  # type: ignore[no-untyped-def]
    results = lean.results
    swap = finding(results, "background-swap-sensitivity", "class:wolf")
    assert swap["status"] == "fail" and len(swap["evidence"]) == 8
    states = results["probes"]["background"]["details"]["evidence_states"]
    table = pd.read_parquet(lean.out / "samples" / "background.parquet").set_index("id")
    classes = results["model"]["classes"]
    html = (lean.out / "report.html").read_text()
    card = html_lib.unescape(card_html(html, "finding-background-swap-sensitivity-class-wolf"))
    for sample_id in swap["evidence"][:4]:
        row = table.loc[sample_id]
        answer = classes[int(row["pred_mixed_rand"])]
        assert bool(row["flipped"]) and answer != "wolf"  # the evidence is a sample the swap flipped
        state = states[sample_id]
        assert state["predictions"]["mixed_rand"] == answer and state["predictions"]["original"] == "wolf"
        with np.load(lean.out / state["artifact"]) as bundle:
            original, swapped, mask = bundle["input"], bundle["variant_mixed_rand"], bundle["mask"].astype(bool)
        assert np.array_equal(original[mask], swapped[mask])  # the same object ...
        assert np.abs(original[~mask].astype(int) - swapped[~mask].astype(int)).mean() > 10  # ... on another background
        assert f'alt="sample {sample_id} in its failed state"' in card
        assert f"{sample_id}: wolf → wolf; other-class bg: {answer}" in card
    more = swap["evidence"][4:]
    assert f"And {len(more)} more: " in card and all(f">{i}<" in card for i in more)  # every id listed
    assert 'href="#gallery-wolf"' in card and 'id="gallery-wolf"' in html


def test_findings_of_one_cause_are_one_group_with_one_plain_words_paragraph(lean) -> None:  # type: ignore[no-untyped-def]
    html = (lean.out / "report.html").read_text()
    wolf = [f for f in lean.results["findings"] if f["metric"].startswith("background.") and f["scope"] == "class:wolf"
            and f["status"] in ATTENTION]
    assert len(wolf) >= 2
    group = card_html(html, "group-background-class-wolf")
    assert group.count("In plain words.") == 1
    for f in wolf:
        assert f'<span class="mono">{f["rule"]}</span>' in group
    assert re.search(r"value <span class=\"value\">\d+\.\d points</span>", group)  # a difference of accuracies, in points


def test_a_group_shows_samples_two_of_its_findings_share_once(demo_run) -> None:  # type: ignore[no-untyped-def]
    _, outcome = demo_run
    data = [f for f in outcome.results["findings"] if f["scope"] == "domain:data" and f["metric"].startswith("predictions.")
            and f["status"] in ATTENTION]
    assert len(data) >= 2 and data[0]["evidence"] == data[1]["evidence"]  # accuracy gap and calibration: the same worst samples
    group = card_html((outcome.out / "report.html").read_text(), "group-predictions-domain-data\"")
    assert group.count(f'alt="sample {data[0]["evidence"][0]}"') == 1
    assert "The worst samples are the same as for" in group


def summary_statuses(html: str) -> list[str]:
    start = html.index('<table class="summary-table">')
    return re.findall(r"<tr><td><span class=\"badge (\w+)\">", html[start: html.index("</table>", start)])


def test_the_summary_has_one_row_per_finding_that_is_not_a_pass(demo_run) -> None:  # type: ignore[no-untyped-def]
    import copy

    from audit.report.html import render_html
    from audit.report.viewmodel import build_view

    _, outcome = demo_run
    expected = [f["status"] for f in outcome.results["findings"] if f["status"] in ATTENTION]
    assert sorted(summary_statuses((outcome.out / "report.html").read_text())) == sorted(expected)
    results = copy.deepcopy(outcome.results)  # more findings than the ten the summary used to keep
    warn = next(f for f in results["findings"] if f["status"] == "warn")
    results["findings"] += [{**warn, "scope": f"domain:extra-{i}", "evidence": []} for i in range(12)]
    html = render_html(build_view(outcome.out, results, outcome.results_sha256))
    assert sorted(summary_statuses(html)) == sorted([*expected, *["warn"] * 12])


def page_boxes(path: Path) -> list[tuple[int, float, list[tuple[str, tuple[float, float, float, float]]]]]:
    """Per page: its width and the boxes of every text run, image, form and path on it."""
    import pypdfium2 as pdfium
    import pypdfium2.raw as pdfium_raw

    pdf = pdfium.PdfDocument(path)
    pages = []
    for number in range(len(pdf)):
        page = pdf[number]
        width, _ = page.get_size()
        text = page.get_textpage()
        boxes = [(text.get_text_bounded(*text.get_rect(k)), text.get_rect(k)) for k in range(text.count_rects())]
        for obj in page.get_objects(max_depth=4):
            if obj.type in (pdfium_raw.FPDF_PAGEOBJ_IMAGE, pdfium_raw.FPDF_PAGEOBJ_PATH):
                boxes.append(("<image>" if obj.type == pdfium_raw.FPDF_PAGEOBJ_IMAGE else "<path>", obj.get_bounds()))
        pages.append((number + 1, width, boxes))
    return pages


def test_no_pdf_page_has_text_or_images_outside_its_margins(demo_run) -> None:  # type: ignore[no-untyped-def]
    _, outcome = demo_run
    outside = []
    pages = page_boxes(outcome.out / "report.pdf")
    for number, width, boxes in pages:
        for what, (left, _, right, _) in boxes:
            if left < (MARGINS_MM["left"] - TOLERANCE_MM) * MM or right > width - (MARGINS_MM["right"] - TOLERANCE_MM) * MM:
                outside.append(f"page {number}: {what[:40]!r} at {left / MM:.1f}-{right / MM:.1f} mm")
    assert sum(len(b) for _, _, b in pages) > 1000 and any(w == "<image>" for _, _, b in pages for w, _ in b)
    assert not outside, "\n".join(outside[:20])


def test_the_margin_check_sees_a_table_that_runs_past_the_margin(tmp_path: Path) -> None:
    from audit.report.pdf import write_pdf
    from audit.resources import templates_dir

    css = (templates_dir() / "print.css").read_text()
    wide = "".join(f"<td style='white-space: nowrap'>column {i} with a long unbreakable value</td>" for i in range(6))
    write_pdf(tmp_path / "r.pdf", f"<html><head><style>{css}</style></head><body><table><tr>{wide}</tr></table></body></html>", tmp_path)
    (_, width, boxes), = page_boxes(tmp_path / "r.pdf")
    assert max(right for _, (_, _, right, _) in boxes) > width - MARGINS_MM["right"] * MM
