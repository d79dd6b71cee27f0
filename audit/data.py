"""Loading inputs (images Pillow reads, .npy arrays) and turning them into model-ready batches.

Preprocessing is: load, convert to C channels, resize to H x W, scale pixels to [0, 1], then
(x - mean) / std. Integer arrays are scaled by their dtype's range; float arrays are taken as they
are, because physics arrays (energies, charges) have no pixel range to scale by.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from audit.errors import InputError, SampleError
from audit.manifest import Sample

MAX_IMAGE_PIXELS = 50_000_000  # default for --max-image-pixels: larger headers are refused before decoding
Image.MAX_IMAGE_PIXELS = None  # our own check (read_input) runs first, with the configured limit and a reason


def channel_values(values: Sequence[float]) -> str:
    """Per-channel statistics as a user types them: '0.5' when every channel shares the value,
    else '0.485 0.456 0.406'."""
    texts = [f"{float(v):g}" for v in values]
    return texts[0] if len(set(texts)) == 1 else " ".join(texts)


@dataclass(frozen=True)
class Preprocessing:
    input_size: tuple[int, int]
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    max_pixels: int = MAX_IMAGE_PIXELS  # per input file, checked on its header before decoding
    stated: bool = False  # mean or std came from the user (flags or config); else the defaults were assumed

    @classmethod
    def create(
        cls,
        input_size: tuple[int, int],
        channels: int,
        mean: Sequence[float] | None,
        std: Sequence[float] | None,
        max_pixels: int = MAX_IMAGE_PIXELS,
    ) -> Preprocessing:
        def expand(values: Sequence[float] | None, default: float, name: str) -> tuple[float, ...]:
            if values is None:
                return (default,) * channels
            if len(values) == 1:
                return (float(values[0]),) * channels
            if len(values) != channels:
                raise InputError(f"--{name} {' '.join(str(v) for v in values)}: the model takes {channels} channel(s), "
                                 f"so give 1 or {channels} values, not {len(values)}")
            return tuple(float(v) for v in values)

        return cls(tuple(input_size), channels, expand(mean, 0.0, "mean"), expand(std, 1.0, "std"), max_pixels,  # type: ignore[arg-type]
                   stated=mean is not None or std is not None)

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
        return {"input_size": list(self.input_size), "channels": self.channels, "mean": list(self.mean), "std": list(self.std),
                "stated": self.stated}


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


def read_input(path: Path, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Read an image or .npy file as float32 CxHxW; images in [0, 1].

    The size a file declares is checked before anything is decoded: a 140 KB PNG may declare
    12000 x 12000 pixels and take gigabytes to decode. Running out of memory on one file skips it."""
    try:
        if path.suffix.lower() == ".npy":
            _check_array_header(path, max_pixels)
            arr = np.load(path, allow_pickle=False)
            return _array_to_chw(arr)
        ImageFile.LOAD_TRUNCATED_IMAGES = False  # weasyprint sets it on import: a cut-off file must be refused, not half-read
        with Image.open(path) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise SampleError(f"image declares {width} x {height} = {width * height:,} pixels, over the limit of "
                                  f"{max_pixels:,} (--max-image-pixels); not decoded")
            if width == 0 or height == 0:
                raise SampleError(f"image is empty ({width} x {height})")
            img.load()
            return np.ascontiguousarray(_pil_to_array(img).transpose(2, 0, 1))
    except FileNotFoundError:
        raise SampleError("file not found") from None
    except MemoryError:
        raise SampleError("out of memory while decoding it") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SampleError(f"unreadable: {detail}") from None


def _check_array_header(path: Path, max_pixels: int) -> None:
    """Refuse an empty or over-large .npy from its header, before its data is read."""
    shape, dtype = _npy_header(path)
    if dtype.hasobject:
        return  # np.load(allow_pickle=False) refuses it, saying why, before reading any data
    if not shape or 0 in shape:
        raise SampleError(f"array is empty (shape {shape})")
    if len(shape) not in (2, 3):
        raise _dimension_error(shape)
    height, width = _plane_shape(shape)
    if height * width > max_pixels:
        raise SampleError(f"array has shape {shape}: {height * width:,} pixels, over the limit of {max_pixels:,} "
                          "(--max-image-pixels); not read")


def _dimension_error(shape: tuple[int, ...]) -> SampleError:
    return SampleError(f"array has shape {shape}; expected H x W or C x H x W")


