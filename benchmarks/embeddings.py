"""The embeddings probe at 2k, 20k and 50k samples: its time and memory against the shared forward pass it rides on.

A small CNN (random weights, seeded; a 128-wide embedding before its Linear head) audits generated
16 x 16 images of ten classes, each a class template plus noise, so the embedding has clusters (the
last two templates are close: a pair the model mixes). The images are written once for the largest
size; each size reads the first n rows. Each audit (`probes: ["embeddings"]`, smoke profile) runs in
a fresh subprocess, so its peak RSS (VmHWM) is its own; results.json gives the forward pass and the
probe's seconds and peak memory. After the audit the same subprocess loads the stored embedding and
times the reduce's stages on it alone, with the probe's subset logic: one exact kNN search (when
every sample is labelled the probe's neighbours and agreement share it; with faiss and without), the
silhouette, PCA and t-SNE; from `--hnsw-from` samples on, the HNSW search and its recall@10 against the exact one.
Time per sample at each size relative to the smallest shows which stages grow faster than linearly.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np

SIZES = (2000, 20_000, 50_000)
CLASSES = [f"c{k}" for k in range(10)]
SIZE = 16
CHUNK = 2500  # images one generating worker writes
K = 10
HNSW_FROM = 50_000  # sizes from which the HNSW search and its recall are measured too
REPO = Path(__file__).resolve().parents[1]

MODEL_SOURCE = textwrap.dedent(
    '''
    import torch
    from torch import nn


    class SmallNet(nn.Module):
        """Two conv blocks, a 128-wide embedding, a Linear head over ten classes (random weights, seed 0)."""

        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                nn.Linear(64 * 4 * 4, 128), nn.ReLU(),
            )
            self.fc = nn.Linear(128, 10)

        def forward(self, x):
            return self.fc(self.features(x))


    def build():
        torch.manual_seed(0)
        return SmallNet()
    '''
)


def templates() -> np.ndarray:
    """Ten 16 x 16 RGB class templates in [0, 1]: 4 x 4 random blocks; the last is 70 % the one before."""
    rng = np.random.default_rng(100)
    coarse = rng.random((len(CLASSES), 4, 4, 3))
    coarse[-1] = 0.7 * coarse[-2] + 0.3 * coarse[-1]
    return np.kron(coarse, np.ones((1, SIZE // 4, SIZE // 4, 1)))


def write_images(task: tuple[Path, int, int]) -> None:
    """Images start .. stop - 1 of the data set (label i % 10), one seed per chunk."""
    from PIL import Image

    folder, start, stop = task
    rng = np.random.default_rng(start)
    base = templates()
    for i in range(start, stop):
        image = 0.6 * base[i % len(CLASSES)] + 0.4 * rng.random((SIZE, SIZE, 3))
        Image.fromarray((image * 255).astype(np.uint8)).save(folder / f"{i:05d}.png")


def make_data(root: Path, sizes: list[int]) -> dict[int, Path]:
    """The images for the largest size (kept when `root` already has them), one manifest per size, and model.py."""
    folder = root / "img"
    folder.mkdir(parents=True, exist_ok=True)
    largest = max(sizes)
    stamp = root / "images.txt"
    if not stamp.is_file() or int(stamp.read_text()) < largest:
        tick = time.perf_counter()
        tasks = [(folder, start, min(start + CHUNK, largest)) for start in range(0, largest, CHUNK)]
        with multiprocessing.Pool() as pool:
            pool.map(write_images, tasks)
        stamp.write_text(str(largest))
        print(f"  wrote {largest} images of {SIZE} x {SIZE} in {time.perf_counter() - tick:.1f} s ({folder})", flush=True)
    rows = [f"s{i:05d},img/{i:05d}.png,{CLASSES[i % len(CLASSES)]}" for i in range(largest)]
    manifests = {}
    for n in sizes:
        manifests[n] = root / f"manifest-{n}.csv"
        manifests[n].write_text("\n".join(["id,path,label", *rows[:n]]) + "\n")
    (root / "model.py").write_text(MODEL_SOURCE)
    return manifests


def peak_rss() -> int:
    """This process's peak RSS in bytes (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def timed(function: Any, *args: Any) -> tuple[Any, float]:
    """(value, seconds) of one call."""
    tick = time.perf_counter()
    value = function(*args)
    return value, time.perf_counter() - tick


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean share of each row's exact k nearest neighbours that `found` has too."""
    return float((found[:, :, None] == exact[:, None, :]).any(axis=2).mean())


