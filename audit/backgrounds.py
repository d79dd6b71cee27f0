"""Counterfactual images in the spirit of the Backgrounds Challenge (Xiao, Engstrom, Ilyas, Madry 2020).

From images with foreground masks:
  only-bg-t   the object removed, its bounding box filled with tiles of the image's own background
  mixed-same  the object pasted onto the only-bg-t background of another image of the same class
  mixed-rand  the object pasted onto the only-bg-t background of an image of another class
A model that looks at the object keeps its answer under both swaps; a model that reads the context
("husky as wolf because of the snow") does well on mixed-same and badly on mixed-rand, and still
names the class when the object is gone. Pure numpy; arrays are raw C x H x W in pixel space.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def bounding_box(mask: np.ndarray, margin: int = 1) -> tuple[int, int, int, int] | None:
    """(top, bottom, left, right), half-open, of the mask's nonzero pixels grown by `margin`; None if empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    h, w = mask.shape
    return (max(rows[0] - margin, 0), min(rows[-1] + 1 + margin, h), max(cols[0] - margin, 0), min(cols[-1] + 1 + margin, w))


def _tile(source: np.ndarray, height: int, width: int) -> np.ndarray:
    """Repeat a C x h x w patch to cover height x width."""
    reps_y = -(-height // source.shape[1])
    reps_x = -(-width // source.shape[2])
    return np.tile(source, (1, reps_y, reps_x))[:, :height, :width]


def only_background(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The image with the object's bounding box filled by tiles of the largest background strip.

    The strips are the full-width bands above and below the box and the full-height bands left and
    right of it; they hold no object pixels by construction. With no strip left (the object fills
    the frame) the box is filled with the mean of the background pixels, or grey without any.
    """
    box = bounding_box(mask)
    out = image.copy()
    if box is None:
        return out
    top, bottom, left, right = box
    h, w = mask.shape
    strips = [image[:, :top, :], image[:, bottom:, :], image[:, :, :left], image[:, :, right:]]
    strips = [s for s in strips if s.shape[1] > 0 and s.shape[2] > 0]
    if strips:
        source = max(strips, key=lambda s: s.shape[1] * s.shape[2])
        out[:, top:bottom, left:right] = _tile(source, bottom - top, right - left)
    else:
        background = ~mask.astype(bool)
        fill = image[:, background].mean(axis=1) if background.any() else np.full(image.shape[0], 0.5, image.dtype)
        out[:, top:bottom, left:right] = fill[:, None, None]
    return out


def paste(foreground: np.ndarray, mask: np.ndarray, background: np.ndarray) -> np.ndarray:
    """The masked object of `foreground` on top of `background` (same size), pixel for pixel."""
    keep = mask.astype(bool)[None]
    return np.where(keep, foreground, background)


def swap_partners(classes: Sequence[str], same: bool, seed: int) -> np.ndarray:
    """For each sample the index of another sample whose background it gets (-1 when none qualifies).

    mixed-same draws from the same class, mixed-rand from any other class, both without using the
    sample itself, reproducibly for a given seed.
    """
    rng = np.random.default_rng(seed)
    labels = np.asarray(classes, dtype=object)
    partners = np.full(len(labels), -1, dtype=np.int64)
    for i, label in enumerate(labels):
        pool = np.flatnonzero((labels == label) if same else (labels != label))
        pool = pool[pool != i]
        if pool.size:
            partners[i] = int(rng.choice(pool))
    return partners


def counterfactuals(images: np.ndarray, masks: np.ndarray, classes: Sequence[str], seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{variant: (images, valid)} for only-bg-t, mixed-same and mixed-rand; `valid` marks samples that have one."""
    backgrounds = np.stack([only_background(img, m) for img, m in zip(images, masks, strict=True)])
    has_object = masks.reshape(len(masks), -1).any(axis=1)
    out = {"only_bg_t": (backgrounds, has_object)}
    for name, same in (("mixed_same", True), ("mixed_rand", False)):
        partners = swap_partners(classes, same, seed + (1 if same else 2))
        valid = has_object & (partners >= 0)
        donor = np.where(valid, partners, np.arange(len(images)))
        mixed = np.where(masks.astype(bool)[:, None] & valid[:, None, None, None], images, backgrounds[donor])
        mixed[~valid] = images[~valid]
        out[name] = (mixed, valid)
    return out
