"""ONNX rewrites for onnx2torch: explicit pads for auto_pad, checked by hand and against onnxruntime,
Identity over initializers inlined, the adapter's conversion ladder on an old SAME_UPPER file and on a
file nothing can convert, and a torchvision ResNet-18 exported straight from initialisation."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from audit.models import InputSpec, load_model, onnx_adapter
from audit.models.base import Capability
from audit.models.onnx_rewrite import (
    explicit_pads,
    inline_identity_initializers,
    same_pads,
)
from tests.onnx_fixtures import opset7_same_upper, unconvertible


def batch(n: int = 3, size: int = 16, seed: int = 5) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, size, size)).astype(np.float32)


def torch_out(module: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module(torch.from_numpy(x)).numpy()


# (auto_pad, sizes, kernel, strides, dilations, pads): totals worked out by hand from
# output = ceil(size / stride), total = (output - 1) * stride + (kernel - 1) * dilation + 1 - size
PAD_CASES = [
    ("SAME_UPPER", [16], [3], [2], [1], [0, 1]),  # out 8, total 1: the extra pad at the end
    ("SAME_LOWER", [16], [3], [2], [1], [1, 0]),  # ... at the beginning
    ("VALID", [16], [3], [2], [1], [0, 0]),
    ("SAME_UPPER", [5], [3], [1], [1], [1, 1]),  # odd size, stride 1: total 2, symmetric
    ("SAME_LOWER", [5], [3], [1], [1], [1, 1]),
    ("SAME_UPPER", [6], [4], [1], [1], [1, 2]),  # even kernel: total 3
    ("SAME_LOWER", [6], [4], [1], [1], [2, 1]),
    ("SAME_UPPER", [7], [3], [2], [1], [1, 1]),  # odd size, stride 2: out 4, total 2
    ("SAME_UPPER", [15], [2], [2], [1], [0, 1]),  # out 8, total 1
    ("SAME_LOWER", [15], [2], [2], [1], [1, 0]),
    ("SAME_UPPER", [9], [2], [1], [3], [1, 2]),  # dilated kernel spans 4: total 3
    ("SAME_LOWER", [9], [2], [1], [3], [2, 1]),
    ("SAME_UPPER", [10], [3], [2], [2], [1, 2]),  # spans 5, out 5: total 3
    ("SAME_UPPER", [6], [1], [4], [1], [0, 0]),  # stride beyond the kernel: total -1 means no pad
    ("SAME_UPPER", [16, 7], [3, 3], [2, 1], [1, 1], [0, 1, 1, 1]),  # begins for H, W, then ends
    ("VALID", [16, 7], [3, 3], [2, 1], [1, 1], [0, 0, 0, 0]),
]


@pytest.mark.parametrize(("auto_pad", "sizes", "kernel", "strides", "dilations", "pads"), PAD_CASES)
def test_same_pads_by_hand(auto_pad: str, sizes: list[int], kernel: list[int], strides: list[int], dilations: list[int], pads: list[int]) -> None:
    assert same_pads(auto_pad, sizes, kernel, strides, dilations) == pads
    rank = len(sizes)
    outputs = [(n + b + e - ((k - 1) * d + 1)) // s + 1 for n, b, e, k, s, d in zip(sizes, pads[:rank], pads[rank:], kernel, strides, dilations, strict=True)]
    expected = [-(-n // s) if auto_pad != "VALID" else (n - (k - 1) * d - 1) // s + 1 for n, k, s, d in zip(sizes, kernel, strides, dilations, strict=True)]
    assert outputs == expected


def single_node(op: str, auto_pad: str, size: int | str, kernel: int, stride: int) -> onnx.ModelProto:
    inputs, weights = ["x"], []
    if op == "Conv":
        inputs.append("w")
        weights.append(numpy_helper.from_array(np.arange(1, kernel + 1, dtype=np.float32).reshape(1, 1, kernel), "w"))
    node = helper.make_node(op, inputs, ["y"], name="n", kernel_shape=[kernel], strides=[stride], auto_pad=auto_pad)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)], ir_version=6)


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("op", ["Conv", "MaxPool", "AveragePool"])
def test_explicit_pads_compute_what_onnxruntime_computes(op: str) -> None:
    """onnxruntime is the independent witness: the rewritten graph gives the same numbers as auto_pad."""
    for auto_pad, sizes, kernels, strides, dilations, pads in PAD_CASES:
        if len(sizes) > 1 or dilations != [1] or kernels[0] > sizes[0] or (op != "Conv" and kernels[0] < strides[0]):
            continue  # onnxruntime refuses dilated SAME convolutions, ignores dilation in SAME pools, and pads pools by -1 here
        (size,), (kernel,), (stride,) = sizes, kernels, strides
        model = single_node(op, auto_pad, size, kernel, stride)
        rewritten, changes = explicit_pads(model)
        assert changes == [f"{op} 'n': auto_pad {auto_pad} -> pads {pads}"]
        x = np.random.default_rng(size).standard_normal((1, 1, size)).astype(np.float32)
        assert np.array_equal(run(rewritten, x), run(model, x)), (auto_pad, size, kernel, stride)
    assert any(a.name == "auto_pad" for a in model.graph.node[0].attribute)  # the input model is left as it was


def test_open_input_size_keeps_same_pads_unless_the_audit_fixes_it() -> None:
    model = single_node("Conv", "SAME_UPPER", "L", 3, 2)
    assert explicit_pads(model) == (model, [])
    rewritten, changes = explicit_pads(model, {"x": [None, 1, 16]})
    assert changes == [
        "Conv 'n': auto_pad SAME_UPPER -> pads [0, 1]",
        "pads computed for the audit's input size, the file leaving it open (input 'x' as [1, 1, 16])",
    ]
    assert rewritten.graph.input[0].type.tensor_type.shape.dim[2].dim_param == "L"  # only shape inference saw the size
    valid, changes = explicit_pads(single_node("MaxPool", "VALID", "L", 2, 2))
    assert changes == ["MaxPool 'n': auto_pad VALID -> pads [0, 0]"]


def test_opset7_same_upper_file_converts_after_rewrite(tmp_path: Path) -> None:
    fixture = opset7_same_upper(tmp_path / "old.onnx")
    assert onnx.load(str(fixture.path)).ir_version == 3
    adapter = load_model(fixture.path, InputSpec(), "cpu")
    x = batch()
    expected = fixture.reference(x)
    out = adapter.forward(x)["output"]
    assert out.shape == (3, 3) and np.allclose(out, expected, rtol=1e-5, atol=1e-5)
    assert all(reason is None for reason in adapter.capabilities.values()), adapter.notes
    module = adapter.torch_module()
    assert module is not None
    assert np.allclose(torch_out(module, x), out, rtol=1e-5, atol=1e-5)
    assert "rewritten for onnx2torch: Conv 'conv1': auto_pad SAME_UPPER -> pads [0, 0, 1, 1]" in adapter.notes
    assert "rewritten for onnx2torch: MaxPool 'pool1': auto_pad SAME_UPPER -> pads [0, 0, 1, 1]" in adapter.notes
    assert "opset 7 converted to opset 17 for onnx2torch" in adapter.notes


def test_a_wrong_rewrite_is_caught_by_the_check_against_onnxruntime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pads on the wrong side still convert, but disagree with onnxruntime: gradients are withdrawn."""
    def lower(model: onnx.ModelProto, input_dims: Mapping[str, Sequence[int | None]] | None = None) -> tuple[onnx.ModelProto, list[str]]:
        flipped = onnx.ModelProto()
        flipped.CopyFrom(model)
        for attribute in (a for node in flipped.graph.node for a in node.attribute if a.name == "auto_pad"):
            attribute.s = b"SAME_LOWER"
        return explicit_pads(flipped, input_dims)

    monkeypatch.setattr(onnx_adapter, "rewrite_for_conversion", lower)
    adapter = load_model(opset7_same_upper(tmp_path / "old.onnx").path, InputSpec(), "cpu")
    reason = adapter.capabilities[Capability.GRADIENTS]
    assert reason is not None and "disagrees with onnxruntime" in reason
    assert adapter.torch_module() is None


