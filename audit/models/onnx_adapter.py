"""ONNX models: inference through onnxruntime, gradients through an onnx2torch conversion.

Real-world files are messy: old opsets, auto_pad and initializers shared through Identity nodes
that onnx2torch refuses (see onnx_rewrite), a batch dimension fixed to 1, inputs named anything,
several outputs, channels-last layouts. The adapter copes with each, and when the conversion to torch
fails or disagrees with onnxruntime, gradient capabilities are withdrawn with the reason. Taps
(embedding, layer:TENSOR) never need the conversion: they are extra graph outputs of an onnxruntime
session.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from audit.errors import InputError, ModelLoadError, TapError, first_line
from audit.models.base import (
    EMBEDDING_TAP,
    LAYER_TAP,
    Capability,
    InputSpec,
    ModelAdapter,
    ModelFile,
    closest_names,
)
from audit.models.onnx_rewrite import rewrite_for_conversion

CONVERTER_OPSETS = (17, 13)  # opsets onnx2torch covers well; other files are converted to these first
AGREEMENT_TOLERANCE = 1e-3


LISTED_REWRITES = 4  # rewrite notes listed one by one; an exported ResNet has 16 Identity nodes, EfficientNet 59

def _static_dims(value_info: onnx.ValueInfoProto) -> list[int | str | None]:
    dims: list[int | str | None] = []
    for dim in value_info.type.tensor_type.shape.dim:
        if dim.HasField("dim_value"):
            dims.append(int(dim.dim_value))
        elif dim.HasField("dim_param"):
            dims.append(dim.dim_param)
        else:
            dims.append(None)
    return dims


def _opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return 0


def _external_files(model: onnx.ModelProto, base: Path) -> list[Path]:
    files = set()
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location":
                    files.add((base / entry.value).resolve())
    return sorted(files)


def infer_input_spec(dims: list[int | str | None], name: str, layout: str | None) -> InputSpec:
    """Channels, size and layout from the static input shape, where the file fixes them."""
    spec = InputSpec(name=name)
    if dims and isinstance(dims[0], int) and dims[0] > 0:
        spec.fixed_batch = dims[0]
    if len(dims) == 4:
        c_first, c_last = dims[1], dims[3]
        if layout is None:
            if isinstance(c_first, int) and c_first <= 4:
                layout = "nchw"
            elif isinstance(c_last, int) and c_last <= 4:
                layout = "nhwc"
            else:
                layout = "nchw"
        spec.layout = layout
        c, h, w = (dims[1], dims[2], dims[3]) if layout == "nchw" else (dims[3], dims[1], dims[2])
        spec.channels = c if isinstance(c, int) and c > 0 else None
        if isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0:
            spec.size = (h, w)
    elif len(dims) == 3:
        spec.layout = "nhw"
        spec.channels = 1
        if all(isinstance(d, int) and d > 0 for d in dims[1:]):
            spec.size = (int(dims[1]), int(dims[2]))  # type: ignore[arg-type]
    elif len(dims) == 2:
        spec.layout = "flat"
    else:
        spec.layout = layout or "nchw"
    return spec


def to_model_layout(x: np.ndarray, layout: str | None) -> np.ndarray:
    """NCHW float32 to whatever the graph's input wants."""
    if layout == "nhwc":
        return np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    if layout == "nhw":
        return np.ascontiguousarray(x[:, 0])
    if layout == "flat":
        return np.ascontiguousarray(x.reshape(x.shape[0], -1))
    return x


