"""The ModelAdapter contract every model format meets, and the capabilities it declares.

A probe that needs a capability the adapter lacks is skipped with the adapter's reason, so a
report never shows a method as if it had run when it could not.
"""

from __future__ import annotations

import difflib
import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from audit.errors import TapError
from audit.manifest import sha256_file

if TYPE_CHECKING:
    import torch

    from audit.models.onnx_forward import OnnxForward


class Capability(str, Enum):
    GRADIENTS = "gradients"  # d(output)/d(input) through a torch module
    HOOKS = "hooks"  # forward/backward hooks on submodules (Grad-CAM, taps)
    NAMED_LAYERS = "named_layers"  # submodules addressable by name
    RELU_MODULES = "relu_modules"  # every ReLU is an nn.ReLU module (guided backprop, deconvolution)


OUTPUT_TAP = "output"  # the raw selected output, always served
EMBEDDING_TAP = "embedding"  # the input of the classifier head, (N, features)
LAYER_TAP = "layer:"  # + a module name (torch) or a tensor name (ONNX)
TAP_VOCABULARY = (OUTPUT_TAP, EMBEDDING_TAP, LAYER_TAP + "*")


def closest_names(name: str, candidates: list[str], label: str) -> str:
    """`closest: a, b` when some candidate resembles `name`, else the first few candidates, for a
    reason that tells the user what to type instead."""
    close = difflib.get_close_matches(name, candidates, n=3)
    if close:
        return "closest: " + ", ".join(close)
    if not candidates:
        return f"no {label}"
    more = f", ... {len(candidates)} in all" if len(candidates) > 8 else ""
    return f"{label}: " + ", ".join(candidates[:8]) + more


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
    inferred: dict[str, Any] | None = None  # what was taken from the data rather than given (audit.plan.infer_geometry)


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
        """Run one batch. Returns {"output": raw selected output} plus one float32 array per tap asked
        ("embedding": N x F, "layer:NAME": N x ...); raises TapError for a tap `tap_reason` refuses."""

    @abstractmethod
    def torch_module(self) -> torch.nn.Module | None:
        """A differentiable module taking NCHW input and returning the raw selected output."""

    def forward_runtime(self, example: np.ndarray) -> tuple[OnnxForward | None, str | None]:
        """A faster runner of the selected output alone, for forward-only checks, and a one-line note for
        the report; (None, None) where `forward` is already the one to use (ONNX files run in onnxruntime)."""
        return None, None

    def embedding_source(self) -> str | None:
        """The module (torch: the head, whose input is read) or tensor (ONNX) the embedding comes from."""
        return None

    def embedding_reason(self) -> str | None:
        """None when the embedding tap is served, else why not."""
        return f"{self.format} models serve no embedding"

    def layer_reason(self, name: str | None) -> str | None:
        """None when layer:`name` is served, else why not; `name` None asks about layer taps at all."""
        return f"{self.format} models serve no layer taps"

    def tap_reason(self, tap: str) -> str | None:
        """None when this model serves `tap`, else a one-line reason naming what is missing."""
        if tap == OUTPUT_TAP:
            return None
        if tap == EMBEDDING_TAP:
            return self.embedding_reason()
        if tap.startswith(LAYER_TAP):
            name = tap[len(LAYER_TAP) :]
            return self.layer_reason(name) if name else "a layer tap needs a name: layer:NAME"
        return f"unknown tap {tap!r} (taps: {OUTPUT_TAP}, {EMBEDDING_TAP}, {LAYER_TAP}NAME)"

    def supported_taps(self) -> dict[str, str | None]:
        """Each entry of the vocabulary ("output", "embedding", "layer:*") with None if served, else why not."""
        return {OUTPUT_TAP: None, EMBEDDING_TAP: self.embedding_reason(), LAYER_TAP + "*": self.layer_reason(None)}

    def check_taps(self, taps: frozenset[str]) -> None:
        """Refuse, before any work, a forward pass asked for a tap this model cannot serve."""
        for tap in sorted(taps):
            reason = self.tap_reason(tap)
            if reason is not None:
                raise TapError(f"tap {tap}: {reason}")

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
            "taps": {
                "embedding": {"source": self.embedding_source(), "reason": self.embedding_reason()},
                "served": self.supported_taps(),
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
