"""The bundled demo: a synthetic "husky vs wolf" data set with a planted shortcut, a small CNN
trained on it on the fly, its ONNX export, and an audit of that export.

In the training split wolves stand on snow and the other animals almost never do, while the
animals themselves differ only by a noisy silhouette (tail, legs, ears, snout; coat colours are
shared). A model trained on it learns "snow means wolf": huskies on snow become wolves and wolves
elsewhere are missed, which is what the audit has to find. The audit manifest draws backgrounds
independently of the class and has two domains: `sim` (the training generator) and `data` (the
same scenes through a sensor model: gain change, blur and noise). `correlated=False` builds the
control: backgrounds independent of the class in training too, on the same audit images.
Everything is seeded, so the same seed gives byte-identical files.
"""

from __future__ import annotations

import csv
import os
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import yaml
from PIL import Image
from scipy.ndimage import gaussian_filter
from torch import nn

if TYPE_CHECKING:
    from audit.api import RunOutcome

CLASSES: tuple[str, ...] = ("husky", "wolf", "fox")
BACKGROUNDS: tuple[str, ...] = ("snow", "grass", "forest", "sand")
SHORTCUT_CLASS = "wolf"
SHORTCUT_BACKGROUND = "snow"
IMAGE_SIZE = 48
MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
STD: tuple[float, float, float] = (0.5, 0.5, 0.5)
MANIFEST_COLUMNS = ("id", "path", "label", "mask", "domain", "background")

# Silhouette parameters per class, in units of the object's half-length, as (mean, sd). The
# spreads overlap on purpose: the object cue is learnable, but noisier than the background cue.
_SHAPES: dict[str, dict[str, tuple[float, float]]] = {
    "husky": {"leg": (0.30, 0.06), "ear": (0.20, 0.05), "snout": (0.16, 0.05)},
    "wolf": {"leg": (0.40, 0.06), "ear": (0.16, 0.05), "snout": (0.25, 0.05)},
    "fox": {"leg": (0.22, 0.06), "ear": (0.27, 0.05), "snout": (0.27, 0.05)},
}
# Tails: husky curled over the back, wolf hanging, fox bushy and level. A share of animals has
# another class's tail, so the silhouette is never a sure cue.
ATYPICAL_TAIL = 0.06

Point = tuple[float, float]
Coord = float | np.ndarray  # a constant, or one value per sample broadcast over the pixel grid


@dataclass(frozen=True)
class Split:
    """One part of the data set, exactly as written to disk (images as uint8 RGB)."""

    ids: list[str]
    images: np.ndarray  # N x H x W x 3 uint8
    masks: np.ndarray  # N x H x W bool, True on the object's pixels
    labels: np.ndarray  # N int64, index into CLASSES
    backgrounds: np.ndarray  # N int64, index into BACKGROUNDS
    domains: list[str]


@dataclass(frozen=True)
class DemoData:
    """A generated data set: where its files are, and its splits in memory."""

    root: Path
    classes: tuple[str, ...]
    backgrounds: tuple[str, ...]
    train: Split
    audit: Split
    train_manifest: Path
    audit_manifest: Path
    classes_file: Path
    correlated: bool
    shortcut_share: float
    others_share: float
    seed: int


@dataclass(frozen=True)
class Scenes:
    """Everything random about a batch of scenes, drawn up front so rendering is pure."""

    labels: np.ndarray
    backgrounds: np.ndarray
    tails: np.ndarray  # class whose tail the animal has
    centre: np.ndarray  # N x 2 (x, y) in pixels
    scale: np.ndarray  # N, half-length of the animal in pixels
    flip: np.ndarray  # N, +1 facing right, -1 facing left
    leg: np.ndarray
    ear: np.ndarray
    snout: np.ndarray
    coat: np.ndarray  # N x 3
    belly: np.ndarray  # N x 3
    texture_seed: int


