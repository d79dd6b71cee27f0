"""The embeddings probe: neighbours and metrics checked by hand and against scikit-learn, the
embedding streamed to the run store in chunks, and the planted-defect data set of tests/planted.py
(two classes the model cannot tell apart, 5% flipped labels among the others) audited through the
torch and the ONNX adapter, beside its clean control."""

from __future__ import annotations

import hashlib
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from audit.execution.local import MapArrayWriter
from audit.metrics.declarations import MetricSpec
from audit.metrics.neighbours import far_out, label_suspects, nearest, neighbour_label_counts, normalised, pair_agreement, silhouettes
from audit.probes.base import Consumes, Evidence, Probe, ProbeData, Taps
from audit.probes.registry import _REGISTRY, register
from audit.store import ArrayTable, RunStore
from tests.conftest import onnx_conversion_forbidden
from tests.planted import Planted, write_planted


def clustered(n: int = 400, f: int = 16, classes: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    centres = rng.normal(size=(classes, f)) * 3
    return (centres[labels] + rng.normal(size=(n, f))).astype(np.float32), labels


@pytest.fixture(params=["torch", "faiss"])
def exact_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each exact search: torch's blocks of top-k (cut into blocks of 7 rows of 120 here), faiss's flat index."""
    import audit.metrics.neighbours as module

    if request.param == "faiss":
        pytest.importorskip("faiss")
    else:
        monkeypatch.setattr(module, "ann_available", lambda: False)
        monkeypatch.setattr(module, "BLOCK_BYTES", 4 * 120 * 7)
    return str(request.param)


def test_exact_neighbours_are_scikit_learns_without_the_sample_itself(exact_backend: str) -> None:
    from sklearn.neighbors import NearestNeighbors

    x, _ = clustered(120)
    found = nearest(x, 10)
    distance, index = NearestNeighbors(n_neighbors=11, metric="cosine", algorithm="brute").fit(x.astype(np.float64)).kneighbors()
    assert found.method == "exact" and found.index.shape == (120, 10)
    assert not (found.index == np.arange(120)[:, None]).any()
    np.testing.assert_allclose(found.distance, distance[:, :10], atol=1e-5)
    assert (found.index == index[:, :10]).mean() > 0.99  # ties may order differently


def test_duplicates_never_count_a_sample_as_its_own_neighbour(exact_backend: str) -> None:
    x = np.repeat(np.eye(3, dtype=np.float32), 4, axis=0)  # every row has three exact copies
    found = nearest(x, 3)
    assert not (found.index == np.arange(12)[:, None]).any()
    assert (found.index // 4 == np.arange(12)[:, None] // 4).all()
    np.testing.assert_allclose(found.distance, 0, atol=1e-6)


def test_silhouettes_are_scikit_learns() -> None:
    """The linear-time cosine silhouette against scikit-learn's pairwise one, with a class of one
    sample (silhouette 0), an empty class and an all-zero row."""
    from sklearn.metrics import silhouette_samples

    x, labels = clustered(300, classes=4)
    labels = np.where(labels == 3, 4, labels)  # class 3 empty
    labels[0] = 5  # a class of one
    x[7] = 0.0
    unit = normalised(x)
    values = silhouettes(unit, labels, 6)
    np.testing.assert_allclose(values, silhouette_samples(unit, labels, metric="cosine"), atol=1e-5)
    assert values[0] == 0.0


def test_hnsw_finds_the_exact_neighbours() -> None:
    pytest.importorskip("faiss")
    x, _ = clustered(2000, 32, 8)
    exact, approximate = nearest(x, 10), nearest(x, 10, "hnsw")
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact.index, approximate.index, strict=True)])
    assert approximate.method == "hnsw" and recall > 0.95


def test_suspects_pairs_and_fence_by_hand() -> None:
    # Four samples, k = 5 neighbours each (indices into `labels`).
    labels = np.array([0, 0, 1, 2, 0, 1, 1, 2])
    index = np.array([[2, 5, 6, 1, 4], [0, 4, 2, 5, 7], [5, 6, 0, 1, 4], [0, 1, 4, 2, 7]])
    counts = neighbour_label_counts(index, labels, 3)
    np.testing.assert_array_equal(counts, [[2, 3, 0], [2, 2, 1], [3, 2, 0], [3, 1, 1]])
    own = np.array([0, 0, 1, 2])
    s = label_suspects(own, counts, predictions=np.array([1, 0, 0, 0]), confidence=np.array([0.9, 0.8, 0.7, 0.99]),
                       min_share=0.6, confused=set())
    # sample 0: 3 of 5 in class 1, predicted 1 -> suspect; 1: at most 2 of 5 in another class; 2: 3 of 5 in class 0, predicted 0
    # -> suspect; 3: 3 of 5 in class 0 and predicted 0 -> suspect with the highest confidence, so ranked first.
    np.testing.assert_array_equal(s.suspect, [True, False, True, True])
    np.testing.assert_array_equal(s.rank[[3, 0, 2]], [1, 2, 3])
    assert np.isnan(s.rank[1])
    mixed = label_suspects(own, counts, np.array([1, 0, 0, 0]), np.array([0.9, 0.8, 0.7, 0.99]), 0.6, {(0, 1)})
    np.testing.assert_array_equal(mixed.suspect, [False, False, False, True])  # 0 and 2 sit in the mixed pair
    np.testing.assert_array_equal(mixed.in_pair, [True, False, True, False])
    matrix = np.array([[6, 4], [2, 8]])
    assert pair_agreement(matrix, 0, 1) == pytest.approx(14 / 20)
    assert far_out(np.array([1.0, 2.0, 3.0, 4.0, 5.0])) == pytest.approx(4 + 3 * 2)


def test_stage_one_arrays_are_streamed_in_hashed_chunks(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    writer = MapArrayWriter(store, "embeddings", limit=3 * 4 * 4)  # a chunk once three 4-float rows are buffered
    rows = np.arange(28, dtype=np.float32).reshape(7, 4)
    for start in range(0, 7, 2):
        writer.add(ArrayTable(pd.DataFrame({"id": [f"s{i}" for i in range(start, min(start + 2, 7))]}), {"embedding": rows[start : start + 2]}))
    writer.finish()
    folder = tmp_path / "arrays" / "embeddings"
    chunks = sorted(folder.glob("*.npz"))
    assert len(chunks) == 2  # batches of two rows: 4 rows buffered, then the last 3
    with np.load(chunks[0]) as first:
        assert first["key:id"].tolist() == ["s0", "s1", "s2", "s3"]
    sums = dict(reversed(line.split()) for line in (folder / "SHA256SUMS").read_text().splitlines())
    assert sums == {c.name: hashlib.sha256(c.read_bytes()).hexdigest() for c in chunks}
    assert subprocess.run(["sha256sum", "--check", "--quiet", "SHA256SUMS"], cwd=folder).returncode == 0
    table = store.read_array("embeddings")
    assert table.keys["id"].tolist() == [f"s{i}" for i in range(7)]
    np.testing.assert_array_equal(table.values["embedding"], rows)


def _analysis(x: np.ndarray, labels: np.ndarray, **params: object):  # type: ignore[no-untyped-def]
    from audit.probes.embeddings import EmbeddingAnalysis, EmbeddingsParams

    classes = tuple(f"c{i}" for i in range(labels.max() + 1))
    probe = SimpleNamespace(params=EmbeddingsParams(**params), context=SimpleNamespace(seed=0, classes=classes))
    rows = pd.DataFrame({"id": [f"s{i:04d}" for i in range(len(x))], "label": labels, "pred": np.clip(labels, 0, None),
                         "confidence": 0.9, "domain": None})
    return EmbeddingAnalysis(probe, rows, x, Evidence()).run()  # type: ignore[arg-type]


def test_beyond_the_limits_a_stated_subset_is_searched_and_the_rest_placed(monkeypatch: pytest.MonkeyPatch) -> None:
    import audit.probes.embeddings as module

    monkeypatch.setattr(module, "ann_available", lambda: False)
    x, labels = clustered(300)
    evidence = _analysis(x, labels, exact_limit=100, tsne_limit=60)
    table = evidence.tables["embeddings_neighbours"]
    searched = table["kth_distance"].notna()
    assert searched.sum() == 100 and evidence.details["search"] == {"method": "exact", "samples": 100}
    assert table.loc[searched, "class"].value_counts().tolist() == [25, 25, 25, 25]  # stratified by class
    assert any("stratified subset of 100 samples" in n for n in evidence.notes)
    assert evidence.details["tsne"] == {"fitted": 60, "placed": 240, "input_dimensions": 16}
    assert np.isfinite(table[["tsne_x", "tsne_y"]].to_numpy()).all()
    assert evidence.metrics["embeddings.knn_agreement"] > 0.95


@dataclass
class PlantedRuns:
    data: Planted
    planted: Path
    clean: Path
    onnx: Path
    conversion_attempts: list[str]


def _audit(data: Planted, manifest: Path, model: list[str], out: Path, probes: list[str] | None = None) -> Path:
    from audit.api import run_audit
    from audit.config import build_config

    values = {"model": model[0], "manifest": str(manifest), "classes": data.classes_file.read_text().split(),
              "mean": [0.5] * 3, "std": [0.5] * 3, "probes": probes or ["predictions", "embeddings"], "profile": "smoke",
              "out": out, "quiet": True, "sample_images": True, **({"weights": model[1]} if len(model) > 1 else {})}
    run_audit(build_config({}, values))
    return out


@pytest.fixture(scope="module")
def planted_runs(tmp_path_factory: pytest.TempPathFactory) -> PlantedRuns:
    root = tmp_path_factory.mktemp("planted")
    data = write_planted(root / "data")
    torch_model = [f"{data.model_py}:build", str(data.weights)]
    with onnx_conversion_forbidden() as attempts:
        onnx = _audit(data, data.manifest, [str(data.onnx)], root / "onnx")
    return PlantedRuns(data, _audit(data, data.manifest, torch_model, root / "planted"),
                       _audit(data, data.clean_manifest, torch_model, root / "clean"), onnx, attempts)


def _results(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


def _finding(results: dict, rule: str, scope: str = "global") -> dict:
    return next(f for f in results["findings"] if f["rule"] == rule and f["scope"] == scope)


def test_the_confused_pair_is_the_top_pair_and_fails(planted_runs: PlantedRuns) -> None:
    for run in (planted_runs.planted, planted_runs.clean):
        results = _results(run)
        pairs = results["probes"]["embeddings"]["details"]["pairs"]
        assert (pairs[0]["a"], pairs[0]["b"]) == ("a0", "a1") and pairs[0]["mixed"]
        assert 0.4 < pairs[0]["agreement"] < 0.6 and all(p["agreement"] > 0.85 for p in pairs[1:])
        assert _finding(results, "embedding-class-overlap", "pair:a0->a1")["status"] == "fail"
        assert all(f["status"] != "fail" for f in results["findings"]
                   if f["rule"] == "embedding-class-overlap" and f["scope"] not in ("pair:a0->a1", "class:a0", "class:a1"))


def test_flipped_labels_are_found_with_precision(planted_runs: PlantedRuns) -> None:
    results = _results(planted_runs.planted)
    table = pd.read_parquet(planted_runs.planted / "samples" / "embeddings_neighbours.parquet")
    ranked = table[table["suspect_rank"].notna()].sort_values("suspect_rank")
    suspects, flipped = set(ranked["id"]), planted_runs.data.flipped
    assert len(suspects & flipped) >= 0.8 * len(flipped)
    assert len(suspects & flipped) >= 0.5 * len(suspects)
    assert not (ranked["label_name"].isin(["a0", "a1"]) & ranked["neighbour_class"].isin(["a0", "a1"])).any()
    finding = _finding(results, "label-noise-suspects")
    assert finding["status"] == "warn"
    assert finding["evidence"] == ranked["id"].tolist()  # every suspect, most suspicious first
    shares = ranked["neighbour_share"].to_numpy()
    assert (np.diff(shares) <= 1e-9).all()


def test_the_clean_control_has_few_suspects(planted_runs: PlantedRuns) -> None:
    results = _results(planted_runs.clean)
    assert results["metrics"]["embeddings.suspect_share"] <= 0.01
    assert _finding(results, "label-noise-suspects")["status"] == "pass"
    details = results["probes"]["embeddings"]["details"]
    assert details["suspects"]["in_mixed_pairs"] > 0  # a0/a1 samples among the other class: counted under the pair


def test_unlabelled_samples_get_neighbours_and_outliers_not_agreement(planted_runs: PlantedRuns) -> None:
    table = pd.read_parquet(planted_runs.planted / "samples" / "embeddings_neighbours.parquet")
    unlabelled = table["id"].str.startswith("u")
    assert unlabelled.sum() == 30
    assert table.loc[unlabelled, "agreement"].isna().all() and table.loc[unlabelled, "suspect_rank"].isna().all()
    assert table.loc[unlabelled, "kth_distance"].notna().all()
    assert table["neighbours"].map(len).eq(10).all()
    results = _results(planted_runs.planted)
    assert results["metrics"]["embeddings.n"] == 630 and results["metrics"]["embeddings.knn_agreement:n"] == 600


def test_onnx_embeddings_equal_torch_through_the_tap(planted_runs: PlantedRuns) -> None:
    assert planted_runs.conversion_attempts == ["convert_to_torch"]
    from_torch = RunStore(planted_runs.planted).read_array("embeddings")
    from_onnx = RunStore(planted_runs.onnx).read_array("embeddings")
    assert from_torch.values["embedding"].dtype == np.float32 and from_torch.values["embedding"].shape == (630, 11)
    assert from_torch.keys["id"].tolist() == from_onnx.keys["id"].tolist()
    np.testing.assert_allclose(from_onnx.values["embedding"], from_torch.values["embedding"], atol=1e-4, rtol=0)
    results = _results(planted_runs.onnx)
    assert results["probes"]["embeddings"]["arrays"] == {"embeddings": "arrays/embeddings"}
    assert results["probes"]["embeddings"]["status"] == "ok"


def test_the_section_draws_maps_pairs_galleries_and_suspects(planted_runs: PlantedRuns) -> None:
    html = (planted_runs.planted / "report.html").read_text()
    section = html[html.index("Embedding clusters"):]
    for text in ("t-SNE, by class", "PCA, right and wrong", "Most overlapping class pairs", "Nearest neighbours of the worst-agreeing samples",
                 "Label-noise suspects", "a0 / a1"):
        assert text in section
    assert "by domain" not in section  # one domain: no domain colouring
    outliers = _results(planted_runs.planted)["probes"]["embeddings"]["details"]["outliers"]
    assert section.count('class="gallery neighbours"') == 8 + len(outliers)  # the worst-agreeing samples, then the outliers


class EmbeddingReader(Probe):
    """A later probe (domain shift, regression comparison) as the contract serves it: it declares
    the embeddings table and reads the stored array in its reduce, never the embeddings probe."""

    name = "embedding_reader"
    title = "Reads the stored embeddings"
    question = "Can a later probe read the embeddings?"
    consumes = (Consumes("embeddings"),)
    metrics = (MetricSpec("embedding_reader.rows", ("global",), "count", "embedding rows read"),)

    def map(self, batch, taps: Taps) -> pd.DataFrame:  # type: ignore[no-untyped-def]
        return pd.DataFrame({"id": batch.ids})

    def reduce(self, data: ProbeData) -> Evidence:
        stored = data.inputs.array("embeddings")
        assert stored is not None
        evidence = Evidence()
        evidence.add("embedding_reader.rows", len(stored))
        evidence.details = {"ids": stored.keys["id"].astype(str).tolist(), "sum": float(stored.values["embedding"].astype(np.float64).sum())}
        return evidence


def test_a_later_probe_reads_the_stored_embeddings_through_the_contract(planted_runs: PlantedRuns, tmp_path: Path) -> None:
    register(EmbeddingReader)
    try:
        data = planted_runs.data
        run = _audit(data, data.manifest, [f"{data.model_py}:build", str(data.weights)], tmp_path / "reader",
                     probes=["embeddings", "embedding_reader"])
    finally:
        _REGISTRY.pop(EmbeddingReader.name)
    probe = _results(run)["probes"]["embedding_reader"]
    assert probe["status"] == "ok", probe
    stored = RunStore(planted_runs.planted).read_array("embeddings")
    assert probe["details"]["ids"] == stored.keys["id"].tolist()
    assert probe["details"]["sum"] == pytest.approx(float(stored.values["embedding"].astype(np.float64).sum()), rel=1e-6)
    assert _results(run)["metrics"]["embedding_reader.rows"] == 630