def _array_to_chw(arr: np.ndarray) -> np.ndarray:
    if arr.dtype.kind not in "biuf":
        raise SampleError(f"unsupported array dtype {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[None]
    elif arr.ndim == 3:
        if arr.shape[0] > 4 and arr.shape[-1] <= 4:  # H x W x C stored channels-last
            arr = arr.transpose(2, 0, 1)
    else:
        raise _dimension_error(arr.shape)
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
    return _load_with_size(sample, prep)[0]


def _load_with_size(sample: Sample, prep: Preprocessing) -> tuple[np.ndarray, tuple[int, int]]:
    """The model-ready array and the H x W the file itself has (what its mask must match)."""
    try:
        arr = read_input(sample.path, prep.max_pixels)
        size = (int(arr.shape[1]), int(arr.shape[2]))
        arr = convert_channels(arr, prep.channels)
        return resize(arr.astype(np.float32, copy=False), prep.input_size), size
    except MemoryError:
        raise SampleError("out of memory while preprocessing it") from None


def load_mask(path: Path, size: tuple[int, int], max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Boolean H x W foreground mask (nonzero = object), resized with nearest neighbour."""
    arr = read_input(path, max_pixels)
    plane = arr.max(axis=0, keepdims=True)
    return resize(plane, size, Image.NEAREST)[0] > 0


def mask_problem(sample: Sample, image_size: tuple[int, int], max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[str, bool] | None:
    """What is wrong with a sample's mask, and whether the mask is still used (None: nothing).

    An unreadable mask is dropped (the sample stays, without mask); one of another size than its image
    is resized to the model's input like the image, which is said, because it then covers the object
    only when both share an aspect ratio."""
    if sample.mask is None:
        return None
    try:
        shape = read_input(sample.mask, max_pixels).shape[1:]
    except SampleError as exc:
        return f"mask unreadable ({exc}); sample kept without mask", False
    if tuple(shape) != tuple(image_size):
        return (f"mask is {shape[1]} x {shape[0]} but the image is {image_size[1]} x {image_size[0]}; "
                "both are resized to the model input (nearest neighbour for the mask)"), True
    return None


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
    on_mask: Callable[[Sample, str, bool], None] | None = None,
) -> Iterator[Batch]:
    """`samples` in batches of `batch_size` (see `iter_groups`)."""
    groups = [samples[start : start + batch_size] for start in range(0, len(samples), batch_size)]
    for _, batch in iter_groups(groups, prep, workers, on_skip, prefetch, on_mask=on_mask):
        yield batch


def source_size(path: Path) -> tuple[int, int]:
    """A readable input's own H x W, from its header (the file was just decoded)."""
    if path.suffix.lower() == ".npy":
        return _plane_shape(_npy_header(path)[0])
    with Image.open(path) as img:
        return img.size[1], img.size[0]


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """The shape and dtype a .npy header declares, without reading its data."""
    with open(path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = reader(fh)
    return tuple(shape), dtype


def _plane_shape(shape: Sequence[int]) -> tuple[int, int]:
    """H x W of an array as `_array_to_chw` lays it out (H x W, C x H x W, or H x W x C channels-last)."""
    if len(shape) == 3 and shape[0] > 4 and shape[-1] <= 4:
        return int(shape[0]), int(shape[1])
    return int(shape[-2]), int(shape[-1])


def iter_groups(
    groups: Sequence[Sequence[Sample]],
    prep: Preprocessing,
    workers: int = 2,
    on_skip: Callable[[Sample, str], None] | None = None,
    prefetch: int = 2,
    load: bool | Sequence[bool] = True,
    on_mask: Callable[[Sample, str, bool], None] | None = None,
) -> Iterator[tuple[int, Batch]]:
    """(group index, batch) for each group with a readable sample, decoded in a thread pool with
    bounded look-ahead; unreadable samples go to `on_skip`. A group whose `load` is False is not
    read: its batch carries the samples only (empty arrays). With `on_mask`, each sample's mask is
    checked too (`mask_problem`): the problem goes to `on_mask(sample, reason, kept)`, and a dropped
    mask leaves the batch's sample without one."""
    loads = [load] * len(groups) if isinstance(load, bool) else list(load)

    def load_chunk(chunk: Sequence[Sample], read: bool) -> tuple[list[Sample], list[np.ndarray], list[tuple[Sample, str]], list]:
        if not read:
            return list(chunk), [], [], []
        good, arrays, bad, masks = [], [], [], []
        for sample in chunk:
            try:
                arr, size = _load_with_size(sample, prep)
            except SampleError as exc:
                bad.append((sample, str(exc)))
                continue
            arrays.append(arr)
            problem = mask_problem(sample, size, prep.max_pixels) if on_mask else None
            if problem is not None:
                masks.append((sample, *problem))
                if not problem[1]:
                    sample = replace(sample, mask=None)
            good.append(sample)
        return good, arrays, bad, masks

    def emit(index: int, item: Future | tuple) -> Iterator[tuple[int, Batch]]:
        good, arrays, bad, masks = item.result() if isinstance(item, Future) else item
        for sample, reason in bad:
            if on_skip is not None:
                on_skip(sample, reason)
        for sample, reason, kept in masks:
            on_mask(sample, reason, kept)  # type: ignore[misc]
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