def draw_scenes(rng: np.random.Generator, labels: np.ndarray, backgrounds: np.ndarray, size: int = IMAGE_SIZE) -> Scenes:
    """Random poses, silhouettes and coats for the given classes and backgrounds."""
    n = len(labels)
    shape = {key: np.empty(n) for key in ("leg", "ear", "snout")}
    for c, name in enumerate(CLASSES):
        chosen = labels == c
        for key, (mean, sd) in _SHAPES[name].items():
            shape[key][chosen] = rng.normal(mean, sd, chosen.sum())
    atypical = rng.random(n) < ATYPICAL_TAIL
    other = (labels + rng.integers(1, len(CLASSES), n)) % len(CLASSES)
    tails = np.where(atypical, other, labels)
    scale = rng.uniform(0.45, 0.55, n) * size
    centre = np.stack([rng.uniform(0.38, 0.62, n) * size, rng.uniform(0.42, 0.55, n) * size], axis=1)
    grey, brown = np.array([0.50, 0.50, 0.52]), np.array([0.52, 0.40, 0.28])
    mix = rng.random((n, 1))
    coat = np.clip((grey * (1 - mix) + brown * mix) * rng.uniform(0.55, 1.25, (n, 1)), 0.05, 0.8)
    belly = np.clip(coat * rng.uniform(1.15, 1.45, (n, 1)), 0.0, 0.85)
    return Scenes(
        labels=labels.astype(np.int64),
        backgrounds=backgrounds.astype(np.int64),
        tails=tails,
        centre=centre,
        scale=scale,
        flip=np.where(rng.random(n) < 0.5, -1.0, 1.0),
        leg=np.clip(shape["leg"], 0.08, 0.6),
        ear=np.clip(shape["ear"], 0.06, 0.4),
        snout=np.clip(shape["snout"], 0.05, 0.45),
        coat=coat,
        belly=belly,
        texture_seed=int(rng.integers(2**31)),
    )


def _ellipse(u: np.ndarray, v: np.ndarray, cu: Coord, cv: Coord, au: Coord, av: Coord) -> np.ndarray:
    return ((u - cu) / au) ** 2 + ((v - cv) / av) ** 2 <= 1.0


def _segment(u: np.ndarray, v: np.ndarray, a: Point, b: Point, width: float) -> np.ndarray:
    """Pixels within `width` of the segment a-b."""
    du, dv = b[0] - a[0], b[1] - a[1]
    t = np.clip(((u - a[0]) * du + (v - a[1]) * dv) / (du * du + dv * dv), 0.0, 1.0)
    return (u - a[0] - t * du) ** 2 + (v - a[1] - t * dv) ** 2 <= width * width


def _triangle(u: np.ndarray, v: np.ndarray, *corners: tuple[float, Coord]) -> np.ndarray:
    p0, p1, p2 = corners

    def side(a: tuple[float, Coord], b: tuple[float, Coord]) -> np.ndarray:
        return (b[0] - a[0]) * (v - a[1]) - (b[1] - a[1]) * (u - a[0])

    s0, s1, s2 = side(p0, p1), side(p1, p2), side(p2, p0)
    return ((s0 >= 0) & (s1 >= 0) & (s2 >= 0)) | ((s0 <= 0) & (s1 <= 0) & (s2 <= 0))


