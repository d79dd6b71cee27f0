"""A realistic audit: a ResNet-18 on 224 x 224 images, each stage's time and memory against the passes it needs and a plain captum script.

The demo's small CNN on 64 x 64 images hides what a user's model costs; this runs `model-audit run`
on torchvision's ResNet-18 (random weights, seeded: nothing is downloaded) over generated
224 x 224 images with foreground masks, two domains and three classes. Each profile's audit runs in
a fresh subprocess, so its peak RSS (VmHWM) and wall time are its own; results.json gives each
stage's seconds and, where the audit records them, the images it pushed through the model
forward-only and forward+backward (else a hook on the model counts them), and its peak RSS after
each probe. The ideal of a stage is those counts times the per-image cost of each kind of pass at
its best batch size, measured here on the same model right before and right after the audit (the
lower kept, as benchmarks/attribution.py does). A plain captum script (Saliency, Integrated Gradients, Grad-CAM on the predicted class) on the
images the attribution probe explained, in its own subprocess, is the yardstick for that probe.

`--audit-root` puts another checkout's `audit` package first on the audit subprocess's PYTHONPATH,
so an older version is measured with the same data, model and yardsticks.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

CLASSES = ("disc", "square", "triangle")
SIZE = 224
MEAN = (0.485, 0.456, 0.406)  # ImageNet's, as torchvision's ResNets expect
STD = (0.229, 0.224, 0.225)
PROFILES = ("smoke", "standard")
COST_BATCHES = (16, 32, 64)
COST_TRIALS = 3
CAPTUM_BATCH = 32
FALLBACK_IG = {"smoke": (8, 64), "standard": (32, 64), "thorough": (64, 64)}  # (n_steps, internal batch) if audit cannot be read

MODEL_SOURCE = '''"""torchvision's ResNet-18 with three outputs; the benchmark gives its weights as a state dict."""

import torchvision


def build():
    return torchvision.models.resnet18(weights=None, num_classes=3)
