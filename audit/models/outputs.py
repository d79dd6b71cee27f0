"""Turning a model's raw output into class probabilities, decided once per run.

`auto` recognises outputs that already are probabilities (rows in [0, 1] summing to 1), so no
second softmax flattens them; a single output column is a two-class sigmoid model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from audit.errors import ModelLoadError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class OutputInterpretation:
    kind: str  # "logits" | "probabilities" | "sigmoid-logit" | "sigmoid-probability"
    num_classes: int

    @property
    def binary(self) -> bool:
        return self.kind.startswith("sigmoid")

    def probabilities(self, raw: np.ndarray) -> np.ndarray:
        scores = as_scores(raw)
        if self.kind == "logits":
            shifted = scores - scores.max(axis=1, keepdims=True)
            exp = np.exp(shifted)
            return exp / exp.sum(axis=1, keepdims=True)
        if self.kind == "probabilities":
            return np.clip(scores, 0.0, 1.0) / np.clip(scores, 0.0, 1.0).sum(axis=1, keepdims=True).clip(min=1e-12)
        p = scores[:, 0]
        if self.kind == "sigmoid-logit":
            p = 1.0 / (1.0 + np.exp(-p))
        p = np.clip(p, 0.0, 1.0)
        return np.stack([1.0 - p, p], axis=1)

    def torch_probabilities(self, raw: torch.Tensor) -> torch.Tensor:
        """The same mapping on a torch tensor, differentiable, for gradient probes."""
        import torch

        scores = raw.reshape(raw.shape[0], -1)
        if self.kind == "logits":
            return torch.softmax(scores, dim=1)
        if self.kind == "probabilities":
            return scores
        p = scores[:, :1]
        if self.kind == "sigmoid-logit":
            p = torch.sigmoid(p)
        return torch.cat([1.0 - p, p], dim=1)

    def torch_scores(self, raw: torch.Tensor) -> torch.Tensor:
        """Per-class scores to explain: logits where the model has them (no softmax saturation)."""
        import torch

        scores = raw.reshape(raw.shape[0], -1)
        if self.kind == "logits":
            return scores
        if self.kind == "probabilities":
            return torch.log(scores.clamp_min(1e-12))
        p = scores[:, :1]
        if self.kind == "sigmoid-logit":
            return torch.cat([-p / 2, p / 2], dim=1)
        logit = torch.log(p.clamp(1e-12, 1.0)) - torch.log((1.0 - p).clamp(1e-12, 1.0))
        return torch.cat([-logit / 2, logit / 2], dim=1)


def as_scores(raw: np.ndarray) -> np.ndarray:
    raw = np.asarray(raw, dtype=np.float64)
    if raw.ndim == 1:
        return raw[:, None]
    if raw.ndim == 2:
        return raw
    squeezed = raw.reshape(raw.shape[0], -1)
    if squeezed.shape[1] == int(np.prod(raw.shape[1:])) and sum(d > 1 for d in raw.shape[1:]) <= 1:
        return squeezed
    raise ModelLoadError(
        f"the model output has shape {tuple(raw.shape)}; a classifier must output N x classes "
        "(choose another output with --output-name)"
    )


def interpret(raw: np.ndarray, requested: str) -> OutputInterpretation:
    """Decide how to read the output from the first batch (and the user's --output-kind)."""
    scores = as_scores(raw)
    if not np.isfinite(scores).all():
        raise ModelLoadError("the model output contains NaN or infinite values on the first batch")
    k = scores.shape[1]
    in_unit = bool((scores >= -1e-6).all() and (scores <= 1 + 1e-6).all())
    if requested == "sigmoid" or (requested == "auto" and k == 1):
        if k != 1:
            raise ModelLoadError(f"--output-kind sigmoid needs a single output column; the model has {k}")
        # One column: P(class 1) when every value lies in [0, 1], else a logit.
        return OutputInterpretation("sigmoid-probability" if in_unit else "sigmoid-logit", 2)
    if k == 1:
        raise ModelLoadError(f"--output-kind {requested} needs at least two output columns; the model has one (use sigmoid)")
    if requested == "probabilities":
        return OutputInterpretation("probabilities", k)
    if requested == "logits":
        return OutputInterpretation("logits", k)
    sums_to_one = bool(np.allclose(scores.sum(axis=1), 1.0, atol=1e-3))
    return OutputInterpretation("probabilities" if in_unit and sums_to_one else "logits", k)