def _make_session(model: onnx.ModelProto | bytes, providers: list[str], arena: bool = True) -> ort.InferenceSession:
    """`arena=False`: onnxruntime frees its buffers after each call instead of keeping its peak for
    itself, so torch can reuse them (a torch model's forward-only checks alternate with torch's own
    large gradient passes)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.enable_cpu_mem_arena = arena
    # The audit alternates onnxruntime calls with torch work (perturbations, attributions); spinning
    # onnxruntime threads then fight torch's for the cores (measured: 2.3x slower per image on 2 cores).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    data = model if isinstance(model, bytes) else model.SerializeToString()
    return ort.InferenceSession(data, sess_options=options, providers=providers)


def _providers(device: str) -> list[str]:
    available = ort.get_available_providers()
    if device == "cuda" and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _free_batch_dimension(model: onnx.ModelProto, input_name: str) -> onnx.ModelProto:
    """A copy whose input and outputs have a symbolic batch dimension (stale shape hints dropped)."""
    rewritten = copy.deepcopy(model)
    for value in list(rewritten.graph.input) + list(rewritten.graph.output):
        if value.name == input_name or value in rewritten.graph.output:
            dims = value.type.tensor_type.shape.dim
            if len(dims):
                dims[0].Clear()
                dims[0].dim_param = "batch"
    del rewritten.graph.value_info[:]
    return rewritten


def _constant_tensors(graph: onnx.GraphProto) -> set[str]:
    """Initializers and what nodes compute from them alone (Constant, a transposed weight): not data."""
    constant = {t.name for t in graph.initializer}
    for node in graph.node:
        if all(not name or name in constant for name in node.input):
            constant.update(node.output)
    return constant


def classifier_head_input(graph: onnx.GraphProto) -> str | None:
    """The data input of the last Gemm or MatMul in topological order (the order ONNX stores nodes in):
    the classifier head's input in the common architectures, already N x F after their Flatten/Reshape."""
    constant = _constant_tensors(graph)
    for node in reversed(graph.node):
        if node.op_type in ("Gemm", "MatMul"):
            return next((name for name in node.input if name and name not in constant), None)
    return None


class OnnxAdapter(ModelAdapter):
    def __init__(
        self,
        session: ort.InferenceSession,
        input_spec: InputSpec,
        output_index: int,
        files: list[ModelFile],
        capabilities: dict[Capability, str | None],
        device: str,
        notes: list[str],
        output_names: list[str],
        opset: int,
        module: Any | None,
        model: onnx.ModelProto,
        embedding_layer: str | None = None,
    ) -> None:
        """`model` is the graph `session` runs (batch freed where it was): taps add outputs to it.
        `embedding_layer` names the embedding tensor itself (None: the last Gemm/MatMul's data input)."""
        super().__init__(format="onnx", files=files, capabilities=capabilities, input_spec=input_spec, device=device, notes=notes)
        self.session = session
        self.output_index = output_index
        self.output_names = output_names
        self.output_name = output_names[output_index]
        self.opset = opset
        self._module = module
        self.model = model
        self.embedding_layer = embedding_layer
        self._tensors = list(dict.fromkeys(name for node in model.graph.node for name in node.output if name))
        self._tensor_set = set(self._tensors)
        self._embedding = embedding_layer if embedding_layer is not None else classifier_head_input(model.graph)
        self._tap_sessions: dict[frozenset[str], ort.InferenceSession] = {}

    def _missing_tensor(self, name: str) -> str:
        return f"no tensor named {name!r} in the ONNX graph ({closest_names(name, self._tensors, 'tensors')})"

    def embedding_source(self) -> str | None:
        return self._embedding if self.embedding_reason() is None else None

    def embedding_reason(self) -> str | None:
        if self.embedding_layer is not None and self.embedding_layer not in self._tensor_set:
            return f"--embedding-layer: {self._missing_tensor(self.embedding_layer)}"
        if self._embedding is None:
            return "no Gemm or MatMul classifier head found in the ONNX graph; give --embedding-layer (the embedding tensor's name)"
        return None

    def layer_reason(self, name: str | None) -> str | None:
        if name is not None and name not in self._tensor_set:
            return self._missing_tensor(name)
        return None

    def _session_with(self, tensors: list[str]) -> ort.InferenceSession:
        """The plain session, or one (built once per set) whose graph also outputs `tensors`.

        The outputs are appended to the kept ModelProto only while it is serialised, which leaves it as
        it was without copying the weights; onnxruntime infers the new outputs' types and shapes.
        """
        graph_outputs = {o.name for o in self.model.graph.output}
        extra = [name for name in tensors if name not in graph_outputs]
        if not extra:
            return self.session
        key = frozenset(extra)
        if key not in self._tap_sessions:
            outputs = self.model.graph.output
            outputs.extend(onnx.ValueInfoProto(name=name) for name in extra)
            try:
                data = self.model.SerializeToString()
            finally:
                del outputs[len(outputs) - len(extra) :]
            try:
                self._tap_sessions[key] = _make_session(data, self.session.get_providers())
            except Exception as exc:  # noqa: BLE001 - whatever onnxruntime says, it is the tap's reason
                raise TapError(f"taps {', '.join(extra)}: onnxruntime cannot output them ({first_line(exc)})") from None
        return self._tap_sessions[key]

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info["opset"] = self.opset
        info["providers"] = self.session.get_providers()
        return info

    def torch_module(self) -> Any | None:
        return self._module

    def forward(self, x: np.ndarray, taps: frozenset[str] = frozenset()) -> dict[str, np.ndarray]:
        self.check_taps(taps)
        tensors = {t: t[len(LAYER_TAP) :] for t in sorted(taps) if t.startswith(LAYER_TAP)}
        if EMBEDDING_TAP in taps and self._embedding is not None:
            tensors[EMBEDDING_TAP] = self._embedding
        fetch = list(dict.fromkeys([self.output_name, *tensors.values()]))
        session = self._session_with(fetch[1:])
        feed = to_model_layout(x.astype(np.float32, copy=False), self.input_spec.layout)
        size = self.input_spec.fixed_batch
        parts: dict[str, list[np.ndarray]] = {name: [] for name in fetch}
        for start in [0] if size is None else range(0, len(feed), size):
            chunk = feed if size is None else feed[start : start + size]
            real = len(chunk)
            if size is not None and real < size:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], size - real, axis=0)])
            for name, value in zip(fetch, session.run(fetch, {self.input_spec.name: chunk}), strict=True):
                if name != self.output_name and (value.ndim == 0 or value.shape[0] != len(chunk)):
                    tap = next(t for t, n in tensors.items() if n == name)
                    raise TapError(f"tap {tap}: tensor {name!r} has shape {value.shape}, whose first dimension is not the batch of {len(chunk)}")
                parts[name].append(value[:real])
        values = {name: np.concatenate(chunks) for name, chunks in parts.items()}
        result = {"output": values[self.output_name]}
        for tap, name in tensors.items():
            value = values[name].astype(np.float32, copy=False)
            result[tap] = value.reshape(len(x), -1) if tap == EMBEDDING_TAP else value
        return result