'''


def _smooth_noise(rng: np.random.Generator, cells: int) -> np.ndarray:
    from PIL import Image

    grid = rng.random((cells, cells)).astype(np.float32)
    return np.clip(np.asarray(Image.fromarray(grid, mode="F").resize((SIZE, SIZE), Image.BICUBIC)), 0, 1)


def _triangle(u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    corners = [(0.0, -r), (0.866 * r, 0.5 * r), (-0.866 * r, 0.5 * r)]
    sides = [(bx - ax) * (v - ay) - (by - ay) * (u - ax) for (ax, ay), (bx, by) in zip(corners, corners[1:] + corners[:1])]
    return (sides[0] >= 0) & (sides[1] >= 0) & (sides[2] >= 0) | (sides[0] <= 0) & (sides[1] <= 0) & (sides[2] <= 0)


def draw(rng: np.random.Generator, label: int, domain: str) -> tuple[np.ndarray, np.ndarray]:
    """One image (uint8 H x W x 3) and its object mask: a shaded disc, square or triangle of its class's
    colour on a noise-and-stripes texture; the `data` domain sees it through another camera (colour
    cast, gamma, sensor noise)."""
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    angle, frequency, phase = rng.uniform(0, np.pi), rng.uniform(4, 14) / SIZE, rng.uniform(0, 2 * np.pi)
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * frequency * (x * np.cos(angle) + y * np.sin(angle)) + phase)
    texture = 0.6 * _smooth_noise(rng, int(rng.integers(4, 10))) + 0.4 * stripes
    first, second = rng.uniform(0.2, 0.8, 3), rng.uniform(0.2, 0.8, 3)
    image = first * (1 - texture[..., None]) + second * texture[..., None]

    cx, cy, r, turn = rng.uniform(64, SIZE - 64), rng.uniform(64, SIZE - 64), rng.uniform(28, 52), rng.uniform(0, 2 * np.pi)
    u = (x - cx) * np.cos(turn) + (y - cy) * np.sin(turn)
    v = -(x - cx) * np.sin(turn) + (y - cy) * np.cos(turn)
    mask = [u**2 + v**2 <= r**2, (np.abs(u) <= 0.85 * r) & (np.abs(v) <= 0.85 * r), _triangle(u, v, r)][label]
    colour = np.clip(np.array([(0.85, 0.2, 0.15), (0.2, 0.75, 0.25), (0.2, 0.3, 0.85)][label]) + rng.uniform(-0.08, 0.08, 3), 0, 1)
    shade = np.clip(1 - 0.15 * (u + v) / r, 0.6, 1.3)[..., None]
    image = np.where(mask[..., None], np.clip(colour * shade, 0, 1), image)
    if domain == "data":
        image = np.clip(image * np.array([1.1, 1.0, 0.85]), 0, 1) ** 0.8 + rng.normal(0, 0.04, image.shape)
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8), mask


def make_data(root: Path, n: int, seed: int = 0) -> Path:
    """Images, masks, manifest.csv (the demo's columns) and classes.txt under `root`; labels cycle
    through the classes and domains alternate, so every class has both domains."""
    from PIL import Image

    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label, domain, sample_id = i % len(CLASSES), ("sim", "data")[i % 2], f"img-{i:04d}"
        image, mask = draw(rng, label, domain)
        Image.fromarray(image, "RGB").save(root / "images" / f"{sample_id}.png")
        Image.fromarray(mask.astype(np.uint8) * 255, "L").save(root / "masks" / f"{sample_id}.png")
        rows.append({"id": sample_id, "path": f"images/{sample_id}.png", "label": CLASSES[label],
                     "mask": f"masks/{sample_id}.png", "domain": domain})
    with open(root / "manifest.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["id", "path", "label", "mask", "domain"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n", encoding="utf-8")
    return root / "manifest.csv"


def model_child() -> None:
    """Subprocess: model.py:build and its state dict in the folder argv[1]. The factory form keeps
    hooks (Grad-CAM, guided backprop), which a TorchScript file would lose."""
    import torch
    import torchvision

    root = Path(sys.argv[1])
    torch.manual_seed(0)
    (root / "model.py").write_text(MODEL_SOURCE, encoding="utf-8")
    torch.save(torchvision.models.resnet18(weights=None, num_classes=len(CLASSES)).state_dict(), root / "resnet18.pt")


def load_resnet(weights: Path, as_audited: bool = True) -> Any:
    """The benchmark's ResNet-18 in eval mode, parameters frozen. `as_audited` also runs its ReLUs out
    of place, as the torch adapter does; the plain captum script leaves them as torchvision makes them."""
    import torch
    import torchvision

    model = torchvision.models.resnet18(weights=None, num_classes=len(CLASSES))
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if as_audited:
        for m in model.modules():
            if isinstance(m, torch.nn.ReLU):
                m.inplace = False
    return model


def costs_child() -> None:
    """Subprocess: the pass costs of the model argv[1] into the JSON file argv[2], with the memory
    settings `model-audit run` uses."""
    from audit.execution.allocator import retain_freed_memory

    retain_freed_memory()
    Path(sys.argv[2]).write_text(json.dumps(measure_passes(Path(sys.argv[1]))), encoding="utf-8")


def measure_passes(weights: Path) -> dict[str, float]:
    """Seconds per image of a forward pass (inference mode) and of a forward+backward pass (gradient
    with respect to the input only, as every gradient method needs), each at its fastest batch size:
    the median of a few trials on fresh images (the best trial would flatter the ideal)."""
    import torch

    model = load_resnet(weights)

    def forward(x: torch.Tensor) -> None:
        with torch.inference_mode():
            model(x)

    def gradient(x: torch.Tensor) -> None:
        x.requires_grad_(True)
        torch.autograd.grad(model(x).sum(), x)

    from audit.models.onnx_forward import build_onnx_forward

    runtime, note = build_onnx_forward(model, np.random.default_rng(0).standard_normal((4, 3, SIZE, SIZE)).astype(np.float32), "cpu")
    if runtime is None:
        raise RuntimeError(f"the ResNet-18 has no onnxruntime form: {note}")

    def runtime_forward(x: torch.Tensor) -> None:
        runtime.forward(x.numpy())

    costs = {}
    for name, run in (("forward", forward), ("gradient", gradient), ("runtime_forward", runtime_forward)):
        run(torch.randn(COST_BATCHES[0], 3, SIZE, SIZE))
        per_batch = {}
        for batch in COST_BATCHES:
            timings = []
            for _ in range(COST_TRIALS):
                x = torch.randn(batch, 3, SIZE, SIZE)
                tick = time.perf_counter()
                run(x)
                timings.append(time.perf_counter() - tick)
            per_batch[batch] = float(np.median(timings)) / batch
        best = min(per_batch, key=per_batch.get)  # type: ignore[arg-type]
        costs[name], costs[f"{name}_batch"] = per_batch[best], best
    return costs


def peak_rss(pid: int | str = "self") -> int | None:
    """A process's peak RSS in bytes (VmHWM), None once it is gone. Not ru_maxrss: Linux starts a
    child's ru_maxrss at its parent's peak RSS when it execs (measured: a 9 MB child of a 1.9 GB
    parent reports 1.9 GB), and this benchmark's own process holds a few GB after measuring passes."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            return next((int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:")), None)
    except OSError:
        return None


def _load_self() -> str:
    """`python -c` code that loads this file by path, so a checkout on PYTHONPATH with its own
    `benchmarks` package (and no realistic.py) does not shadow it."""
    return (f"import importlib.util as u; s = u.spec_from_file_location('_realistic', {str(Path(__file__).resolve())!r}); "
            "m = u.module_from_spec(s); s.loader.exec_module(m); ")


def audit_child() -> None:
    """The audit subprocess: `model-audit run` with argv[2:], as the CLI runs it. It notes in the JSON
    file argv[1] its peak RSS after the shared pass, after each probe (older versions do not record
    it) and after rendering, how long rendering took, and the images each stage pushed through the
    model forward-only and with gradients (a hook on the model, for versions that do not count them)."""
    from audit.execution import allocator

    if hasattr(allocator, "advise_huge_pages"):  # a checkout from before it was dropped, run as its CLI ran it
        allocator.advise_huge_pages()
    import torch

    import audit
    import audit.api
    import audit.cli
    import audit.plan
    from audit.execution.local import LocalExecutor

    record: dict[str, Any] = {"audit": str(Path(audit.__file__).parent), "probes": {}, "passes": {}}
    images = [0, 0]  # forward-only, with gradients
    shared_pass, run_probe, render = LocalExecutor.shared_pass, LocalExecutor.run_probe, audit.api.render
    load = audit.plan.load_audited_model

    def count(_module, inputs):  # type: ignore[no-untyped-def]
        if torch.jit.is_tracing():  # the ONNX export of the forward runtime: not a pass, and int() would taint the trace
            return
        images[torch.is_grad_enabled()] += int(inputs[0].shape[0])

    def counted_load(*args, **kwargs):  # type: ignore[no-untyped-def]
        model, seconds = load(*args, **kwargs)
        if isinstance(getattr(model, "module", None), torch.nn.Module):
            model.module.register_forward_pre_hook(count)
        return model, seconds

    def noted_shared_pass(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        before = list(images)
        try:
            return shared_pass(self, *args, **kwargs)
        finally:
            record["shared_pass_peak"], record["passes"]["shared pass"] = peak_rss(), [b - a for a, b in zip(before, images)]

    def noted_run_probe(self, probe, *args, **kwargs):  # type: ignore[no-untyped-def]
        before = list(images)
        try:
            return run_probe(self, probe, *args, **kwargs)
        finally:
            record["probes"][probe.name], record["passes"][probe.name] = peak_rss(), [b - a for a, b in zip(before, images)]

    def timed_render(*args, **kwargs):  # type: ignore[no-untyped-def]
        tick = time.perf_counter()
        try:
            return render(*args, **kwargs)
        finally:
            record["render_seconds"], record["render_peak"] = time.perf_counter() - tick, peak_rss()

    audit.plan.load_audited_model = counted_load
    LocalExecutor.shared_pass, LocalExecutor.run_probe, audit.api.render = noted_shared_pass, noted_run_probe, timed_render  # type: ignore[method-assign]
    code = audit.cli.main(sys.argv[2:])
    record["peak"] = peak_rss()
    Path(sys.argv[1]).write_text(json.dumps(record), encoding="utf-8")
    sys.exit(code)


def captum_child() -> None:
    """The plain captum script, as a user would write it (no allocator tuning): the images of the
    JSON spec argv[1], preprocessed as the audit does (scaled to [0, 1], then mean/std), explained on
    the predicted class in batches; seconds and peak RSS go to the JSON file argv[2]."""
    import torch
    from captum.attr import IntegratedGradients, LayerGradCam, Saliency
    from PIL import Image

    spec = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
    model = load_resnet(Path(spec["weights"]), as_audited=False)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    saliency, ig, gradcam = Saliency(model), IntegratedGradients(model), LayerGradCam(model, model.layer4[-1].conv2)
    seconds = {"load": 0.0, "predict": 0.0, "saliency": 0.0, "integrated_gradients": 0.0, "gradcam": 0.0}
    start = time.perf_counter()
    for i in range(0, len(spec["paths"]), spec["batch"]):
        tick = time.perf_counter()
        images = np.stack([np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255 for p in spec["paths"][i : i + spec["batch"]]])
        x = (torch.from_numpy(images).permute(0, 3, 1, 2) - mean) / std
        seconds["load"] += time.perf_counter() - tick
        tick = time.perf_counter()
        with torch.no_grad():
            target = model(x).argmax(1)
        seconds["predict"] += time.perf_counter() - tick
        for name, run in (
            ("saliency", lambda: saliency.attribute(x, target=target)),
            ("integrated_gradients", lambda: ig.attribute(x, baselines=torch.zeros_like(x), target=target,
                                                          n_steps=spec["ig_steps"], internal_batch_size=spec["internal_batch_size"])),
            ("gradcam", lambda: gradcam.attribute(x, target=target)),
        ):
            tick = time.perf_counter()
            run()
            seconds[name] += time.perf_counter() - tick
    total = time.perf_counter() - start
    Path(sys.argv[2]).write_text(json.dumps({"seconds": total, "stages": seconds, "peak": peak_rss()}), encoding="utf-8")


def run_child(code: str, args: list[str], cwd: Path, log: Path, timeout: float,
              pythonpath: str | None = None) -> tuple[int | None, float, int]:
    """(exit code, or None past `timeout`; wall seconds; the child's peak RSS in bytes as last read
    while it ran, which the child's own final reading supersedes). Output goes to `log`."""
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([pythonpath, *filter(None, [env.get("PYTHONPATH")])])
    with open(log, "w", encoding="utf-8") as fh:
        tick = time.perf_counter()
        process = subprocess.Popen([sys.executable, "-c", _load_self() + code, *args], cwd=cwd, env=env,
                                   stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        code_seen: int | None = None
        peak = 0
        while True:
            peak = max(peak, peak_rss(process.pid) or 0)
            pid, status, _ = os.wait4(process.pid, os.WNOHANG)
            if pid:
                code_seen = os.waitstatus_to_exitcode(status)
                break
            if time.perf_counter() - tick > timeout:
                os.killpg(process.pid, signal.SIGTERM)  # the audit's SIGTERM handling leaves its run folder intact
                for _ in range(50):
                    pid, status, _ = os.wait4(process.pid, os.WNOHANG)
                    if pid:
                        break
                    time.sleep(0.2)
                else:
                    os.killpg(process.pid, signal.SIGKILL)
                    _, status, _ = os.wait4(process.pid, 0)
                break
            time.sleep(0.1)
        wall = time.perf_counter() - tick
    process.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
    return code_seen, wall, peak


def pass_costs(weights: Path, root: Path) -> dict[str, float]:
    """The pass costs, measured in a subprocess: this process stays small, since a child's ru_maxrss
    (results.json's peak_memory among them) starts at its parent's peak."""
    out = root / "costs.json"
    code, _, _ = run_child("m.costs_child()", [str(weights), str(out)], root, root / "costs.log", 3600)
    if code != 0:
        raise RuntimeError(f"measuring the pass costs failed; see {root / 'costs.log'}")
    costs = json.loads(out.read_text(encoding="utf-8"))
    print(f"  pass costs: forward {costs['forward'] * 1e3:.1f} ms per image (batch {costs['forward_batch']}), "
          f"forward+backward {costs['gradient'] * 1e3:.1f} ms per image (batch {costs['gradient_batch']}), "
          f"onnxruntime forward {costs['runtime_forward'] * 1e3:.1f} ms per image (batch {costs['runtime_forward_batch']})", flush=True)
    return costs


def attribution_settings(profile: str, results: dict[str, Any]) -> tuple[int, int]:
    """Integrated Gradients steps and internal batch the audited version used (the attribution
    probe's details in results.json), else the values profiles had when this benchmark was written."""
    details = results.get("probes", {}).get("attribution", {}).get("details") or {}
    steps, internal = FALLBACK_IG.get(profile, FALLBACK_IG["standard"])
    return int(details.get("ig_steps", steps)), int(details.get("internal_batch_size", internal))


def explained_paths(run: Path, manifest: Path, profile: str) -> list[str]:
    """The images the attribution probe explained (its table's ids), or, when the run left no table,
    the first `per_class` of each class, as many as the profile would take."""
    import pandas as pd

    rows = list(csv.DictReader(open(manifest, encoding="utf-8")))
    by_id = {row["id"]: str(manifest.parent / row["path"]) for row in rows}
    table = run / "samples" / "attribution.parquet"
    if table.is_file():
        return [by_id[i] for i in dict.fromkeys(pd.read_parquet(table, columns=["id"])["id"]) if i in by_id]
    per_class, most = {"smoke": (12, 48)}.get(profile, (64, 1024))
    chosen = [row for c in CLASSES for row in [r for r in rows if r["label"] == c][:per_class]]
    return [by_id[row["id"]] for row in chosen[:most]]


def _mib(value: float | None) -> str:
    return "" if value is None else f"{value / 2**20:,.0f} MiB"


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def stage_rows(results: dict[str, Any], noted: dict[str, Any], wall: float, peak: int | None,
               costs: dict[str, float]) -> tuple[list[list[str]], list[str]]:
    """Rows of stage, seconds, images forward / forward+backward, ideal seconds, ideal/actual, peak RSS
    so far; and notes. The counts are the audit's own (`cost` in results.json); where it records none
    they are the benchmark's hook counts, marked `*`; where both exist and differ, a note says so."""
    times = {**results.get("run", {}), **(results.get("times") or {})}
    in_runtime = any("run through onnxruntime" in note for note in results.get("model", {}).get("notes", []))  # forward-only checks
    hooked = noted.get("passes", {})
    rows: list[list[str]] = []
    notes: list[str] = []
    ideals: list[float | None] = []
    accounted = 0.0

    def add(stage: str, seconds: float, recorded: tuple[int, int] | None, counted: list[int] | None, memory: float | None) -> None:
        nonlocal accounted
        if recorded is not None and counted is not None and list(recorded) != list(counted):
            notes.append(f"{stage}: the audit records {recorded[0]} forward and {recorded[1]} forward+backward images, "
                         f"the hook on the model counted {counted[0]} and {counted[1]}")
        passes, mark = (recorded, "") if recorded is not None else (counted, "*") if counted is not None else (None, "")
        forward = costs["forward"] if stage == "shared forward pass" or not in_runtime else costs["runtime_forward"]
        ideal = None if passes is None else passes[0] * forward + passes[1] * costs["gradient"]
        ideals.append(ideal)
        accounted += seconds
        ratio = "n/a" if ideal is None or seconds <= 0 else "" if ideal == 0 else f"{ideal / seconds:.2f}"
        shown = ["n/a", "n/a"] if passes is None else [f"{passes[0]}{mark}", f"{passes[1]}{mark}"]
        rows.append([stage, f"{seconds:.2f}", *shown, _seconds(ideal), ratio, _mib(memory)])

    samples = int(results.get("manifest", {}).get("samples", 0))
    add("shared forward pass", float(times.get("forward_seconds", 0.0)), (samples, 0), hooked.get("shared pass"), noted.get("shared_pass_peak"))
    for name, probe in results.get("probes", {}).items():
        cost = probe.get("cost") or {}
        recorded = None if cost.get("forward_passes") is None or cost.get("gradient_passes") is None else (
            int(cost["forward_passes"]), int(cost["gradient_passes"]))
        stage = name if probe.get("status") == "ok" else f"{name} ({probe.get('status')})"
        memory = probe.get("peak_memory") or noted.get("probes", {}).get(name)
        if probe.get("peak_memory") and noted.get("probes", {}).get(name) and abs(probe["peak_memory"] - noted["probes"][name]) > 64 << 20:
            notes.append(f"{name}: results.json's peak_memory {_mib(probe['peak_memory'])}, the process's VmHWM {_mib(noted['probes'][name])}")
        add(stage, float(probe.get("seconds", 0.0)), recorded, hooked.get(name), memory)
    if noted.get("render_seconds") is not None:
        add("render", float(noted["render_seconds"]), (0, 0), None, noted.get("render_peak"))
    rows.append(["other (start-up, model load, decoding, rules, thumbnails)", f"{wall - accounted:.2f}", "", "", "", "", ""])
    total_ideal = None if any(i is None for i in ideals) else sum(i for i in ideals if i is not None)
    rows.append(["total (process wall, peak RSS)", f"{wall:.2f}", "", "", _seconds(total_ideal),
                 "n/a" if total_ideal is None else f"{total_ideal / wall:.2f}", _mib(peak)])
    if any(r[2].endswith("*") for r in rows):
        notes.append("* counted by the benchmark's hook on the model, where the audit records no counts: every image a "
                     "model call receives, split by whether gradients were enabled")
    return rows, notes


HEADER = ["stage", "seconds", "images fwd", "images fwd+bwd", "ideal s", "ideal/actual", "peak RSS so far"]


def print_table(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [HEADER, *rows]) for i in range(len(HEADER))]
    for row in [HEADER, *rows]:
        print("  " + "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))))


def print_markdown(rows: list[list[str]]) -> None:
    print("| " + " | ".join(HEADER) + " |")
    print("|" + "|".join(["---"] + ["---:"] * (len(HEADER) - 1)) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


TIME_BUDGET: list[str] = []  # `--time-budget D` for the audits, when the benchmark is asked for one


def audit_command(model: Path, weights: Path, manifest: Path, out: Path, profile: str) -> list[str]:
    return ["run", "--model", f"{model}:build", "--weights", str(weights), "--manifest", str(manifest),
            "--classes", str(manifest.parent / "classes.txt"), "--input-size", str(SIZE), str(SIZE),
            "--mean", *map(str, MEAN), "--std", *map(str, STD), "--profile", profile, "--device", "cpu",
            "--fail-on", "never", "--out", str(out), *TIME_BUDGET]


def measure(profile: str, root: Path, data: Path, model: Path, weights: Path, manifest: Path, costs_before: dict[str, float],
            audit_root: str | None, timeout: float) -> dict[str, float]:
    """One profile: the audit, the pass costs after it, the captum script; prints the tables and the
    ratios. Returns the costs measured after the audit (the next profile's 'before')."""
    run, noted_file, log = root / f"run-{profile}", root / f"audit-{profile}.json", root / f"audit-{profile}.log"
    noted_file.unlink(missing_ok=True)
    print(f"  running the {profile} audit (log: {log})", flush=True)
    code, wall, peak = run_child("m.audit_child()", [str(noted_file), *audit_command(model, weights, manifest, run, profile)],
                                 data, log, timeout, audit_root)
    costs_after = pass_costs(weights, root)
    costs = {k: min(costs_before[k], costs_after[k]) for k in ("forward", "gradient", "runtime_forward")}
    print(f"== realistic, profile {profile}")
    if code is None:
        print(f"  the audit did not finish within {timeout:.0f} s (peak RSS {_mib(peak)}); see {log}")
        return costs_after
    noted = json.loads(noted_file.read_text(encoding="utf-8")) if noted_file.is_file() else {}
    if code not in (0, 1) or not (run / "results.json").is_file():
        tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-5:]
        print(f"  the audit exited with {code} after {wall:.1f} s:\n    " + "\n    ".join(tail))
        return costs_after
    results = json.loads((run / "results.json").read_text(encoding="utf-8"))
    print(f"  audit package: {noted.get('audit', '?')}; {results['manifest']['samples']} images {SIZE} x {SIZE}, ResNet-18 "
          f"(random weights), exit code {code}; model load {results['run'].get('model_load_seconds', 0):.2f} s, "
          f"waiting for decoded batches {results['run'].get('load_seconds', 0):.2f} s")
    print(f"  ideal = images x per-image cost: forward {costs['forward'] * 1e3:.1f} ms (torch; onnxruntime {costs['runtime_forward'] * 1e3:.1f} ms, "
          f"the probes' forward-only checks' runtime where the audit's notes say they ran there), forward+backward "
          f"{costs['gradient'] * 1e3:.1f} ms (the lower of the measurements before and after the audit)")
    rows, notes = stage_rows(results, noted, wall, noted.get("peak") or peak, costs)
    print_table(rows)
    for line in notes:
        print(f"  {line}")
    print()
    print_markdown(rows)
    print()

    steps, internal = attribution_settings(profile, results)
    paths = explained_paths(run, manifest, profile)
    spec_file, captum_file, captum_log = root / f"captum-{profile}-spec.json", root / f"captum-{profile}.json", root / f"captum-{profile}.log"
    spec_file.write_text(json.dumps({"weights": str(weights), "paths": paths, "ig_steps": steps, "internal_batch_size": internal,
                                     "batch": CAPTUM_BATCH}), encoding="utf-8")
    captum_file.unlink(missing_ok=True)
    code, captum_wall, captum_peak = run_child("m.captum_child()", [str(spec_file), str(captum_file)], data, captum_log, timeout)
    if code != 0 or not captum_file.is_file():
        print(f"  the captum script {'did not finish within %.0f s' % timeout if code is None else f'exited with {code}'}; see {captum_log}")
        return costs_after
    captum = json.loads(captum_file.read_text(encoding="utf-8"))
    captum_peak = captum.get("peak") or captum_peak
    n = len(paths)
    captum_ideal = n * costs["forward"] + n * (2 + steps) * costs["gradient"]
    stages = ", ".join(f"{k} {v:.2f} s" for k, v in captum["stages"].items())
    print(f"  plain captum: Saliency, IntegratedGradients (n_steps {steps}, internal_batch_size {internal}), LayerGradCam on "
          f"layer4[-1].conv2; {n} images, batches of {CAPTUM_BATCH}, predicted class")
    print(f"    {captum['seconds']:.2f} s ({stages}); process {captum_wall:.2f} s; peak RSS {_mib(captum_peak)}; "
          f"ideal {captum_ideal:.2f} s ({n} fwd + {n * (2 + steps)} fwd+bwd), ideal/actual {captum_ideal / captum['seconds']:.2f}")
    probe = results["probes"].get("attribution", {})
    memory = probe.get("peak_memory") or noted.get("probes", {}).get("attribution") or noted.get("peak") or peak
    print(f"  attribution probe / captum: seconds {float(probe.get('seconds', 0.0)):.2f} / {captum['seconds']:.2f} = "
          f"{float(probe.get('seconds', 0.0)) / captum['seconds']:.1f}x; peak RSS {_mib(memory)} / {_mib(captum_peak)} = "
          f"{memory / captum_peak:.2f}x (audit: peak at the end of the attribution probe)")
    return costs_after


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.realistic", description=__doc__.splitlines()[0])
    parser.add_argument("--profiles", default=",".join(PROFILES), help="comma-separated audit profiles (default smoke,standard)")
    parser.add_argument("--images", type=int, default=150, help="generated images, cycling through 3 classes (default 150)")
    parser.add_argument("--out", type=Path, help="keep the data, run folders and logs here (default: a temporary folder)")
    parser.add_argument("--audit-root", help="a checkout whose audit package the audit subprocess imports (prepended to PYTHONPATH)")
    parser.add_argument("--time-budget", metavar="DURATION", help="run the audits with --time-budget DURATION (e.g. 10m)")
    parser.add_argument("--timeout", type=float, default=6 * 3600, help="seconds each subprocess may run (default 21600)")
    args = parser.parse_args([] if argv is None else argv)
    profiles = [p.strip() for p in args.profiles.split(",") if p.strip()]
    TIME_BUDGET[:] = ["--time-budget", args.time_budget] if args.time_budget else []

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out).resolve() if args.out else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        data = root / "data"
        tick = time.perf_counter()
        manifest = make_data(data, args.images)
        if run_child("m.model_child()", [str(data)], data, root / "model.log", 600)[0] != 0:
            raise RuntimeError(f"making the model failed; see {root / 'model.log'}")
        model, weights = data / "model.py", data / "resnet18.pt"
        print(f"  generated {args.images} images with masks and the ResNet-18 in {time.perf_counter() - tick:.1f} s ({data})", flush=True)
        costs = pass_costs(weights, root)
        audit_root = str(Path(args.audit_root).resolve()) if args.audit_root else None
        for profile in profiles:
            costs = measure(profile, root, data, model, weights, manifest, costs, audit_root, args.timeout)
        print(f"  this benchmark's own peak RSS: {_mib(peak_rss())} (a floor for its children's ru_maxrss)")


if __name__ == "__main__":
    main(sys.argv[1:])
