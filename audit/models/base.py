"""The ModelAdapter contract every model format meets, and the capabilities it declares.

A probe that needs a capability the adapter lacks is skipped with the adapter's reason, so a
report never shows a method as if it had run when it could not.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from audit.manifest import sha256_file

if TYPE_CHECKING:
    import torch


class Capability(str, Enum):
    GRADIENTS = "gradients"  # d(output)/d(input) through a torch module
    HOOKS = "hooks"  # forward/backward hooks on submodules (Grad-CAM, taps)
    NAMED_LAYERS = "named_layers"  # submodules addressable by name
    RELU_MODULES = "relu_modules"  # every ReLU is an nn.ReLU module (guided backprop, deconvolution)


@dataclass(frozen=True)
class ModelFile:
    path: str
    sha256: str

    @classmethod
    def of(cls, path: Path) -> ModelFile:
        return cls(str(path), sha256_file(path))


@dataclass
class InputSpec:
    """What the model's input looks like, as far as the file tells (None = unknown)."""

    name: str = "input"
    channels: int | None = None
    size: tuple[int, int] | None = None
    layout: str | None = None  # "nchw" | "nhwc"
    fixed_batch: int | None = None


@dataclass
class ModelAdapter(ABC):
    """A loaded model: batched forward on NCHW float32 numpy input, plus an optional torch module."""

    format: str
    files: list[ModelFile]
    capabilities: dict[Capability, str | None]
    input_spec: InputSpec
    device: str = "cpu"
    notes: list[str] = field(default_factory=list)
    output_names: list[str] = field(default_factory=list)
    output_name: str | None = None

    @abstractmethod
    def forward(self, x: np.ndarray, taps: frozenset[str] = frozenset()) -> dict[str, np.ndarray]:
        """Run one batch. Returns {"output": raw selected output} plus one array per tap."""

    @abstractmethod
    def torch_module(self) -> torch.nn.Module | None:
        """A differentiable module taking NCHW input and returning the raw selected output."""

    def supported_taps(self) -> frozenset[str]:
        return frozenset({"output"})

    @property
    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for f in sorted(self.files, key=lambda f: f.path):
            digest.update(f.sha256.encode())
        return digest.hexdigest()

    def missing(self, needed: frozenset[Capability]) -> dict[Capability, str]:
        """The capabilities in `needed` this model lacks, with the reason for each."""
        reasons = {c: self.capabilities.get(c, "not declared by this model format") for c in needed}
        return {c: reason for c, reason in reasons.items() if reason is not None}

    def describe(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "files": [{"path": f.path, "sha256": f.sha256} for f in self.files],
            "fingerprint": self.fingerprint,
            "device": self.device,
            "input": {
                "name": self.input_spec.name,
                "channels": self.input_spec.channels,
                "size": list(self.input_spec.size) if self.input_spec.size else None,
                "layout": self.input_spec.layout,
                "fixed_batch": self.input_spec.fixed_batch,
            },
            "outputs": self.output_names,
            "output_name": self.output_name,
            "capabilities": {
                c.value: {"available": self.capabilities.get(c) is None, "reason": self.capabilities.get(c)}
                for c in Capability
            },
            "notes": self.notes,
        }


def resolve_device(requested: str) -> str:
    """`auto` takes a GPU when torch sees one; `cuda` without a GPU is an input error."""
    import torch

    from audit.errors import InputError

    if requested == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if requested == "cuda":
        raise InputError("--device cuda: no CUDA device is visible to torch")
    return "cpu"
