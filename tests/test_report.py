"""Reports: PDF text carries every finding, the HTML is self-contained and escaped, fetching is confined."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pypdf import PdfReader


def pdf_text(path: Path) -> str:
    return " ".join(" ".join(page.extract_text().split()) for page in PdfReader(path).pages)


def test_pdf_contains_each_finding_title(torch_run) -> None:  # type: ignore[no-untyped-def]
    text = pdf_text(torch_run.out / "report.pdf")
    titles = {f["title"] for f in torch_run.results["findings"]}
    assert len(titles) >= 4
    for title in titles:
        assert " ".join(title.split()) in text, title
    reader = PdfReader(torch_run.out / "report.pdf")
    assert f"page 1 of {len(reader.pages)}" in " ".join(reader.pages[0].extract_text().split())
    assert torch_run.results["run"]["verdict"] in text


def test_pdf_has_contents_with_page_numbers(torch_run) -> None:  # type: ignore[no-untyped-def]
    contents = " ".join(PdfReader(torch_run.out / "report.pdf").pages[1].extract_text().split())
    assert contents.startswith("Contents") or "Contents" in contents
    assert re.search(r"Findings\s*\.*\s*\d+", contents)


def test_html_is_self_contained(torch_run) -> None:  # type: ignore[no-untyped-def]
    html = (torch_run.out / "report.html").read_text()
    for attribute in re.findall(r'(?:src|href)="([^"]*)"', html):
        assert attribute.startswith(("#", "data:")), attribute
    assert "http://" not in html.replace("http://www.w3.org", "") and "https://" not in html
    assert len(html.encode()) < 10 * 1024 * 1024


def test_report_sections_in_order(torch_run) -> None:  # type: ignore[no-untyped-def]
    html = (torch_run.out / "report.html").read_text()
    positions = [html.index(f'id="{anchor}"') for anchor in ("cover", "summary", "findings", "probe-predictions", "appendix")]
    assert positions == sorted(positions)
    assert "Model capabilities" in html and "Skipped rows" in html


def test_fetcher_serves_only_the_run_folder(tmp_path: Path) -> None:
    from audit.report.pdf import RunFolderFetcher

    (tmp_path / "artifacts").mkdir()
    (tmp_path / "artifacts" / "a.png").write_bytes(b"x")
    fetcher = RunFolderFetcher(tmp_path)
    assert fetcher.fetch(f"file://{tmp_path}/artifacts/a.png").read() == b"x"
    assert fetcher.fetch("data:text/plain,hello") is not None
    for url in ("file:///etc/passwd", f"file://{tmp_path}/../outside.png", "https://example.org/x.png", "ftp://host/x"):
        with pytest.raises(ValueError):
            fetcher.fetch(url)


def test_pdf_with_hostile_image_reference_fetches_nothing(tmp_path: Path) -> None:
    from audit.report.pdf import write_pdf

    html = '<html><body><p>hello</p><img src="file:///etc/hostname"><img src="http://127.0.0.1:9/x.png"></body></html>'
    write_pdf(tmp_path / "r.pdf", html, tmp_path)
    assert "hello" in pdf_text(tmp_path / "r.pdf")


def test_a_schema_1_0_run_folder_still_renders(tmp_path: Path) -> None:
    """Runs written before the probe contract (schema 1.0) load and render with every section,
    the background gallery included (its captions fall back to the methods' full titles)."""
    import json
    import shutil

    from audit.api import render

    run = tmp_path / "old"
    shutil.copytree(Path(__file__).parent / "fixtures" / "run-schema-1.0", run)
    results = json.loads((run / "results.json").read_text())
    assert results["schema_version"] == "1.0"
    reports = render(run)
    html = reports["html"].read_text()
    for probe in results["probes"].values():
        assert probe["title"] in html
    galleries = results["probes"]["background"]["details"]["galleries"]
    assert any(galleries.values()) and html.count('alt="gallery ') == sum(len(v) for v in galleries.values())
    for f in results["findings"]:
        assert " ".join(f["title"].split()) in pdf_text(reports["pdf"])
    import xml.etree.ElementTree as ET

    from audit.findings import gates

    suites = ET.parse(run / "junit.xml").getroot()  # no saved gate: JUnit computes it from the findings and fail_on
    assert int(suites.get("failures")) + int(suites.get("errors")) == sum(gates(f, results["run"]["fail_on"]) for f in results["findings"])
    assert sum(len(suite.findall("testcase")) for suite in suites) == len(results["findings"])


def test_info_findings_are_listed_apart_and_change_no_verdict(torch_run, run_factory, dataset, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rule = tmp_path / "info.yaml"
    rule.write_text("schema: model-audit/rule/v1\nid: confidence-info\ntitle: Predicted shares, for the record\n"
                    "metric: predictions.predicted_share\naggregate: {per: [class, domain/class]}\n"
                    "message: '{scope}: {value:.0%} of the predictions'\nremedy: nothing to do\n")
    run = run_factory(["--model", f"{dataset.model_py}:build", "--weights", str(dataset.weights)], ["--rules", str(rule)])
    informed = [f for f in run.results["findings"] if f["rule"] == "confidence-info"]
    assert informed and {f["status"] for f in informed} == {"info"}
    assert {f["scope"].split(":")[0] for f in informed} == {"class", "domain"}
    assert run.results["run"]["verdict"] == torch_run.results["run"]["verdict"] and run.code == torch_run.code
    html = (run.out / "report.html").read_text()
    assert "For information (" in html and "Predicted shares, for the record" in html
