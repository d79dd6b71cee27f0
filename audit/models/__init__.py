"""Model adapters: one entry point that picks the adapter from the model path."""

from __future__ import annotations

from pathlib import Path

from audit.models.base import Capability, InputSpec, ModelAdapter, resolve_device

__all__ = ["Capability", "InputSpec", "ModelAdapter", "load_model", "resolve_device", "is_onnx"]


def is_onnx(model: Path | str) -> bool:
    return str(model).lower().endswith(".onnx")


def load_model(
    model: Path | str,
    input_spec: InputSpec,
    device: str,
    weights: Path | None = None,
    output_name: str | None = None,
) -> ModelAdapter:
    """`.onnx` through onnxruntime (+ onnx2torch); `.pt`/`.pth`/`.pt2` or `module:factory` through torch."""
    if is_onnx(model):
        from audit.models.onnx_adapter import build_onnx_adapter

        if weights is not None:
            from audit.errors import InputError

            raise InputError(f"--weights {weights}: an ONNX file carries its own weights")
        return build_onnx_adapter(Path(model), input_spec, output_name, device)
    from audit.models.torch_adapter import build_torch_adapter

    return build_torch_adapter(str(model), weights, input_spec, device)
