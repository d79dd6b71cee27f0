"""Model adapters: one entry point that picks the adapter from the model path."""

from __future__ import annotations

from pathlib import Path

from audit.models.base import (
    EMBEDDING_TAP,
    LAYER_TAP,
    OUTPUT_TAP,
    TAP_VOCABULARY,
    Capability,
    InputSpec,
    ModelAdapter,
    resolve_device,
)

__all__ = [
    "EMBEDDING_TAP",
    "LAYER_TAP",
    "OUTPUT_TAP",
    "TAP_VOCABULARY",
    "Capability",
    "InputSpec",
    "ModelAdapter",
    "is_onnx",
    "load_model",
    "resolve_device",
]


def is_onnx(model: Path | str) -> bool:
    return str(model).lower().endswith(".onnx")


def load_model(
    model: Path | str,
    input_spec: InputSpec,
    device: str,
    weights: Path | None = None,
    output_name: str | None = None,
    embedding_layer: str | None = None,
    trust_pickle: bool = False,
) -> ModelAdapter:
    """`.onnx` through onnxruntime (+ onnx2torch); `.pt`/`.pth`/`.pt2` or `module:factory` through torch.

    `embedding_layer` overrides where the `embedding` tap is read, in the terms of each format:
    - torch: the name of the classifier head module (e.g. `fc`, `classifier.6`); the embedding is its
      INPUT, as found automatically (the last nn.Linear). Names are the user's model's own, whatever
      wrappers the adapter adds.
    - ONNX: the name of the embedding tensor itself (e.g. `/Flatten_output_0`); found automatically as
      the data input of the last Gemm or MatMul.
    A name the model lacks does not fail the load: the embedding tap's reason says so
    (`adapter.tap_reason("embedding")`), and only the probes that need it are skipped.

    Loading runs no code the file carries (docs/loading.md says how, per format); `trust_pickle`
    is the one way to accept a torch.export archive with pickled parts.
    """
    if is_onnx(model):
        from audit.models.onnx_adapter import build_onnx_adapter

        if weights is not None:
            from audit.errors import InputError

            raise InputError(f"--weights {weights}: an ONNX file carries its own weights")
        return build_onnx_adapter(Path(model), input_spec, output_name, device, embedding_layer)
    from audit.models.torch_adapter import build_torch_adapter

    return build_torch_adapter(str(model), weights, input_spec, device, embedding_layer, trust_pickle)
