"""Forward-only passes of a torch model through onnxruntime, when the model exports cleanly to ONNX.

Deletion curves, occlusion and background swaps only need outputs, and on a 2-core CPU onnxruntime
runs a ResNet-18 in about half the time torch takes. The export is checked before it is trusted: it
must trace without TracerWarnings (a Python-side branch on tensor values is frozen into the graph) and
agree with the torch module on the example and on a batch of another size (a batch size frozen into
the graph). Anything short of that keeps torch, with the reason, and never stops the audit.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from audit.errors import first_line
from audit.models.onnx_adapter import _make_session

OPSET = 17
RTOL = 1e-3
ATOL = 1e-4  # times the largest |output| of the torch module: logits of 50 carry float32 rounding 50 times larger


@dataclass(frozen=True)
class OnnxForward:
    """An onnxruntime session of the exported module: NCHW float32 in, the selected output out."""

    session: ort.InferenceSession
    input_name: str
    output_name: str

    def forward(self, x: np.ndarray) -> np.ndarray:
        feed = np.ascontiguousarray(x, dtype=np.float32)
        return np.asarray(self.session.run([self.output_name], {self.input_name: feed})[0]).astype(np.float32, copy=False)


def _selected(out: Any) -> torch.Tensor:
    """The output the adapter's forward reads: the first of a tuple or list."""
    out = out[0] if isinstance(out, (tuple, list)) and out else out
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"the model returns a {type(out).__name__}, not a tensor")
    return out


@contextlib.contextmanager
def _quiet_export() -> Iterator[list[warnings.WarningMessage]]:
    """Silence the export, recording its warnings. The TorchScript exporter switches its C++ ONNX log on
    whatever it was (torch 2.14 tests the function `_jit_is_onnx_log_enabled`, not its result) and leaves
    it on; that log prints the whole graph to stdout (file descriptor 1) when an export fails."""
    enabled = torch._C._jit_is_onnx_log_enabled()
    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield caught
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)
        torch._C._jit_set_onnx_log_enabled(enabled)


def _export(module: nn.Module, trace_input: torch.Tensor) -> tuple[bytes | None, str | None]:
    """The ONNX bytes, or None and why the export cannot be trusted."""
    buffer = io.BytesIO()
    try:
        with _quiet_export() as caught:
            torch.onnx.export(
                module, (trace_input,), buffer, dynamo=False, opset_version=OPSET,
                input_names=["input"], output_names=["output"],
                dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
            )
    except Exception as exc:  # noqa: BLE001 - whatever the exporter says is the reason torch is kept
        return None, f"the ONNX export failed ({first_line(exc)})"
    tracer = [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
    if tracer:
        first = tracer[0]
        message = str(first.message).strip().splitlines()[0]
        return None, (f"the traced graph may not hold for other inputs ({len(tracer)} tracer warning(s), first at "
                      f"{os.path.basename(first.filename)}:{first.lineno}: {message})")
    return buffer.getvalue(), None


def build_onnx_forward(module: nn.Module, example: np.ndarray, device: str = "cpu") -> tuple[OnnxForward | None, str]:
    """Export `module` (normalised NCHW float32 -> the selected output) and check it against torch.

    Returns the onnxruntime forward and a one-line note that it is used, or None and a one-line reason
    why torch is kept. Agreement: np.allclose(onnxruntime, torch, rtol=1e-3, atol=1e-4 x max|torch|) on
    `example` and on a batch of another size than the one traced (two images), since a batch size frozen
    into the graph would pass a same-size check.
    """
    if device != "cpu":
        return None, f"the model runs on {device}"
    x = np.ascontiguousarray(example, dtype=np.float32)
    if x.ndim == 0 or len(x) == 0:
        return None, "no example input to check the export against"
    trace_input = torch.from_numpy(x[:2] if len(x) >= 2 else np.concatenate([x, x]))
    check = x if len(x) != 2 else np.concatenate([x, x[:1]])
    data, reason = _export(module, trace_input)
    if data is None:
        return None, reason or "the ONNX export failed"
    try:
        session = _make_session(data, ["CPUExecutionProvider"], arena=False)
        runtime = OnnxForward(session, session.get_inputs()[0].name, session.get_outputs()[0].name)
        got = runtime.forward(check)
    except Exception as exc:  # noqa: BLE001 - onnxruntime's words are the reason
        return None, f"onnxruntime refused the exported graph ({first_line(exc)})"
    try:
        with torch.no_grad():
            reference = _selected(module(torch.from_numpy(check))).float().numpy()
    except Exception as exc:  # noqa: BLE001
        return None, f"the torch forward failed on the example ({first_line(exc)})"
    if got.shape != reference.shape:
        return None, f"onnxruntime's output has shape {got.shape}, torch's {reference.shape}"
    scale = float(np.abs(reference).max()) if reference.size else 0.0
    diff = float(np.abs(got - reference).max()) if reference.size else 0.0
    if not np.allclose(got, reference, rtol=RTOL, atol=ATOL * scale):
        return None, f"onnxruntime's output disagrees with torch's (max difference {diff:.2g}, largest |output| {scale:.2g})"
    return runtime, f"forward-only checks run through onnxruntime (ONNX export, opset {OPSET}; agrees with torch to {diff:.1g})"