def test_unconvertible_file_runs_on_onnxruntime_without_gradients(tmp_path: Path) -> None:
    fixture = unconvertible(tmp_path / "l2norm.onnx")
    adapter = load_model(fixture.path, InputSpec(), "cpu")
    x = batch(4)
    assert np.allclose(adapter.forward(x)["output"], fixture.reference(x), rtol=1e-5, atol=1e-5)
    assert adapter.torch_module() is None
    reasons = set(adapter.capabilities.values())
    assert len(reasons) == 1 and set(adapter.capabilities) == set(Capability)
    reason = reasons.pop()
    assert reason == (
        "onnx2torch cannot convert the model (NotImplementedError: Converter is not implemented "
        "(OperationDescription(domain='', operation_type='LpNormalization', version=1)); tried as is, at opset 17)"
    )
    assert not any(n.startswith("rewritten for onnx2torch") for n in adapter.notes)


def shared_bias(ir_version: int) -> onnx.ModelProto:
    """Two convolutions on one bias handed out through Identity nodes, the way torch.onnx deduplicates
    equal initializers: a chain (b -> b1 -> b2) and an Identity that is also a graph output."""
    w = numpy_helper.from_array(np.array([[[1.0, -2.0, 0.5]]], dtype=np.float32), "w")
    b = numpy_helper.from_array(np.array([0.25], dtype=np.float32), "b")
    nodes = [
        helper.make_node("Identity", ["b"], ["b1"], name="i1"),
        helper.make_node("Identity", ["b1"], ["b2"], name="i2"),
        helper.make_node("Conv", ["x", "w", "b2"], ["h"], name="c1", pads=[1, 1]),
        helper.make_node("Identity", ["b"], ["bias"], name="i3"),
        helper.make_node("Conv", ["h", "w", "bias"], ["y"], name="c2", pads=[1, 1]),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 1, 8])]
    if ir_version < 4:
        inputs += [helper.make_tensor_value_info(t.name, TensorProto.FLOAT, list(t.dims)) for t in (w, b)]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 1, 8]), helper.make_tensor_value_info("bias", TensorProto.FLOAT, [1])]
    graph = helper.make_graph(nodes, "g", inputs, outputs, [w, b])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 7 if ir_version < 4 else 17)], ir_version=ir_version)


