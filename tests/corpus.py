"""Builders of hostile and broken inputs, shared by the corpus tests: each writes one bad file and
returns its path. Kept apart from the tests so a new case is one function and one table row."""

from __future__ import annotations

import io
import json
import pathlib
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def png(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array).save(path)
    return path


def png_declaring(path: Path, width: int, height: int) -> Path:
    """A small valid PNG whose header is rewritten to declare `width` x `height`: a decompression bomb
    as far as any reader that trusts the header is concerned."""
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    start = data.index(b"IHDR")
    data[start + 4 : start + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[start : start + 17])) & 0xFFFFFFFF
    data[start + 17 : start + 21] = struct.pack(">I", crc)
    path.write_bytes(bytes(data))
    return path


def truncated_png(path: Path) -> Path:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue()[:200])
    return path


def npy_declaring(path: Path, shape: tuple[int, ...]) -> Path:
    """A .npy whose header declares `shape` (float32) but holds no data."""
    with open(path, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return path


def pickled_npy(path: Path) -> Path:
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return path


class MarkerPayload:
    """Unpickling this creates `marker`: proof that loading ran code the file carried."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (pathlib.Path.touch, (self.marker,))


def export_program(path: Path) -> Path:
    """A clean torch.export archive of a tiny CNN taking 3 x 16 x 16 inputs."""
    import torch
    from torch import nn

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.conv(x).mean((2, 3)))

    torch.export.save(torch.export.export(Tiny().eval(), (torch.randn(2, 3, 16, 16),)), str(path))
    return path


def _rewrite_archive(source: Path, target: Path, edit) -> Path:  # type: ignore[no-untyped-def]
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            zout.writestr(info, edit(info.filename, zin.read(info.filename)))
    return target


def _pickled(marker: Path) -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save(MarkerPayload(marker), buffer)
    return buffer.getvalue()


def pt2_with_pickled_inputs(clean: Path, target: Path, marker: Path) -> Path:
    """The archive's sample inputs replaced by a pickle that creates `marker` when loaded."""
    return _rewrite_archive(clean, target, lambda name, data: _pickled(marker) if name.endswith("data/sample_inputs/model.pt") else data)


def pt2_with_pickled_weight(clean: Path, target: Path, marker: Path) -> Path:
    """One weight marked `use_pickle` and replaced by a pickle that creates `marker` when loaded."""
    def edit(name: str, data: bytes) -> bytes:
        if name.endswith("data/weights/model_weights_config.json"):
            config = json.loads(data)
            first = next(iter(config["config"]))
            config["config"][first]["use_pickle"] = True
            return json.dumps(config).encode()
        if name.endswith("data/weights/weight_0"):
            return _pickled(marker)
        return data

    return _rewrite_archive(clean, target, edit)


def pt2_with_aoti(clean: Path, target: Path) -> Path:
    """The archive plus an AOTInductor folder, which torch.export.load would dlopen."""
    _rewrite_archive(clean, target, lambda name, data: data)
    with zipfile.ZipFile(target) as archive:
        root = archive.namelist()[0].split("/")[0]
    with zipfile.ZipFile(target, "a") as archive:
        archive.writestr(f"{root}/data/aotinductor/model/model.so", b"\x7fELF")
    return target
