"""Loading inputs (images Pillow reads, .npy arrays) and turning them into model-ready batches.

Preprocessing is: load, convert to C channels, resize to H x W, scale pixels to [0, 1], then
(x - mean) / std. Integer arrays are scaled by their dtype's range; float arrays are taken as they
are, because physics arrays (energies, charges) have no pixel range to scale by.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from audit.errors import SampleError
from audit.manifest import Sample

Image.MAX_IMAGE_PIXELS = 20_000 * 20_000  # refuse decompression bombs, allow large scientific images


@dataclass(frozen=True)
class Preprocessing:
    input_size: tuple[int, int]
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def create(
        cls,
        input_size: tuple[int, int],
        channels: int,
        mean: Sequence[float] | None,
        std: Sequence[float] | None,
    ) -> Preprocessing:
        def expand(values: Sequence[float] | None, default: float) -> tuple[float, ...]:
            if values is None:
                return (default,) * channels
            if len(values) == 1:
                return (float(values[0]),) * channels
            if len(values) != channels:
                raise ValueError(f"expected 1 or {channels} normalisation values, got {len(values)}")
            return tuple(float(v) for v in values)

        return cls(tuple(input_size), channels, expand(mean, 0.0), expand(std, 1.0))  # type: ignore[arg-type]

    def normalise(self, x: np.ndarray) -> np.ndarray:
        """(x - mean) / std over the channel axis of a CHW or NCHW array."""
        shape = (-1, 1, 1)
        mean = np.asarray(self.mean, np.float32).reshape(shape)
        std = np.asarray(self.std, np.float32).reshape(shape)
        return ((x - mean) / std).astype(np.float32, copy=False)

    def denormalise(self, x: np.ndarray) -> np.ndarray:
        shape = (-1, 1, 1)
        mean = np.asarray(self.mean, np.float32).reshape(shape)
        std = np.asarray(self.std, np.float32).reshape(shape)
        return (x * std + mean).astype(np.float32, copy=False)

    def describe(self) -> dict[str, object]:
        return {"input_size": list(self.input_size), "channels": self.channels, "mean": list(self.mean), "std": list(self.std)}


def _pil_to_array(img: Image.Image) -> np.ndarray:
    """Any Pillow mode to float32 HxWxC in [0, 1] (16-bit and float modes kept in range)."""
    if img.mode in ("I;16", "I;16B", "I;16L"):
        return (np.asarray(img, dtype=np.float32) / 65535.0)[..., None]
    if img.mode == "I":
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max(initial=0) <= 65535 else float(arr.max())
        return (arr / top).astype(np.float32)[..., None]
    if img.mode == "F":
        return np.asarray(img, dtype=np.float32)[..., None]
    if img.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "1", "LA"):
        img = img.convert("RGBA" if "A" in img.mode or "transparency" in img.info else "RGB")
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return arr if arr.ndim == 3 else arr[..., None]


def read_input(path: Path) -> np.ndarray:
    """Read an image or .npy file as float32 CxHxW; images in [0, 1]."""
    try:
        if path.suffix.lower() == ".npy":
            arr = np.load(path, allow_pickle=False)
            return _array_to_chw(arr)
        ImageFile.LOAD_TRUNCATED_IMAGES = False  # weasyprint sets it on import: a cut-off file must be refused, not half-read
        with Image.open(path) as img:
            img.load()
            return np.ascontiguousarray(_pil_to_array(img).transpose(2, 0, 1))
    except FileNotFoundError:
        raise SampleError("file not found") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SampleError(f"unreadable: {detail}") from None


def _array_to_chw(arr: np.ndarray) -> np.ndarray:
    if arr.dtype.kind not in "biuf":
        raise SampleError(f"unsupported array dtype {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[None]
    elif arr.ndim == 3:
        if arr.shape[0] > 4 and arr.shape[-1] <= 4:  # H x W x C stored channels-last
            arr = arr.transpose(2, 0, 1)
    else:
        raise SampleError(f"array has shape {arr.shape}; expected H x W or C x H x W")
    if arr.dtype.kind == "u":
        out = arr.astype(np.float32) / float(np.iinfo(arr.dtype).max)
    elif arr.dtype.kind == "b":
        out = arr.astype(np.float32)
    else:
        out = arr.astype(np.float32)
    if not np.isfinite(out).all():
        raise SampleError("array contains NaN or infinite values")
    return np.ascontiguousarray(out)


def convert_channels(arr: np.ndarray, channels: int) -> np.ndarray:
    have = arr.shape[0]
    if have == channels:
        return arr
    if channels == 1 and have in (3, 4):
        weights = np.asarray([0.299, 0.587, 0.114], np.float32).reshape(3, 1, 1)
        return (arr[:3] * weights).sum(axis=0, keepdims=True)
    if channels == 3 and have == 1:
        return np.repeat(arr, 3, axis=0)
    if channels == 3 and have == 4:
        return arr[:3]
    if channels == 4 and have == 3:
        return np.concatenate([arr, np.ones_like(arr[:1])], axis=0)
    raise SampleError(f"has {have} channels; the model expects {channels}")


def resize(arr: np.ndarray, size: tuple[int, int], resample: int = Image.BILINEAR) -> np.ndarray:
    """Resize each channel of a float CHW array to H x W with Pillow (no torch needed)."""
    height, width = size
    if arr.shape[1:] == (height, width):
        return arr
    planes = [np.asarray(Image.fromarray(plane, mode="F").resize((width, height), resample), np.float32) for plane in arr]
    return np.stack(planes)


def load_sample(sample: Sample, prep: Preprocessing) -> np.ndarray:
    """Model-ready CHW array for one sample (unnormalised, in [0, 1] for images)."""
    arr = read_input(sample.path)
    arr = convert_channels(arr, prep.channels)
    return resize(arr.astype(np.float32, copy=False), prep.input_size)


def load_mask(path: Path, size: tuple[int, int]) -> np.ndarray:
    """Boolean H x W foreground mask (nonzero = object), resized with nearest neighbour."""
    arr = read_input(path)
    plane = arr.max(axis=0, keepdims=True)
    return resize(plane, size, Image.NEAREST)[0] > 0


@dataclass
class Batch:
    """A batch of readable samples: x is normalised float32 N x C x H x W (NCHW whatever the model layout)."""

    samples: list[Sample]
    x: np.ndarray
    raw: np.ndarray  # unnormalised inputs, for probes that perturb in pixel space and for thumbnails

    @property
    def ids(self) -> list[str]:
        return [s.id for s in self.samples]

    @property
    def labels(self) -> np.ndarray:
        return np.asarray([-1 if s.label is None else s.label for s in self.samples], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.samples)


def iter_batches(
    samples: Sequence[Sample],
    prep: Preprocessing,
    batch_size: int,
    workers: int = 2,
    on_skip: Callable[[Sample, str], None] | None = None,
    prefetch: int = 2,
) -> Iterator[Batch]:
    """`samples` in batches of `batch_size` (see `iter_groups`)."""
    groups = [samples[start : start + batch_size] for start in range(0, len(samples), batch_size)]
    for _, batch in iter_groups(groups, prep, workers, on_skip, prefetch):
        yield batch


def iter_groups(
    groups: Sequence[Sequence[Sample]],
    prep: Preprocessing,
    workers: int = 2,
    on_skip: Callable[[Sample, str], None] | None = None,
    prefetch: int = 2,
    load: bool | Sequence[bool] = True,
) -> Iterator[tuple[int, Batch]]:
    """(group index, batch) for each group with a readable sample, decoded in a thread pool with
    bounded look-ahead; unreadable samples go to `on_skip`. A group whose `load` is False is not
    read: its batch carries the samples only (empty arrays)."""
    loads = [load] * len(groups) if isinstance(load, bool) else list(load)

    def load_chunk(chunk: Sequence[Sample], read: bool) -> tuple[list[Sample], list[np.ndarray], list[tuple[Sample, str]]]:
        if not read:
            return list(chunk), [], []
        good, arrays, bad = [], [], []
        for sample in chunk:
            try:
                arrays.append(load_sample(sample, prep))
                good.append(sample)
            except SampleError as exc:
                bad.append((sample, str(exc)))
        return good, arrays, bad

    def emit(index: int, item: Future | tuple) -> Iterator[tuple[int, Batch]]:
        good, arrays, bad = item.result() if isinstance(item, Future) else item
        for sample, reason in bad:
            if on_skip is not None:
                on_skip(sample, reason)
        if good:
            raw = np.stack(arrays) if arrays else np.zeros((0,), np.float32)
            yield index, Batch(good, prep.normalise(raw) if arrays else raw, raw)

    pool = ThreadPoolExecutor(max_workers=workers) if workers > 0 and any(loads) else None
    pending: deque[tuple[int, Future | tuple]] = deque()
    try:
        for index, chunk in enumerate(groups):
            pending.append((index, pool.submit(load_chunk, chunk, loads[index]) if pool else load_chunk(chunk, loads[index])))
            if len(pending) > prefetch:
                yield from emit(*pending.popleft())
        while pending:
            yield from emit(*pending.popleft())
    finally:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