def build_onnx_adapter(
    path: Path,
    input_spec_override: InputSpec,
    output_name: str | None,
    device: str,
    embedding_layer: str | None = None,
) -> OnnxAdapter:
    """`embedding_layer` names the embedding tensor itself (None: the data input of the last Gemm/MatMul)."""
    if not path.is_file():
        raise InputError(f"{path}: model file not found")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"{path}: not a readable ONNX file ({first_line(exc)})") from None
    notes: list[str] = []
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        names = ", ".join(i.name for i in inputs) or "none"
        raise ModelLoadError(f"{path}: expected one data input, found {len(inputs)} ({names})")
    graph_input = inputs[0]
    dims = _static_dims(graph_input)
    elem = graph_input.type.tensor_type.elem_type
    if elem not in (onnx.TensorProto.FLOAT, onnx.TensorProto.UNDEFINED):
        raise ModelLoadError(f"{path}: input {graph_input.name!r} has element type {onnx.TensorProto.DataType.Name(elem)}; only float32 inputs are supported")
    spec = infer_input_spec(dims, graph_input.name, input_spec_override.layout)
    for attr in ("channels", "size"):
        given = getattr(input_spec_override, attr)
        found = getattr(spec, attr)
        if given is not None and found is not None and tuple(np.atleast_1d(given)) != tuple(np.atleast_1d(found)):
            raise InputError(f"--{'input-size' if attr == 'size' else attr} {given} contradicts the ONNX input {graph_input.name!r}, which fixes {found}")
        if given is not None:
            setattr(spec, attr, given)

    output_names = [o.name for o in model.graph.output]
    if output_name is None:
        output_index = 0
        if len(output_names) > 1:
            notes.append(f"the model has {len(output_names)} outputs ({', '.join(output_names)}); auditing {output_names[0]!r} (choose with --output-name)")
    elif output_name in output_names:
        output_index = output_names.index(output_name)
    else:
        raise InputError(f"--output-name {output_name!r}: the model's outputs are {', '.join(output_names)}")

    opset = _opset(model)
    providers = _providers(device)
    if device == "cuda" and providers[0] != "CUDAExecutionProvider":
        notes.append("onnxruntime has no CUDA provider here (install onnxruntime-gpu instead of onnxruntime); running on the CPU")
    try:
        session = _make_session(model, providers)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"{path}: onnxruntime cannot load the model ({first_line(exc)})") from None

    if spec.layout == "flat":
        features = dims[1] if isinstance(dims[1], int) else None
        if spec.size is None or spec.channels is None:
            raise InputError(
                f"{path}: the ONNX input {graph_input.name!r} is flat ({features or '?'} features); "
                "give --input-size H W and --channels C so that C x H x W matches"
            )
        if features is not None and spec.channels * spec.size[0] * spec.size[1] != features:
            raise InputError(
                f"{path}: --channels {spec.channels} x --input-size {spec.size[0]} {spec.size[1]} "
                f"gives {spec.channels * spec.size[0] * spec.size[1]} values; the input {graph_input.name!r} takes {features}"
            )
    if spec.size is None:
        raise InputError(f"{path}: the ONNX input {graph_input.name!r} has no fixed size; give --input-size H W")
    if spec.channels is None:
        raise InputError(f"{path}: the ONNX input {graph_input.name!r} has no fixed channel count; give --channels C")

    if spec.fixed_batch is not None:
        session, served, spec.fixed_batch = _try_free_batch(model, session, spec, dims, providers, notes, output_names[output_index])
    else:
        served = model

    files = [ModelFile.of(path)] + [ModelFile.of(f) for f in _external_files(model, path.parent)]
    capabilities, module = _convert(model, session, spec, dims, output_index, device, notes)
    return OnnxAdapter(session, spec, output_index, files, capabilities, device, notes, output_names, opset, module, served, embedding_layer)