@pytest.mark.parametrize("ir_version", [3, 8])
def test_identity_over_initializers_is_inlined(ir_version: int) -> None:
    from onnx2torch import convert

    model = shared_bias(ir_version)
    with pytest.raises(KeyError):
        convert(model)
    rewritten, changes = inline_identity_initializers(model)
    assert changes == [
        "Identity 'i1': 'b1' is now an initializer, a copy of 'b'",
        "Identity 'i2': 'b2' is now an initializer, a copy of 'b'",
        "Conv 'c2': reads initializer 'b' instead of graph output 'bias'",
    ]
    onnx.checker.check_model(rewritten, full_check=True)
    assert [(n.name, list(n.input)) for n in rewritten.graph.node] == [("c1", ["x", "w", "b2"]), ("i3", ["b"]), ("c2", ["h", "w", "b"])]
    assert [o.name for o in rewritten.graph.output] == ["y", "bias"]
    assert {t.name for t in rewritten.graph.initializer} == {"w", "b", "b1", "b2"}
    if ir_version < 4:
        assert [i.name for i in rewritten.graph.input] == ["x", "w", "b", "b1", "b2"]  # IR 3 lists initializers as inputs
    assert len(model.graph.node) == 5  # the input model is left as it was
    x = np.random.default_rng(0).standard_normal((2, 1, 8)).astype(np.float32)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y, bias = ort.InferenceSession(rewritten.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert np.array_equal(y, session.run(["y"], {"x": x})[0]) and np.array_equal(bias, [0.25])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = convert(rewritten)
    with torch.no_grad():
        assert np.allclose(module(torch.from_numpy(x))[0].numpy(), y, rtol=1e-6, atol=1e-6)
    assert inline_identity_initializers(rewritten)[1] == []  # nothing left to do: the kept Identity feeds only the output


RESNET_SIZE = 64  # ResNet-18 runs at any size from 32 up; small keeps the export and the checks quick


@pytest.fixture(scope="module")
def resnet18_from_init(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    """torchvision's ResNet-18 with random weights, exported the TorchScript way: the zero biases of its
    BatchNorms, folded into the convolutions, come out deduplicated behind Identity nodes, which
    onnx2torch cannot read."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    path = tmp_path_factory.mktemp("resnet") / "resnet18.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 3, RESNET_SIZE, RESNET_SIZE),), str(path), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    return model, path


def test_resnet18_from_init_converts_with_gradients(resnet18_from_init: tuple[torch.nn.Module, Path]) -> None:
    model, path = resnet18_from_init
    identities = sum(n.op_type == "Identity" for n in onnx.load(str(path)).graph.node)
    assert identities > 0  # the exporter artefact this test is about is there
    adapter = load_model(path, InputSpec(), "cpu")
    assert adapter.capabilities[Capability.GRADIENTS] is None, adapter.notes
    assert sum(n.startswith("rewritten for onnx2torch: Identity ") for n in adapter.notes) == 4
    assert f"rewritten for onnx2torch: {identities - 4} more changes of the same kinds" in adapter.notes
    module = adapter.torch_module()
    assert module is not None

    x = batch(2, RESNET_SIZE)
    out = adapter.forward(x)["output"]
    assert np.allclose(torch_out(module, x), out, rtol=1e-4, atol=1e-4)
    assert np.allclose(torch_out(model, x), out, rtol=1e-4, atol=1e-4)

    def input_gradient(net: torch.nn.Module, target: int = 7) -> np.ndarray:
        inputs = torch.from_numpy(x).requires_grad_(True)
        net(inputs)[:, target].sum().backward()
        assert inputs.grad is not None
        return inputs.grad.numpy()

    converted, reference = input_gradient(module), input_gradient(model)
    assert np.allclose(converted, reference, rtol=1e-3, atol=1e-4 * float(np.abs(reference).max()))
