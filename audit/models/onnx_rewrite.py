"""Semantics-preserving ONNX graph rewrites that let onnx2torch convert files it would otherwise refuse.

Old exporters (opset 7 and thereabouts) wrote `auto_pad=SAME_UPPER` on convolutions and pools;
onnx2torch only takes explicit `pads`. torch.onnx's TorchScript exporter deduplicates initializers
with equal values (a freshly initialised network has many: its zero biases, those of the BatchNorms
folded into convolutions included) and hands the copies out through Identity nodes, while onnx2torch
reads Conv / Gemm / BatchNorm parameters from initializers only. The rewrites here compute what the
ONNX spec says the runtime does and write it down explicitly, so the graph computes the same function. Each returns a new model and one line
per change for the adapter's notes; the adapter still checks the converted module against
onnxruntime, so a rewrite that got something wrong withdraws gradients instead of lying.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import onnx
from onnx import helper

PADDED_OPS = ("Conv", "MaxPool", "AveragePool")  # ConvTranspose's SAME is defined on the output; left alone
AUTO_PADS = ("SAME_UPPER", "SAME_LOWER", "VALID")

Dims = Sequence[int | None]


def same_pads(auto_pad: str, sizes: Sequence[int], kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int]) -> list[int]:
    """ONNX `pads` (all begins, then all ends) equivalent to `auto_pad` on an input of spatial `sizes`.

    SAME_*: output = ceil(size / stride), total pad = (output - 1) * stride + (kernel - 1) * dilation + 1 - size;
    an odd total puts the extra pad at the end (SAME_UPPER) or the beginning (SAME_LOWER). A negative
    total (stride beyond the kernel) only leaves trailing input no window reaches, so it becomes 0.
    onnxruntime departs from the spec with dilation (its SAME pools ignore it, its SAME Conv refuses it):
    there the converted module disagrees with onnxruntime and the adapter withdraws gradients.
    """
    if auto_pad == "VALID":
        return [0] * (2 * len(sizes))
    if auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
        raise ValueError(f"auto_pad {auto_pad!r} has no explicit equivalent")
    begins, ends = [], []
    for size, k, s, d in zip(sizes, kernel, strides, dilations, strict=True):
        total = max(0, (-(-size // s) - 1) * s + (k - 1) * d + 1 - size)
        small, large = total // 2, total - total // 2
        begins.append(small if auto_pad == "SAME_UPPER" else large)
        ends.append(large if auto_pad == "SAME_UPPER" else small)
    return begins + ends


def _shapes(model: onnx.ModelProto, input_dims: Mapping[str, Dims]) -> tuple[dict[str, list[int | None]], list[str]]:
    """Static shapes of every value shape inference finds, and the inputs whose open dims `input_dims` filled."""
    probe = copy.deepcopy(model)
    completed = []
    for value in probe.graph.input:
        dims = value.type.tensor_type.shape.dim
        filled = False
        for i, known in enumerate(input_dims.get(value.name, ())):
            if known is not None and i < len(dims) and not dims[i].HasField("dim_value"):
                dims[i].Clear()
                dims[i].dim_value = int(known)
                filled = True
        if filled:
            completed.append(f"{value.name!r} as {[d.dim_value if d.HasField('dim_value') else None for d in dims]}")
    try:
        probe = onnx.shape_inference.infer_shapes(probe)
    except Exception:  # noqa: BLE001 - without inference, nodes fed by graph inputs can still be rewritten
        pass
    shapes: dict[str, list[int | None]] = {t.name: list(t.dims) for t in probe.graph.initializer}
    for value in list(probe.graph.input) + list(probe.graph.value_info) + list(probe.graph.output):
        if value.type.tensor_type.HasField("shape"):
            shapes[value.name] = [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]
    return shapes, completed


def _static(dims: Sequence[int | None]) -> list[int] | None:
    return [d for d in dims if d is not None and d > 0] if dims and all(d is not None and d > 0 for d in dims) else None


def _label(node: onnx.NodeProto, index: int) -> str:
    return f"{node.op_type} {node.name!r}" if node.name else f"{node.op_type} #{index}"


def _attr(node: onnx.NodeProto, name: str) -> list[int] | str | None:
    for attribute in node.attribute:
        if attribute.name == name:
            value = helper.get_attribute_value(attribute)
            return value.decode() if isinstance(value, bytes) else list(value)
    return None


def _kernel(node: onnx.NodeProto, shapes: Mapping[str, list[int | None]]) -> list[int | None]:
    """kernel_shape, or for Conv (where it is optional) the weight's spatial dims."""
    kernel = _attr(node, "kernel_shape")
    if isinstance(kernel, list):
        return list(kernel)
    return list(shapes.get(node.input[1], [])[2:]) if node.op_type == "Conv" and len(node.input) > 1 else []


