"""Small JPEG thumbnails of evidence samples, written into the run so the report needs no data set."""

from __future__ import annotations

import io
from collections.abc import Iterable

import numpy as np
from PIL import Image

from audit.data import Preprocessing, load_sample
from audit.errors import SampleError
from audit.manifest import Sample
from audit.store import RunStore

THUMBNAIL_SIZE = 96


def to_display(arr: np.ndarray) -> np.ndarray:
    """CHW float to HWC uint8 for display: [0, 1] images as they are, other ranges min-max scaled."""
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0 or hi > 1:
        arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    img = np.clip(arr * 255 + 0.5, 0, 255).astype(np.uint8)
    if img.shape[0] == 1:
        return img[0]
    return img[:3].transpose(1, 2, 0)


JPEG_QUALITY = 85


def jpeg_bytes(pixels: np.ndarray, size: int = THUMBNAIL_SIZE) -> bytes:
    """Encode HxW or HxWx3 uint8 as JPEG at its display size (the longer side `size`; nearest when
    enlarging, so small inputs keep their pixels): a photo-like thumbnail is a third of its PNG."""
    img = Image.fromarray(pixels)
    scale = size / max(img.size)
    resample = Image.NEAREST if scale > 1 else Image.LANCZOS
    img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), resample)
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=JPEG_QUALITY, optimize=True)
    return buffer.getvalue()


def write_thumbnails(samples: Iterable[Sample], prep: Preprocessing, store: RunStore) -> dict[str, str]:
    """id -> artifact path for each readable sample (the model's view: resized, channel-converted)."""
    out: dict[str, str] = {}
    for sample in samples:
        if sample.id in out:
            continue
        try:
            arr = load_sample(sample, prep)
        except SampleError:
            continue
        out[sample.id] = store.write_artifact(jpeg_bytes(to_display(arr)), ".jpg")
    return out