def stage_seconds(run: Path, seed: int, hnsw: bool) -> dict[str, float]:
    """The reduce's costly stages, timed on the stored embedding with the probe's subset logic."""
    from audit.metrics.neighbours import nearest, normalised, silhouettes
    from audit.metrics.projection import TSNE_LIMIT, pca, tsne
    from audit.probes.sampling import detail_sample
    from audit.store import RunStore

    store = RunStore(run)
    unit = normalised(store.read_array("embeddings").values["embedding"])  # type: ignore[union-attr]
    table = store.read_table("embeddings_neighbours")[["id", "class"]].assign(_row=np.arange(len(unit)))  # type: ignore[index]
    labels = table["class"].map({name: k for k, name in enumerate(CLASSES)}).to_numpy(np.int64)
    n = len(unit)

    def subset(limit: int) -> np.ndarray | None:
        return None if n <= limit else np.sort(detail_sample(table, limit, limit, seed)["_row"].to_numpy())

    import audit.metrics.neighbours as neighbours

    out: dict[str, float] = {}
    exact, out["knn"] = timed(nearest, unit, K)
    with_faiss = neighbours.ann_available
    neighbours.ann_available = lambda: False  # the same exact search without faiss: torch's blocks of top-k
    try:
        _, out["knn_torch"] = timed(nearest, unit, K)
    finally:
        neighbours.ann_available = with_faiss
    _, out["silhouette"] = timed(silhouettes, unit, labels, len(CLASSES))
    projected, out["pca"] = timed(pca, unit, seed)
    _, out["tsne"] = timed(tsne, projected.reduced, seed, subset(TSNE_LIMIT))
    if hnsw:
        found, out["hnsw"] = timed(nearest, unit, K, "hnsw")
        out["hnsw_recall"] = recall(found.index, exact.index)
    return out


def audit_child(manifest: str, run: str, measured: str, hnsw: str) -> None:
    """The subprocess: one audit with the embeddings probe only, then its stages timed alone; writes `measured` (JSON)."""
    from audit.api import run_audit
    from audit.config import build_config

    data = Path(manifest).parent
    values = {"model": f"{data / 'model.py'}:build", "manifest": manifest, "classes": CLASSES, "mean": [0.5] * 3, "std": [0.25] * 3,
              "probes": ["embeddings"], "profile": "smoke", "out": Path(run), "quiet": True}
    tick = time.perf_counter()
    outcome = run_audit(build_config({}, values))
    whole = time.perf_counter() - tick
    results = outcome.results
    probe = results["probes"]["embeddings"]
    if probe["status"] != "ok":
        raise RuntimeError(f"the embeddings probe did not run: {probe.get('error') or probe.get('reason')}")
    record = {"whole": whole, "run": results["run"]["seconds"], "forward": results["run"]["forward_seconds"],
              "load": results["run"]["load_seconds"], "probe": probe["seconds"], "probe_peak": probe["peak_memory"],
              "audit_peak": peak_rss(), "search": probe["details"].get("search"), "tsne_details": probe["details"].get("tsne")}
    record.update(stage_seconds(outcome.out, results["config"].get("seed", 0), hnsw == "1"))
    Path(measured).write_text(json.dumps(record), encoding="utf-8")


def measure(n: int, manifest: Path, root: Path, hnsw: bool) -> dict[str, Any]:
    """One size, in a fresh subprocess (its output in root/audit-<n>.log)."""
    measured = root / f"measured-{n}.json"
    code = "import sys; from benchmarks.embeddings import audit_child; audit_child(*sys.argv[1:])"
    args = [str(manifest), str(root / f"run-{n}"), str(measured), "1" if hnsw else "0"]
    log = root / f"audit-{n}.log"
    with open(log, "w", encoding="utf-8") as fh:
        done = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the audit of {n} samples failed (exit {done.returncode}); see {log}")
    return {"n": n, **json.loads(measured.read_text(encoding="utf-8"))}


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  " + "  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)))


