"""Small ONNX files shaped like the real-world ones the adapter must cope with, built with onnx.helper.

Each writer returns the path and a torch reference of what the graph computes, so a test can check
onnxruntime and any converted module against arithmetic written independently of ONNX.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

CLASSES = 3
CHANNELS = 4


@dataclass(frozen=True)
class OnnxFixture:
    path: Path
    weights: dict[str, np.ndarray]
    reference: Callable[[np.ndarray], np.ndarray]  # NCHW float32 batch -> logits, computed in torch


def _weights(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "conv1_w": (rng.standard_normal((CHANNELS, 3, 3, 3)) * 0.5).astype(np.float32),
        "conv1_b": (rng.standard_normal(CHANNELS) * 0.1).astype(np.float32),
        "fc_w": rng.standard_normal((CLASSES, CHANNELS)).astype(np.float32),
        "fc_b": (rng.standard_normal(CLASSES) * 0.1).astype(np.float32),
    }


def _save(nodes: list[onnx.NodeProto], weights: dict[str, np.ndarray], path: Path, batch: int | str, opset: int, ir_version: int,
          size: int, weights_as_inputs: bool) -> None:
    inputs = [helper.make_tensor_value_info("data", TensorProto.FLOAT, [batch, 3, size, size])]
    if weights_as_inputs:  # IR 3 files listed every initializer as a graph input too
        inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, a.shape) for n, a in weights.items()]
    graph = helper.make_graph(
        nodes, "classifier", inputs,
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, CLASSES])],
        [numpy_helper.from_array(a, n) for n, a in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version, producer_name="fixture")
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _head(features: torch.Tensor, t: dict[str, torch.Tensor]) -> np.ndarray:
    return (features.mean((2, 3)) @ t["fc_w"].T + t["fc_b"]).numpy()


def opset7_same_upper(path: Path, size: int = 16, seed: int = 0) -> OnnxFixture:
    """Opset 7, IR 3, batch fixed to 1; Conv (stride 2) and MaxPool both SAME_UPPER with asymmetric pads.

    With an even size, stride 2 and kernel 3, SAME_UPPER needs one pad row and column, all at the end:
    the case onnx2torch refuses and a naive symmetric pad gets wrong.
    """
    weights = _weights(seed)
    nodes = [
        helper.make_node("Conv", ["data", "conv1_w", "conv1_b"], ["c1"], name="conv1", kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER"),
        helper.make_node("GlobalAveragePool", ["p1"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten", axis=1),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"], name="fc", transB=1),
    ]
    _save(nodes, weights, path, 1, opset=7, ir_version=3, size=size, weights_as_inputs=True)

    def reference(x: np.ndarray) -> np.ndarray:
        t = {k: torch.from_numpy(v) for k, v in weights.items()}
        h = torch.from_numpy(x)
        h = F.conv2d(F.pad(h, _same_upper_pads(h.shape[-1], 3, 2)), t["conv1_w"], t["conv1_b"], stride=2).relu()
        h = F.max_pool2d(F.pad(h, _same_upper_pads(h.shape[-1], 3, 2), value=float("-inf")), 3, stride=2)
        return _head(h, t)

    return OnnxFixture(path, weights, reference)


def _same_upper_pads(size: int, kernel: int, stride: int) -> tuple[int, int, int, int]:
    """F.pad order (left, right, top, bottom) for a square input, written out from the ONNX formula."""
    total = max(0, (-(-size // stride) - 1) * stride + kernel - size)
    return (total // 2, total - total // 2) * 2


def unconvertible(path: Path, size: int = 16, seed: int = 1) -> OnnxFixture:
    """Opset 13 classifier with an L2 normalisation across channels (LpNormalization), as SSD-style
    and embedding networks use; onnxruntime runs it, onnx2torch has no converter for the op at any opset.
    """
    weights = _weights(seed)
    nodes = [
        helper.make_node("Conv", ["data", "conv1_w", "conv1_b"], ["c1"], name="conv1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("LpNormalization", ["c1"], ["n1"], name="l2norm", axis=1, p=2),
        helper.make_node("Relu", ["n1"], ["r1"], name="relu1"),
        helper.make_node("GlobalAveragePool", ["r1"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten", axis=1),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"], name="fc", transB=1),
    ]
    _save(nodes, weights, path, "N", opset=13, ir_version=7, size=size, weights_as_inputs=False)

    def reference(x: np.ndarray) -> np.ndarray:
        t = {k: torch.from_numpy(v) for k, v in weights.items()}
        h = F.conv2d(torch.from_numpy(x), t["conv1_w"], t["conv1_b"], padding=1)
        h = (h / h.norm(dim=1, keepdim=True)).relu()
        return _head(h, t)

    return OnnxFixture(path, weights, reference)
