"""Input loading and preprocessing: images of every common mode, .npy arrays, channels, resizing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from audit.data import (
    Preprocessing,
    convert_channels,
    iter_batches,
    load_mask,
    load_sample,
    read_input,
    resize,
)
from audit.errors import SampleError
from audit.manifest import Sample


def sample(path: Path) -> Sample:
    return Sample(path.name, path, 1)


@pytest.mark.parametrize(
    ("mode", "pixels", "expected"),
    [
        ("L", np.full((2, 3), 51, np.uint8), 0.2),
        ("RGB", np.full((2, 3, 3), 255, np.uint8), 1.0),
        ("I;16", np.full((2, 3), 65535, np.uint16), 1.0),
    ],
)
def test_image_modes_scale_to_unit_range(tmp_path: Path, mode: str, pixels: np.ndarray, expected: float) -> None:
    path = tmp_path / "x.png"
    Image.fromarray(pixels, mode=mode if mode != "I;16" else None).save(path)
    arr = read_input(path)
    assert arr.dtype == np.float32 and arr.shape[1:] == (2, 3)
    assert np.allclose(arr, expected, atol=1e-6)


def test_palette_and_alpha_images(tmp_path: Path) -> None:
    Image.new("P", (4, 4), 0).save(tmp_path / "p.png")
    Image.new("RGBA", (4, 4), (255, 0, 0, 128)).save(tmp_path / "a.png")
    assert read_input(tmp_path / "p.png").shape == (3, 4, 4)
    rgba = read_input(tmp_path / "a.png")
    assert rgba.shape == (4, 4, 4)
    assert np.allclose(convert_channels(rgba, 3)[:, 0, 0], [1, 0, 0])


@pytest.mark.parametrize(
    ("array", "shape", "maximum"),
    [
        (np.full((5, 6), 2.5, np.float32), (1, 5, 6), 2.5),  # physics arrays keep their units
        (np.full((2, 5, 6), 255, np.uint8), (2, 5, 6), 1.0),
        (np.full((5, 6, 3), 65535, np.uint16), (3, 5, 6), 1.0),  # channels-last is recognised
    ],
)
def test_npy_arrays(tmp_path: Path, array: np.ndarray, shape: tuple[int, ...], maximum: float) -> None:
    np.save(tmp_path / "x.npy", array)
    arr = read_input(tmp_path / "x.npy")
    assert arr.shape == shape
    assert arr.max() == pytest.approx(maximum)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (np.zeros((2, 2, 2, 2), np.float32), "expected H x W or C x H x W"),
        (np.array([[np.nan, 1.0]], np.float32), "NaN"),
        (np.array([["a"]]), "unsupported array dtype"),
    ],
)
def test_bad_arrays_are_sample_errors(tmp_path: Path, content: np.ndarray, reason: str) -> None:
    np.save(tmp_path / "x.npy", content)
    with pytest.raises(SampleError, match=reason):
        read_input(tmp_path / "x.npy")


def test_corrupt_and_pickled_files_are_sample_errors(tmp_path: Path) -> None:
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnope")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(SampleError, match="unreadable"):
        read_input(tmp_path / "bad.png")
    with pytest.raises(SampleError, match="unreadable"):
        read_input(tmp_path / "obj.npy")


def test_channel_conversion() -> None:
    rgb = np.stack([np.full((2, 2), v, np.float32) for v in (1.0, 0.5, 0.0)])
    grey = convert_channels(rgb, 1)
    assert grey.shape == (1, 2, 2) and grey[0, 0, 0] == pytest.approx(0.299 + 0.587 * 0.5)
    assert convert_channels(grey, 3).shape == (3, 2, 2)
    with pytest.raises(SampleError, match="has 2 channels; the model expects 3"):
        convert_channels(np.zeros((2, 2, 2), np.float32), 3)


def test_resize_and_normalise(tmp_path: Path) -> None:
    Image.fromarray(np.full((10, 20, 3), 255, np.uint8)).save(tmp_path / "x.png")
    prep = Preprocessing.create((4, 6), 3, [0.5], [0.25])
    arr = load_sample(sample(tmp_path / "x.png"), prep)
    assert arr.shape == (3, 4, 6) and np.allclose(arr, 1.0)
    assert np.allclose(prep.normalise(arr), 2.0)
    assert np.allclose(prep.denormalise(prep.normalise(arr)), arr)
    assert resize(arr, (4, 6)) is arr


def test_mask_is_boolean_and_nearest(tmp_path: Path) -> None:
    mask = np.zeros((8, 8), np.uint8)
    mask[:4] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    loaded = load_mask(tmp_path / "m.png", (4, 4))
    assert loaded.dtype == bool and loaded[:2].all() and not loaded[2:].any()


def test_batches_skip_unreadable_samples_in_order(tmp_path: Path) -> None:
    paths = []
    for i in range(7):
        path = tmp_path / f"{i}.png"
        if i == 3:
            path.write_bytes(b"broken")
        else:
            Image.fromarray(np.full((4, 4), i * 10, np.uint8)).save(path)
        paths.append(path)
    skipped: list[tuple[str, str]] = []
    prep = Preprocessing.create((4, 4), 1, None, None)
    batches = list(iter_batches([sample(p) for p in paths], prep, batch_size=2, workers=2,
                                on_skip=lambda s, reason: skipped.append((s.id, reason))))
    ids = [i for b in batches for i in b.ids]
    assert ids == ["0.png", "1.png", "2.png", "4.png", "5.png", "6.png"]
    assert skipped[0][0] == "3.png" and skipped[0][1].startswith("unreadable")
    assert batches[0].x.shape == (2, 1, 4, 4)
    assert np.allclose(batches[-1].raw[0, 0, 0, 0], 60 / 255)


def test_a_cut_off_image_is_refused_even_after_weasyprint_loosened_pil(tmp_path: Path) -> None:
    """weasyprint sets PIL's LOAD_TRUNCATED_IMAGES on import (rendering does, so a second audit in the
    same process would otherwise half-read a truncated file and audit the grey rest as data)."""
    import io

    import weasyprint  # noqa: F401 - imported for its side effect on PIL
    from PIL import Image, ImageFile

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    (tmp_path / "cut.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    with pytest.raises(SampleError, match="unreadable"):
        read_input(tmp_path / "cut.png")