def example_input(spec: InputSpec, batch: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    channels = spec.channels or 1
    height, width = spec.size or (1, 1)
    return rng.standard_normal((batch, channels, height, width)).astype(np.float32)


def _try_free_batch(
    model: onnx.ModelProto,
    session: ort.InferenceSession,
    spec: InputSpec,
    dims: list[int | str | None],
    providers: list[str],
    notes: list[str],
    output: str,
) -> tuple[ort.InferenceSession, onnx.ModelProto, int | None]:
    """Rewrite a fixed batch dimension to a symbolic one when results stay identical; else keep it.
    Returns the session, the graph it runs, and the batch size that remains fixed."""
    fixed = spec.fixed_batch
    try:
        freed_model = _free_batch_dimension(model, spec.name)
        freed = _make_session(freed_model, providers)
        x = example_input(spec, fixed + 1) if spec.size else None
        if x is None:
            raise ValueError("input size unknown")
        batched = freed.run([output], {spec.name: to_model_layout(x, spec.layout)})[0]
        singles = []
        for start in range(0, x.shape[0], fixed):
            chunk = x[start : start + fixed]
            if chunk.shape[0] < fixed:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], fixed - chunk.shape[0], axis=0)])
            singles.append(session.run([output], {spec.name: to_model_layout(chunk, spec.layout)})[0])
        reference = np.concatenate(singles)[: x.shape[0]]
        if batched.shape == reference.shape and np.allclose(batched, reference, rtol=1e-4, atol=1e-5):
            notes.append(f"the file fixes the batch size to {fixed}; rewritten to a free batch dimension (checked against {fixed}-sample runs)")
            return freed, freed_model, None
        reason = "results changed"
    except Exception as exc:  # noqa: BLE001
        reason = f"{first_line(exc)}"
    notes.append(f"the file fixes the batch size to {fixed} and cannot be rewritten ({reason}); running in chunks of {fixed}")
    return session, model, fixed


@dataclass(frozen=True)
class _Attempt:
    label: str  # as the failure reason lists it: "as is", "rewritten", "rewritten at opset 17"
    rewritten: bool
    opset: int


def convert_to_torch(
    model: onnx.ModelProto, notes: list[str], input_dims: Mapping[str, Sequence[int | None]] | None = None
) -> tuple[Any | None, str]:
    """onnx2torch on the file as it is, then rewritten (Identity over initializers inlined, explicit pads),
    then rewritten and upgraded to the opsets it covers best (17, 13). The reason on failure quotes the
    attempt that got furthest: the last one onnx2torch itself refused, since it had the most obstacles
    removed already.
    """
    from onnx2torch import convert

    native = _opset(model)
    try:
        rewritten, changes = rewrite_for_conversion(model, input_dims)
    except Exception as exc:  # noqa: BLE001 - a rewrite that cannot run only loses its own attempts
        rewritten, changes = model, []
        notes.append(f"ONNX rewrites for onnx2torch skipped ({first_line(exc)})")
    attempts = [_Attempt("as is", False, native)]
    if changes:
        attempts.append(_Attempt("rewritten", True, native))
    attempts += [_Attempt(f"{'rewritten ' if changes else ''}at opset {v}", bool(changes), v) for v in CONVERTER_OPSETS if v != native]
    converter_error = version_error = ""
    for attempt in attempts:
        source = rewritten if attempt.rewritten else model
        try:
            candidate = source if attempt.opset == native else onnx.version_converter.convert_version(source, attempt.opset)
        except Exception as exc:  # noqa: BLE001
            version_error = version_error or f"opset {native} to {attempt.opset}: {first_line(exc)}"
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                graph_module = convert(candidate)
        except Exception as exc:  # noqa: BLE001
            converter_error = first_line(exc)
            continue
        if attempt.rewritten:
            notes.extend(f"rewritten for onnx2torch: {change}" for change in changes[:LISTED_REWRITES])
            if len(changes) > LISTED_REWRITES:
                notes.append(f"rewritten for onnx2torch: {len(changes) - LISTED_REWRITES} more changes of the same kinds")
        if attempt.opset != native:
            notes.append(f"opset {native} converted to opset {attempt.opset} for onnx2torch")
        return graph_module, ""
    tried = ", ".join(a.label for a in attempts)
    return None, f"onnx2torch cannot convert the model ({converter_error or 'the ONNX version converter failed: ' + version_error}; tried {tried})"