def paint_objects(scenes: Scenes, canvas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Paint the animals onto `canvas` (N x H x W x 3 float); returns the images and object masks.

    Every part is painted with hard edges, so a pixel is either the object's or the background's
    and the mask is exact. Coordinates are in units of the animal's half-length, facing right.
    """
    n, h, w, _ = canvas.shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    col = lambda a: a[:, None, None]  # noqa: E731 - per-sample value broadcast over the pixel grid
    u = col(scenes.flip) * (xs[None] - col(scenes.centre[:, 0])) / col(scenes.scale)
    v = (ys[None] - col(scenes.centre[:, 1])) / col(scenes.scale)
    leg, ear, snout = col(scenes.leg), col(scenes.ear), col(scenes.snout)

    body = _ellipse(u, v, -0.05, 0.0, 0.58, 0.24)
    belly = body & (v > 0.08)
    head = _ellipse(u, v, 0.58, -0.28, 0.2, 0.18)
    muzzle = _ellipse(u, v, 0.7 + snout / 2, -0.22, snout / 2 + 0.04, 0.075)
    ears = (_triangle(u, v, (0.46, -0.38), (0.62, -0.38), (0.5, -0.42 - ear))
            | _triangle(u, v, (0.6, -0.38), (0.74, -0.36), (0.68, -0.4 - ear)))
    legs = np.zeros_like(body)
    for x0 in (-0.45, -0.3, 0.25, 0.4):
        legs |= (np.abs(u - x0) <= 0.055) & (v >= 0.05) & (v <= 0.2 + leg)
    tail_kind = col(scenes.tails)
    curled = _ellipse(u, v, -0.66, -0.36, 0.26, 0.26) & ~_ellipse(u, v, -0.66, -0.36, 0.13, 0.13) & (u < -0.5)
    hanging = _segment(u, v, (-0.55, -0.08), (-0.8, 0.5), 0.08)
    bushy = _ellipse(u, v, -0.9, 0.02, 0.38, 0.14)
    tail = np.where(tail_kind == 0, curled, np.where(tail_kind == 1, hanging, bushy))
    eye = _ellipse(u, v, 0.63, -0.31, 0.045, 0.045)

    mask = body | head | muzzle | ears | legs | tail
    fur_rng = np.random.default_rng(scenes.texture_seed + 1)  # its own stream: the backgrounds draw from texture_seed
    fur = 1.0 + 0.12 * fur_rng.uniform(-1, 1, (n, h, w, 1))
    light = (belly | (muzzle & (v > -0.22)))[..., None]
    coat = np.where(light, scenes.belly[:, None, None, :], scenes.coat[:, None, None, :]) * fur
    out = np.where(mask[..., None], coat, canvas)
    out[eye] = 0.05
    return out, mask


def _smooth_noise(rng: np.random.Generator, n: int, size: int, cells: int) -> np.ndarray:
    """Value noise in [-1, 1]: a random cells x cells grid, bilinearly upsampled to size x size."""
    grid = rng.uniform(-1, 1, (n, cells + 1, cells + 1))
    pos = (np.arange(size) + 0.5) / size * cells
    i = np.minimum(pos.astype(int), cells - 1)
    f = pos - i
    rows = grid[:, i, :] * (1 - f)[None, :, None] + grid[:, i + 1, :] * f[None, :, None]
    return rows[:, :, i] * (1 - f)[None, None, :] + rows[:, :, i + 1] * f[None, None, :]


def paint_backgrounds(scenes: Scenes, size: int = IMAGE_SIZE) -> np.ndarray:
    """Textured backgrounds (N x H x W x 3 float32 in [0, 1]): snow, grass, forest, sand."""
    rng = np.random.default_rng(scenes.texture_seed)
    out = np.empty((len(scenes.labels), size, size, 3), np.float32)
    ys = (np.arange(size, dtype=np.float32) + 0.5)[None, :, None]
    xs = np.arange(size, dtype=np.float32)[None, None, :]
    for kind, name in enumerate(BACKGROUNDS):
        where = np.flatnonzero(scenes.backgrounds == kind)
        n = len(where)
        low = _smooth_noise(rng, n, size, 4)[..., None]
        fine = rng.uniform(-1, 1, (n, size, size, 1)).astype(np.float32)
        if name == "snow":
            texture = np.array([0.90, 0.93, 0.97]) + 0.04 * low + 0.02 * fine + 0.08 * (fine > 0.96)
        elif name == "grass":
            columns = rng.uniform(-1, 1, (n, 1, size, 1)).astype(np.float32)
            texture = np.array([0.30, 0.55, 0.20]) * (1 + 0.15 * low + 0.2 * columns * (0.5 + 0.5 * fine))
        elif name == "forest":
            trunks = np.sin(xs * rng.uniform(0.25, 0.45, (n, 1, 1)) + rng.uniform(0, 6.3, (n, 1, 1))) > 0.85
            leaves = np.array([0.14, 0.30, 0.16]) * (1 + 0.5 * low)
            texture = np.where(trunks[..., None], np.array([0.30, 0.20, 0.12]), leaves) + 0.03 * fine
        else:
            phase = rng.uniform(0, 6.3, (n, 1, 1)) + 2.0 * _smooth_noise(rng, n, size, 3)
            ripples = np.sin(ys * rng.uniform(0.6, 0.9, (n, 1, 1)) + phase)[..., None]
            texture = np.array([0.85, 0.74, 0.50]) * (1 + 0.06 * ripples + 0.05 * low) + 0.02 * fine
        out[where] = texture * rng.uniform(0.9, 1.1, (n, 1, 1, 1))
    return np.clip(out, 0.0, 1.0, out=out)


def sensor(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The `data` domain: the same scenes through another camera (float in, float out).

    A gain change (overall, and per channel: a cooler white balance), defocus blur and read
    noise; each is mild on its own, as is typical of a simulation-to-data gap.
    """
    gain = rng.uniform(0.88, 1.0, (images.shape[0], 1, 1, 1)) * np.array([0.86, 0.93, 1.0])
    blurred = gaussian_filter(images, sigma=(0, 0.8, 0.8, 0), mode="nearest")
    return np.clip(blurred * gain + rng.normal(0.0, 0.03, images.shape), 0.0, 1.0)


def _quantise(images: np.ndarray) -> np.ndarray:
    return np.round(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)


def render(scenes: Scenes, size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Scenes to float images in [0, 1] and their object masks."""
    return paint_objects(scenes, paint_backgrounds(scenes, size))


def _training_backgrounds(
    rng: np.random.Generator, labels: np.ndarray, correlated: bool, shortcut_share: float, others_share: float
) -> np.ndarray:
    """Exact counts per class, shuffled: the correlation is what the parameters say, not a sample of it."""
    snow = BACKGROUNDS.index(SHORTCUT_BACKGROUND)
    others = [b for b in range(len(BACKGROUNDS)) if b != snow]
    backgrounds = np.empty(len(labels), np.int64)
    for c, name in enumerate(CLASSES):
        where = np.flatnonzero(labels == c)
        if correlated:
            share = shortcut_share if name == SHORTCUT_CLASS else others_share
            on_snow = int(round(share * len(where)))
            values = np.concatenate([np.full(on_snow, snow), np.resize(others, len(where) - on_snow)])
        else:
            values = np.resize(np.arange(len(BACKGROUNDS)), len(where))
        backgrounds[where] = rng.permutation(values)
    return backgrounds


def _write_split(root: Path, folder: str, split: Split) -> list[dict[str, str]]:
    """Write a split's images and masks (threads: creating thousands of small files is I/O bound)."""
    (root / folder / "masks").mkdir(parents=True, exist_ok=True)
    rows = [{"id": sample_id, "path": f"{folder}/{sample_id}.png", "label": CLASSES[split.labels[i]],
             "mask": f"{folder}/masks/{sample_id}.png", "domain": split.domains[i],
             "background": BACKGROUNDS[split.backgrounds[i]]} for i, sample_id in enumerate(split.ids)]

    def write(i: int) -> None:
        Image.fromarray(split.images[i], "RGB").save(root / rows[i]["path"])
        Image.fromarray(split.masks[i].astype(np.uint8) * 255, "L").save(root / rows[i]["mask"])

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(write, range(len(rows))))
    return rows


def _write_csv(path: Path, rows: Sequence[dict[str, str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def generate_dataset(
    root: Path,
    seed: int = 0,
    correlated: bool = True,
    n_train: int = 2400,
    n_audit_per_domain: int = 240,
    shortcut_share: float = 0.95,
    others_share: float = 0.01,
    size: int = IMAGE_SIZE,
) -> DemoData:
    """Write train.csv, manifest.csv (the audit set), classes.txt, the images and their masks under `root`.

    Training: `n_train` images, classes balanced; with `correlated` a share `shortcut_share` of the
    wolves and `others_share` of the other animals stand on snow, else backgrounds are balanced
    per class. Audit, `sim`: more of the simulation the model was trained on, snow shortcut included
    (as a simulation reproduces its generator's habits). Audit, `data`: the measured world, where
    every class x background cell is equally common, seen through another sensor. A model that
    learned the shortcut does well on `sim` and fails on `data`; the counterfactual background swaps
    on `sim` expose it. The audit set depends only on the seed (not on `correlated` or `n_train`),
    and the control's training animals are the same as the correlated split's, only their
    backgrounds differ: the control isolates the shortcut.
    """
    root = Path(root)
    train_rng, sim_rng, data_rng, sensor_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(4))
    k, b = len(CLASSES), len(BACKGROUNDS)

    labels = train_rng.permutation(np.resize(np.arange(k), n_train))
    backgrounds = _training_backgrounds(train_rng, labels, correlated, shortcut_share, others_share)
    images, masks = render(draw_scenes(train_rng, labels, backgrounds, size), size)
    train = Split([f"train-{i:05d}" for i in range(n_train)], _quantise(images), masks, labels, backgrounds, ["sim"] * n_train)

    sim_labels = sim_rng.permutation(np.resize(np.arange(k), n_audit_per_domain))
    sim_backgrounds = _training_backgrounds(sim_rng, sim_labels, True, shortcut_share, others_share)
    cells = data_rng.permutation(np.resize(np.arange(k * b), n_audit_per_domain))
    parts = []
    for domain, rng, labels_, backgrounds_ in (("sim", sim_rng, sim_labels, sim_backgrounds),
                                                ("data", data_rng, cells // b, cells % b)):
        scenes = draw_scenes(rng, labels_, backgrounds_, size)
        images_, masks_ = render(scenes, size)
        if domain == "data":
            images_ = sensor(images_, sensor_rng)
        parts.append(Split([f"{domain}-{i:04d}" for i in range(n_audit_per_domain)], _quantise(images_), masks_,
                           scenes.labels, scenes.backgrounds, [domain] * n_audit_per_domain))
    audit = Split(
        ids=parts[0].ids + parts[1].ids,
        images=np.concatenate([p.images for p in parts]),
        masks=np.concatenate([p.masks for p in parts]),
        labels=np.concatenate([p.labels for p in parts]),
        backgrounds=np.concatenate([p.backgrounds for p in parts]),
        domains=parts[0].domains + parts[1].domains,
    )

    root.mkdir(parents=True, exist_ok=True)
    _write_csv(root / "train.csv", _write_split(root, "train", train))
    _write_csv(root / "manifest.csv", _write_split(root, "audit", audit))
    (root / "classes.txt").write_text("".join(f"{c}\n" for c in CLASSES), encoding="utf-8")
    return DemoData(root, CLASSES, BACKGROUNDS, train, audit, root / "train.csv", root / "manifest.csv",
                    root / "classes.txt", correlated, shortcut_share, others_share, seed)


class DemoCNN(nn.Module):
    """Three conv blocks, global max pooling, one linear layer.

    Activations are nn.ReLU modules (not in place) so guided backpropagation and deconvolution can
    hook them. Max rather than average pooling: it asks whether a part is present; with average
    pooling the model learned edge density instead, which even mild blur wiped out.
    """

    def __init__(self, num_classes: int = len(CLASSES), width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1), nn.BatchNorm2d(4 * width), nn.ReLU(),
        )
        self.pool = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))


def build_model() -> DemoCNN:
    """Factory for `--model audit.demo:build_model` (weights from `--weights weights.pt`)."""
    return DemoCNN()


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 N x H x W x 3 to the normalised float N x 3 x H x W the model was trained on."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (x - mean) / std


def train_model(data: DemoData, seed: int = 0, epochs: int = 8, batch_size: int = 64, lr: float = 3e-3) -> DemoCNN:
    """Train on the training split on the CPU; deterministic (seeded init, seeded batch order,
    deterministic kernels). No augmentation: the data already vary pose, size, coat and texture."""
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.utils.deterministic.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = False  # filling every new tensor costs a third of the time
    try:
        torch.manual_seed(seed)
        model = build_model()
        x = to_tensor(data.train.images)
        y = torch.from_numpy(data.train.labels)
        order = torch.Generator().manual_seed(seed)
        optimiser = torch.optim.Adam(model.parameters(), lr=lr)
        steps = epochs * ((len(x) + batch_size - 1) // batch_size)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=lr, total_steps=steps)
        loss_fn = nn.CrossEntropyLoss()
        model.train()
        for _ in range(epochs):
            for index in torch.randperm(len(x), generator=order).split(batch_size):
                optimiser.zero_grad(set_to_none=True)
                loss_fn(model(x[index]), y[index]).backward()
                optimiser.step()
                schedule.step()
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.utils.deterministic.fill_uninitialized_memory = previous[2]
    return model.eval()


def predict(model: nn.Module, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Predicted class indices for uint8 images, as the audit's preprocessing would feed them."""
    model.eval()
    with torch.inference_mode():
        return torch.cat([model(to_tensor(images[i : i + batch_size])).argmax(1) for i in range(0, len(images), batch_size)]).numpy()


def export_onnx(model: nn.Module, path: Path, input_size: tuple[int, int] = (IMAGE_SIZE, IMAGE_SIZE)) -> Path:
    """ONNX opset 17 with a free batch dimension; the legacy exporter, whose graphs onnx2torch converts."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(1, 3, *input_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model.eval(), (example,), str(path), dynamo=False, opset_version=17,
            input_names=["image"], output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
        )
    return path


def model_card(data: DemoData, seed: int) -> dict[str, str]:
    """What the report's cover says about the demo model, including the shortcut planted in it."""
    size = data.train.images.shape[1]
    if data.correlated:
        training = (f"{len(data.train.ids)} synthetic {size}x{size} images, classes balanced; "
                    f"{data.shortcut_share:.0%} of the {SHORTCUT_CLASS} images show {SHORTCUT_BACKGROUND}, "
                    f"{data.others_share:.0%} of the others do.")
        shortcut = (f"A shortcut is planted on purpose: in training {SHORTCUT_BACKGROUND} almost always means "
                    f"{SHORTCUT_CLASS}, so the model calls huskies and foxes on {SHORTCUT_BACKGROUND} wolves and "
                    f"misses wolves elsewhere. ")
    else:
        training = f"{len(data.train.ids)} synthetic {size}x{size} images, classes balanced, backgrounds independent of the class."
        shortcut = "Control model: no background is tied to a class in training. "
    return {
        "name": "husky-vs-wolf demo CNN",
        "version": f"seed {seed}",
        "owner": "model-audit demo",
        "intended_use": "Showing what model-audit finds; tells huskies, wolves and foxes apart in synthetic images. Not for real use.",
        "training_data": training,
        "limitations": shortcut + ("The audit set draws backgrounds independently of the class; its `sim` domain comes "
                                   "from the training generator, its `data` domain shows the same scenes through a "
                                   "sensor model (gain change, blur, noise) the model never saw."),
    }


def demo_inputs(out: Path) -> Path:
    """Where the demo's generated data and model go: beside the run folder, never inside it, since a
    run folder is replaced whole by the next run (audit.run_folder)."""
    out = Path(out)
    return out.parent / f"{out.name}-inputs"


def run_demo(out: Path, seed: int = 0, profile: str = "standard", quiet: bool = False) -> RunOutcome:
    """Generate the data, train, export to ONNX and audit the ONNX model into `out`.

    `<out>-inputs/data` holds the data set, `<out>-inputs/model` the state dict and the ONNX file,
    `<out>-inputs/audit.yaml` the config the audit runs from. The audit never fails the command
    (fail_on="never"): finding problems is the demo's point.
    """
    from audit.api import run_audit
    from audit.config import build_config, read_config_file

    out = Path(out)
    inputs = demo_inputs(out)
    say = (lambda text: None) if quiet else (lambda text: print(f"demo: {text}", flush=True))
    clock = time.perf_counter()
    data = generate_dataset(inputs / "data", seed=seed)
    say(f"generated {len(data.train.ids)} training and {len(data.audit.ids)} audit images in "
        f"{time.perf_counter() - clock:.1f}s ({data.root})")

    clock = time.perf_counter()
    model = train_model(data, seed=seed)
    say(f"trained the CNN in {time.perf_counter() - clock:.1f}s")
    (inputs / "model").mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), inputs / "model" / "weights.pt")
    onnx_path = export_onnx(model, inputs / "model" / "demo.onnx", tuple(data.audit.images.shape[1:3]))  # type: ignore[arg-type]

    clock = time.perf_counter()
    config_path = write_config(inputs, onnx_path, data, out, profile, seed)
    config = build_config(read_config_file(config_path), {"quiet": quiet}, source=str(config_path))
    outcome = run_audit(config)
    say(f"audited {onnx_path} in {time.perf_counter() - clock:.1f}s, as {config_path} says "
        f"(`model-audit run --config {config_path}` repeats it)")
    return outcome


def write_config(inputs: Path, model: Path, data: DemoData, out: Path, profile: str, seed: int) -> Path:
    """The audit.yaml the demo runs from, beside its data and model: what a user's own first audit
    looks like, preprocessing stated. Paths are relative to the file, so the folder can move."""
    def relative(path: Path) -> str:
        return os.path.relpath(Path(path).resolve(), inputs.resolve())

    values = {
        "model": relative(model),
        "manifest": relative(data.audit_manifest),
        "classes": relative(data.classes_file),
        "input_size": list(data.audit.images.shape[1:3]),
        "channels": 3,
        "mean": list(MEAN),  # the model was trained on (pixels - 0.5) / 0.5: without these it is audited at [0, 1]
        "std": list(STD),
        "profile": profile,
        "seed": seed,
        "out": relative(out),
        "fail_on": "never",  # finding problems is the demo's point; a real audit keeps the default, high
        "model_card": model_card(data, seed),
    }
    path = inputs / "audit.yaml"
    header = ("# Written by `model-audit demo`; `model-audit run --config audit.yaml` repeats its audit. The model was\n"
              "# trained on (pixels - 0.5) / 0.5: without mean and std it would be audited at [0, 1], and fail the\n"
              "# preprocessing-mismatch check.\n")
    body = yaml.safe_dump(values, sort_keys=False, allow_unicode=True, width=100, default_flow_style=None)
    path.write_text(header + body, encoding="utf-8")
    return path
