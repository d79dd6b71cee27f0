"""Backgrounds Challenge counterfactuals, checked pixel by pixel on tiny images."""

from __future__ import annotations

import numpy as np

from audit.backgrounds import (
    bounding_box,
    counterfactuals,
    only_background,
    paste,
    swap_partners,
)


def scene(value: float, background: float, size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    image = np.full((1, size, size), background, np.float32)
    image[0, :, ::2] += 0.01  # a striped texture, to see it tiled
    mask = np.zeros((size, size), bool)
    mask[3:5, 3:5] = True
    image[0, mask] = value
    return image, mask


def test_bounding_box_with_margin() -> None:
    _, mask = scene(1.0, 0.0)
    assert bounding_box(mask) == (2, 6, 2, 6)
    assert bounding_box(mask, margin=0) == (3, 5, 3, 5)
    assert bounding_box(np.zeros((4, 4), bool)) is None


def test_only_background_removes_the_object_and_keeps_the_rest() -> None:
    image, mask = scene(1.0, 0.2)
    out = only_background(image, mask)
    assert not np.isclose(out, 1.0).any()
    top, bottom, left, right = bounding_box(mask)
    outside = np.ones(mask.shape, bool)
    outside[top:bottom, left:right] = False
    assert np.array_equal(out[:, outside], image[:, outside])
    # the 4 x 4 box is filled by tiling the largest strip, the 2 x 8 band above it
    assert np.array_equal(out[0, top:bottom, left:right], np.tile(image[0, :2, :4], (2, 1)))


def test_object_filling_the_frame_gets_a_flat_fill() -> None:
    image = np.random.default_rng(0).random((3, 4, 4)).astype(np.float32)
    mask = np.ones((4, 4), bool)
    out = only_background(image, mask)
    assert np.allclose(out, 0.5)


def test_paste_and_partners() -> None:
    fg, mask = scene(1.0, 0.0)
    bg = np.full_like(fg, 0.7)
    pasted = paste(fg, mask, bg)
    assert np.all(pasted[0, mask] == 1.0) and np.all(pasted[0, ~mask] == 0.7)
    classes = ["wolf", "wolf", "husky", "husky", "fox"]
    same = swap_partners(classes, same=True, seed=0)
    rand = swap_partners(classes, same=False, seed=0)
    assert same.tolist()[:4] == [1, 0, 3, 2] and same[4] == -1
    assert all(classes[j] != classes[i] for i, j in enumerate(rand))
    assert np.array_equal(rand, swap_partners(classes, same=False, seed=0))


def test_counterfactual_sets() -> None:
    scenes = [scene(v, b) for v, b in ((1.0, 0.1), (0.9, 0.2), (0.8, 0.3), (0.7, 0.4))]
    images = np.stack([s[0] for s in scenes])
    masks = np.stack([s[1] for s in scenes])
    masks[3] = False  # no object: no counterfactual for it
    out = counterfactuals(images, masks, ["a", "a", "b", "b"], seed=0)
    only, valid = out["only_bg_t"]
    assert valid.tolist() == [True, True, True, False]
    mixed, valid = out["mixed_same"]
    assert valid.tolist() == [True, True, True, False]  # a partner without an object still lends its background
    assert np.allclose(mixed[0, 0, masks[0]], 1.0)  # the object stays
    assert np.allclose(mixed[0, 0, ~masks[0]][:4], only[1, 0, ~masks[0]][:4])  # on sample 1's background
    rand, valid = out["mixed_rand"]
    assert np.array_equal(rand[3], images[3])