def report(results: list[dict[str, Any]]) -> None:
    """The seconds table, the HNSW rows, and the per-sample growth against the smallest size."""
    header = ["n", "forward s", "probe s", "probe/fwd", "kNN s", "kNN torch s", "silh. s", "PCA s", "t-SNE s", "probe-tSNE s",
              "(p-tSNE)/fwd", "probe peak MiB", "audit peak MiB", "run s", "whole s"]
    rows = []
    for r in results:
        without = r["probe"] - r["tsne"]
        rows.append([str(r["n"]), f"{r['forward']:.2f}", f"{r['probe']:.2f}", f"{r['probe'] / r['forward']:.2f}",
                     f"{r['knn']:.2f}", f"{r['knn_torch']:.2f}", f"{r['silhouette']:.2f}", f"{r['pca']:.2f}", f"{r['tsne']:.2f}", f"{without:.2f}",
                     f"{without / r['forward']:.2f}", f"{r['probe_peak'] / 2**20:.0f}", f"{r['audit_peak'] / 2**20:.0f}",
                     f"{r['run']:.2f}", f"{r['whole']:.2f}"])
    print_table(header, rows)
    print("  probe s: map + reduce of the probe in the audit; kNN, silh., PCA, t-SNE: one run of each stage alone on the stored "
          "embedding (kNN: the probe's exact search, faiss's flat index when faiss-cpu is installed; kNN torch: the search "
          "without it); run s: results.json's run.seconds (no rendering); whole s: run_audit including the reports")
    for r in results:
        print(f"  {r['n']}: probe search {r['search']}, t-SNE {r['tsne_details']}")
        if "hnsw" in r:
            print(f"  {r['n']}: HNSW kNN {r['hnsw']:.2f} s against exact {r['knn']:.2f} s, recall@{K} {r['hnsw_recall']:.4f}")
    if len(results) < 2:
        return
    first = results[0]

    def per_sample(r: dict[str, Any], value: float, base: float) -> str:
        return f"{(value / r['n']) / (base / first['n']):.2f}"

    keys = [("forward", "forward"), ("probe", "probe"), ("knn", "kNN"), ("knn_torch", "kNN torch"), ("silhouette", "silh."), ("pca", "PCA"),
            ("tsne", "t-SNE")]
    growth = []
    for r in results[1:]:
        growth.append([f"{r['n']} / {first['n']}", *(per_sample(r, r[key], first[key]) for key, _ in keys),
                       per_sample(r, r["probe"] - r["tsne"], first["probe"] - first["tsne"]),
                       f"{r['probe_peak'] / first['probe_peak']:.2f}"])
    print(f"  time per sample relative to {first['n']} samples (1.00 = linear growth); memory: plain ratio")
    print_table(["sizes", *(name for _, name in keys), "probe-tSNE", "probe peak"], growth)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.embeddings", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(str(n) for n in SIZES), help="comma-separated sample counts (default 2000,20000,50000)")
    parser.add_argument("--out", type=Path, help="keep the data, run folders and logs here (default: a temporary folder)")
    parser.add_argument("--hnsw-from", type=int, default=HNSW_FROM, help=f"sizes from which HNSW is timed too (default {HNSW_FROM})")
    args = parser.parse_args([] if argv is None else argv)
    sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})

    with tempfile.TemporaryDirectory() as tmp:
        root = args.out.resolve() if args.out else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        manifests = make_data(root / "data", sizes)
        results = []
        for n in sizes:
            tick = time.perf_counter()
            results.append(measure(n, manifests[n], root, n >= args.hnsw_from))
            print(f"  audited {n} samples in {time.perf_counter() - tick:.1f} s", flush=True)
        report(results)


if __name__ == "__main__":
    main(sys.argv[1:])