def explicit_pads(model: onnx.ModelProto, input_dims: Mapping[str, Dims] | None = None) -> tuple[onnx.ModelProto, list[str]]:
    """Replace auto_pad SAME_UPPER / SAME_LOWER / VALID on Conv and pooling nodes by explicit pads.

    SAME_* needs the node's input size: it comes from shape inference on the file's static input shape
    (or `input_dims` where the file leaves a dim open); a node whose size stays unknown is kept as it is.
    """
    targets = [
        i for i, node in enumerate(model.graph.node)
        if node.op_type in PADDED_OPS and node.domain in ("", "ai.onnx") and _attr(node, "auto_pad") in AUTO_PADS
    ]
    if not targets:
        return model, []
    shapes, completed = _shapes(model, input_dims or {})
    rewritten = copy.deepcopy(model)
    changes: list[str] = []
    used_size = False
    for index in targets:
        node = rewritten.graph.node[index]
        auto_pad = str(_attr(node, "auto_pad"))
        kernel = _static(_kernel(node, shapes))
        sizes = _static(shapes.get(node.input[0], [])[2:])
        if kernel is None or (auto_pad != "VALID" and (sizes is None or len(sizes) != len(kernel))):
            continue
        strides, dilations = _attr(node, "strides"), _attr(node, "dilations")
        pads = same_pads(
            auto_pad, sizes or kernel, kernel,  # VALID needs only the rank
            strides if isinstance(strides, list) else [1] * len(kernel),
            dilations if isinstance(dilations, list) else [1] * len(kernel),
        )
        used_size = used_size or auto_pad != "VALID"
        kept = [a for a in node.attribute if a.name not in ("auto_pad", "pads")]
        del node.attribute[:]
        node.attribute.extend([*kept, helper.make_attribute("pads", pads)])
        changes.append(f"{_label(node, index)}: auto_pad {auto_pad} -> pads {pads}")
    if not changes:
        return model, []
    if completed and used_size:
        changes.append(f"pads computed for the audit's input size, the file leaving it open (input {', '.join(completed)})")
    return rewritten, changes


def _is_identity(node: onnx.NodeProto) -> bool:
    return node.op_type == "Identity" and node.domain in ("", "ai.onnx") and len(node.input) == 1 and len(node.output) == 1


def inline_identity_initializers(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """Replace Identity nodes over initializers (and chains of them) by copies of the initializer.

    Each removed Identity's output becomes an initializer of the same name and value, so every consumer
    (and any subgraph) still finds the name, now as the constant onnx2torch wants. An Identity whose
    output is a graph output stays, so the graph keeps its outputs; its consumers in the main graph read
    the initializer instead. In IR < 4 files, where initializers are also graph inputs, the copies are too.
    """
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    graph_outputs = {o.name for o in graph.output}
    root: dict[str, str] = {}  # Identity output -> the initializer it copies
    for node in graph.node:  # topological order: a chain's earlier links come first
        if _is_identity(node) and node.output[0] not in initializers:
            source = root.get(node.input[0], node.input[0])
            if source in initializers:
                root[node.output[0]] = source
    if not root:
        return model, []
    rewritten = copy.deepcopy(model)
    graph = rewritten.graph
    inputs = {i.name: i for i in graph.input}
    kept: list[onnx.NodeProto] = []
    copies: list[onnx.TensorProto] = []
    changes: list[str] = []
    rewired = {name: source for name, source in root.items() if name in graph_outputs}
    for index, node in enumerate(graph.node):
        name = node.output[0] if _is_identity(node) else ""
        if name in root and name not in graph_outputs:
            source = root[name]
            tensor = copy.deepcopy(initializers[source])
            tensor.name = name
            copies.append(tensor)
            if source in inputs:
                graph.input.append(copy.deepcopy(inputs[source]))
                graph.input[-1].name = name
            changes.append(f"{_label(node, index)}: {name!r} is now an initializer, a copy of {source!r}")
            continue
        for i in [i for i, value in enumerate(node.input) if value in rewired]:
            changes.append(f"{_label(node, index)}: reads initializer {rewired[node.input[i]]!r} instead of graph output {node.input[i]!r}")
            node.input[i] = rewired[node.input[i]]
        kept.append(node)
    if not changes:
        return model, []
    del graph.node[:]
    graph.node.extend(kept)
    graph.initializer.extend(copies)
    return rewritten, changes


def rewrite_for_conversion(model: onnx.ModelProto, input_dims: Mapping[str, Dims] | None = None) -> tuple[onnx.ModelProto, list[str]]:
    """Every rewrite onnx2torch needs (Identity over initializers, then explicit pads, whose kernel sizes
    then come straight from the weights), in order; the model is returned untouched if none applies.

    Initializers listed as graph inputs (IR < 4) are otherwise left alone: onnx2torch and the version
    converter both cope with them.
    """
    model, inlined = inline_identity_initializers(model)
    model, padded = explicit_pads(model, input_dims)
    return model, inlined + padded
