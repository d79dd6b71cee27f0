"""A data set with planted defects for the embeddings probe, and a hand-set model that sees it.

Six classes of 16 x 16 noise images, each class carrying its own faint +-1 pattern. Classes `a0`
and `a1` carry the same pattern: nothing in the images tells them apart, and the model guesses
between them. Among the four other classes a share of the labels is flipped to another of those
four (the images stay their true class). A few more samples have no label. The model is a linear layer matching the patterns
(embedding: one template response per pattern plus a few random directions, through a ReLU) and a
head that names the class of the strongest response; its right answers are known by construction.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ["a0", "a1", "b", "c", "d", "e"]
SIZE = 16
PATTERNS = 5  # a0 and a1 share pattern 0; b..e have patterns 1..4
SPREAD = 6  # random directions in the embedding besides the template responses

MODEL_SOURCE = textwrap.dedent(
    '''
    from torch import nn


    class PlantedNet(nn.Module):
        def __init__(self, features=11, classes=6):
            super().__init__()
            self.features = nn.Linear(3 * 16 * 16, features)
            self.relu = nn.ReLU()
            self.head = nn.Linear(features, classes)

        def forward(self, x):
            return self.head(self.relu(self.features(x.flatten(1))))


    def build():
        return PlantedNet()
    '''
)


@dataclass
class Planted:
    root: Path
    manifest: Path  # labels with the planted flips
    clean_manifest: Path  # the same images with their true labels
    classes_file: Path
    model_py: Path
    weights: Path
    onnx: Path
    flipped: set[str]  # ids whose label in `manifest` is wrong


def _weights(rng: np.random.Generator, templates: np.ndarray) -> dict[str, np.ndarray]:
    unit = templates / np.linalg.norm(templates, axis=1, keepdims=True)
    spread = rng.normal(size=(SPREAD, unit.shape[1]))
    spread /= np.linalg.norm(spread, axis=1, keepdims=True)
    w1 = np.concatenate([unit, spread]).astype(np.float32)
    b1 = np.concatenate([np.zeros(PATTERNS), np.ones(SPREAD)]).astype(np.float32)
    w2 = np.zeros((len(CLASSES), PATTERNS + SPREAD), np.float32)
    w2[0, 0] = w2[1, 0] = 10.0
    w2[0, PATTERNS] = 3.0  # a0 and a1 differ only by two random directions: a coin toss between them
    w2[1, PATTERNS + 1] = 3.0
    for c in range(2, len(CLASSES)):
        w2[c, c - 1] = 10.0
    return {"features.weight": w1, "features.bias": b1, "head.weight": w2, "head.bias": np.zeros(len(CLASSES), np.float32)}


def write_planted(root: Path, per_class: int = 100, flip: float = 0.05, unlabelled: int = 30, seed: int = 0) -> Planted:
    import torch

    from tests.conftest import export_onnx, load_user_model

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "img").mkdir(exist_ok=True)
    templates = rng.choice([-1.0, 1.0], size=(PATTERNS, 3 * SIZE * SIZE))
    labels = np.repeat(np.arange(len(CLASSES)), per_class)
    hidden = rng.integers(0, len(CLASSES), unlabelled)  # the unlabelled samples' true classes
    pattern = np.where(np.concatenate([labels, hidden]) < 2, 0, np.concatenate([labels, hidden]) - 1)
    ids = [f"p{i:04d}" for i in range(len(labels))] + [f"u{i:04d}" for i in range(unlabelled)]
    for i, p in enumerate(pattern):
        chw = 128 + 14 * templates[p].reshape(3, SIZE, SIZE) + rng.normal(0, 30, (3, SIZE, SIZE))
        Image.fromarray(np.clip(chw, 0, 255).astype(np.uint8).transpose(1, 2, 0)).save(root / "img" / f"{ids[i]}.png")
    separable = np.flatnonzero(labels >= 2)
    flips = rng.choice(separable, size=int(round(flip * len(separable))), replace=False)
    noisy = labels.copy()
    for i in flips:
        noisy[i] = rng.choice([c for c in range(2, len(CLASSES)) if c != labels[i]])

    def manifest(path: Path, values: np.ndarray) -> Path:
        rows = ["id,path,label"] + [f"{ids[i]},img/{ids[i]}.png,{CLASSES[v]}" for i, v in enumerate(values)]
        rows += [f"{i},img/{i}.png," for i in ids[len(values):]]
        path.write_text("\n".join(rows) + "\n")
        return path

    model_py = root / "planted_model.py"
    model_py.write_text(MODEL_SOURCE)
    model = load_user_model(model_py).build()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in _weights(rng, templates).items()})
    torch.save(model.state_dict(), root / "weights.pt")
    export_onnx(model.eval(), root / "planted.onnx", dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    return Planted(root, manifest(root / "manifest.csv", noisy), manifest(root / "clean.csv", labels), root / "classes.txt",
                   model_py, root / "weights.pt", root / "planted.onnx", {ids[i] for i in flips})