def _declared_dims(spec: InputSpec, dims: list[int | str | None]) -> list[int | None]:
    """The graph input's shape with the open dims the audit's input spec fixes filled in (batch stays open)."""
    height, width = spec.size or (None, None)
    channels = spec.channels
    by_layout: dict[str | None, list[int | None]] = {
        "nchw": [None, channels, height, width],
        "nhwc": [None, height, width, channels],
        "nhw": [None, height, width],
        "flat": [None, channels * height * width if channels and height and width else None],
    }
    wanted = by_layout.get(spec.layout, [])
    if len(wanted) != len(dims):
        return [d if isinstance(d, int) else None for d in dims]
    return [d if isinstance(d, int) else w for d, w in zip(dims, wanted, strict=True)]


def _convert(
    model: onnx.ModelProto,
    session: ort.InferenceSession,
    spec: InputSpec,
    dims: list[int | str | None],
    output_index: int,
    device: str,
    notes: list[str],
) -> tuple[dict[Capability, str | None], Any | None]:
    """onnx2torch conversion, rewritten and upgraded from old opsets if needed, verified against onnxruntime."""
    import torch

    from audit.models.torch_adapter import (
        FixedBatch,
        InputLayout,
        SelectOutput,
        gradient_reason,
        relu_module_reason,
    )

    def unavailable(reason: str) -> tuple[dict[Capability, str | None], None]:
        notes.append(f"gradient probes unavailable: {reason}")
        return {c: reason for c in Capability}, None

    graph_module, reason = convert_to_torch(model, notes, {spec.name: _declared_dims(spec, dims)})
    if graph_module is None:
        return unavailable(reason)
    module: torch.nn.Module = graph_module
    if len(model.graph.output) > 1:
        module = SelectOutput(module, output_index)
    module = InputLayout(module, spec.layout)
    if spec.fixed_batch is not None:
        module = FixedBatch(module, spec.fixed_batch)
    module = module.eval().to(device)
    for p in module.parameters():
        p.requires_grad_(False)

    x = example_input(spec, 2 if spec.fixed_batch is None else spec.fixed_batch)
    try:
        with torch.no_grad():
            torch_out = module(torch.from_numpy(x).to(device)).float().cpu().numpy()
        feed = to_model_layout(x, spec.layout)
        size = spec.fixed_batch or x.shape[0]
        ort_out = session.run([model.graph.output[output_index].name], {spec.name: feed[:size]})[0]
    except Exception as exc:  # noqa: BLE001
        return unavailable(f"the converted model does not run ({first_line(exc)})")
    scale = float(np.abs(ort_out).max()) or 1.0
    diff = float(np.abs(torch_out.reshape(ort_out.shape) - ort_out).max()) / scale if torch_out.size == ort_out.size else float("inf")
    if not diff <= AGREEMENT_TOLERANCE:
        return unavailable(f"the onnx2torch conversion disagrees with onnxruntime (max relative difference {diff:.2g})")
    notes.append(f"converted with onnx2torch for gradient probes (agrees with onnxruntime to {diff:.1g})")
    example = torch.from_numpy(x).to(device)
    capabilities: dict[Capability, str | None] = {
        Capability.GRADIENTS: gradient_reason(module, example),
        Capability.HOOKS: None,
        Capability.NAMED_LAYERS: None,
        Capability.RELU_MODULES: relu_module_reason(module, example),
    }
    return capabilities, module if capabilities[Capability.GRADIENTS] is None else None
