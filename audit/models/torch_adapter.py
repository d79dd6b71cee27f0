"""PyTorch models: TorchScript files, torch.export programs, and Python factories with state dicts."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import math
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

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

if TYPE_CHECKING:
    from audit.models.onnx_forward import OnnxForward


class InputLayout(nn.Module):
    """Lets probes feed NCHW to a model that wants NHWC, N x H x W or flat input."""

    def __init__(self, inner: nn.Module, layout: str | None) -> None:
        super().__init__()
        self.inner = inner
        self.layout = layout

    def forward(self, x: torch.Tensor) -> Any:
        if self.layout == "nhwc":
            x = x.permute(0, 2, 3, 1)
        elif self.layout == "nhw":
            x = x[:, 0]
        elif self.layout == "flat":
            x = x.reshape(x.shape[0], -1)
        out = self.inner(x)
        return out[0] if isinstance(out, (tuple, list)) and len(out) == 1 else out


class SelectOutput(nn.Module):
    """Picks one output of a multi-output module, so captum sees a single tensor."""

    def __init__(self, inner: nn.Module, index: int) -> None:
        super().__init__()
        self.inner = inner
        self.index = index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        if isinstance(out, dict):
            return list(out.values())[self.index]
        if isinstance(out, (tuple, list)):
            return out[self.index]
        return out


class FixedBatch(nn.Module):
    """Runs a model whose batch dimension is fixed: splits the batch, pads the last chunk, concatenates.

    Autograd flows through, so gradient probes work on such models too.
    """

    def __init__(self, inner: nn.Module, size: int) -> None:
        super().__init__()
        self.inner = inner
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = []
        for start in range(0, x.shape[0], self.size):
            chunk = x[start : start + self.size]
            real = chunk.shape[0]
            if real < self.size:
                chunk = torch.cat([chunk, chunk[-1:].expand(self.size - real, *chunk.shape[1:])])
            out = self.inner(chunk)
            out = out[0] if isinstance(out, (tuple, list)) else out
            outputs.append(out[:real])
        return torch.cat(outputs)


WRAPPERS = (InputLayout, SelectOutput, FixedBatch)


def user_model(module: nn.Module) -> nn.Module:
    """The user's model inside the adapter's wrappers: tap names resolve against it, so `fc` means the
    user's `fc` however many wrappers (each adding an `inner.` prefix) sit around it."""
    while isinstance(module, WRAPPERS):
        module = module.inner
    return module


def classifier_head(model: nn.Module) -> str | None:
    """The name of the last nn.Linear in module order: ResNet's fc, VGG's and MobileNet's classifier[-1].
    An unflattened torch.export program's submodules are InterpreterModules: it lists its Linears itself."""
    linears = getattr(model, "_audit_linear_modules", None)
    for name, m in reversed(list(model.named_modules())):
        if name and (name in linears if linears is not None else isinstance(m, nn.Linear)):
            return name
    return None


def _is_linear_type(declared: Any) -> bool:
    """Whether an nn_module_stack type (a class or its dotted name) is nn.Linear or a subclass; a name
    is only looked up among modules already imported, so a model file cannot make the audit import code."""
    if isinstance(declared, str):
        module_name, _, attr = declared.rpartition(".")
        declared = getattr(sys.modules.get(module_name), attr, None)
    return isinstance(declared, type) and issubclass(declared, nn.Linear)


def _exported_linears(program: torch.export.ExportedProgram) -> list[str]:
    """The module paths of the nn.Linear calls in an exported graph, from each node's nn_module_stack."""
    names: list[str] = []
    for node in program.graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        if stack:
            path, declared = list(stack.values())[-1]
            if path and _is_linear_type(declared) and path not in names:
                names.append(path)
    return names


@contextlib.contextmanager
def module_taps(
    model: nn.Module, outputs: dict[str, str], inputs: dict[str, str]
) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Capture, per tap key, what the named submodule returns (`outputs`) or receives (`inputs`), one
    tensor per call, since FixedBatch calls the model once per chunk. Hooks are always released."""
    modules = dict(model.named_modules())
    captured: dict[str, list[torch.Tensor]] = {key: [] for key in [*outputs, *inputs]}

    def keep(key: str, name: str, value: Any) -> None:
        value = value[0] if isinstance(value, (tuple, list)) and value else value
        if not isinstance(value, torch.Tensor):
            raise TapError(f"tap {key}: module {name!r} passes a {type(value).__name__}, not a tensor")
        captured[key].append(value.detach())

    handles = []
    try:
        for key, name in outputs.items():
            handles.append(modules[name].register_forward_hook(lambda _m, _i, out, k=key, n=name: keep(k, n, out)))
        for key, name in inputs.items():
            handles.append(modules[name].register_forward_pre_hook(lambda _m, inp, k=key, n=name: keep(k, n, inp)))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


class _ReluCounter(TorchFunctionMode):
    """Counts ReLU calls, to tell nn.ReLU modules from functional activations."""

    RELU = {torch.relu, torch.relu_, torch.nn.functional.relu, torch.Tensor.relu, torch.Tensor.relu_}

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.depth_in_module = 0
        self.outside = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func in self.RELU:
            self.calls += 1
            if self.depth_in_module == 0:
                self.outside += 1
        return func(*args, **(kwargs or {}))


def relu_module_reason(module: nn.Module, example: torch.Tensor) -> str | None:
    """None when every ReLU runs as an nn.ReLU module; else why guided backprop cannot be trusted."""
    relus = [m for m in module.modules() if isinstance(m, nn.ReLU)]
    inplace = [m for m in relus if m.inplace]  # the adapter switches its own to out-of-place first
    counter = _ReluCounter()
    handles = []
    for m in relus:
        handles.append(m.register_forward_pre_hook(lambda *_: setattr(counter, "depth_in_module", counter.depth_in_module + 1)))
        handles.append(m.register_forward_hook(lambda *_: setattr(counter, "depth_in_module", counter.depth_in_module - 1)))
    try:
        with torch.no_grad(), counter:
            module(example)
    except Exception as exc:  # noqa: BLE001 - any failure means we cannot vouch for the activations
        return f"could not trace the activations ({first_line(exc)})"
    finally:
        for handle in handles:
            handle.remove()
    if counter.outside:
        return f"the model applies ReLU functionally ({counter.outside} call(s) outside nn.ReLU modules)"
    if not relus:
        return "the model has no nn.ReLU modules"
    if inplace:
        return f"{len(inplace)} nn.ReLU module(s) are in-place, which module backward hooks cannot wrap"
    return None


def gradient_reason(module: nn.Module, example: torch.Tensor) -> str | None:
    x = example.clone().requires_grad_(True)
    try:
        with torch.enable_grad():
            out = module(x)
            out = out[0] if isinstance(out, (tuple, list)) else out
            out.float().sum().backward()
    except Exception as exc:  # noqa: BLE001
        return f"backward pass failed ({first_line(exc)})"
    if x.grad is None:
        return "the output does not depend differentiably on the input"
    return None


def load_factory(spec: str) -> tuple[nn.Module, list[Path]]:
    """`package.module:factory` or `path/to/file.py:factory`; returns the module and its source files."""
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise InputError(f"--model {spec}: expected package.module:factory or path/to/file.py:factory")
    files: list[Path] = []
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target).expanduser().resolve()
        if not path.is_file():
            raise InputError(f"--model {spec}: file {path} not found")
        name = f"_model_audit_user_{abs(hash(str(path)))}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        if module_spec is None or module_spec.loader is None:
            raise InputError(f"--model {spec}: cannot import {path}")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        sys.path.insert(0, str(path.parent))
        try:
            module_spec.loader.exec_module(module)
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - user code: sys.exit() there is a failed load, not our exit
            raise ModelLoadError(f"{path}: importing failed ({_user_failure(exc)})") from None
        finally:
            sys.path.remove(str(path.parent))
        files.append(path)
    else:
        try:
            module = importlib.import_module(target)
        except (Exception, SystemExit) as exc:  # noqa: BLE001
            raise ModelLoadError(f"--model {spec}: cannot import {target!r} ({_user_failure(exc)})") from None
        if getattr(module, "__file__", None):
            files.append(Path(module.__file__))
    factory = getattr(module, attr, None)
    if factory is None:
        raise InputError(f"--model {spec}: {target} has no attribute {attr!r}")
    try:
        model = factory() if callable(factory) and not isinstance(factory, nn.Module) else factory
    except (Exception, SystemExit) as exc:  # noqa: BLE001
        raise ModelLoadError(f"--model {spec}: calling {attr}() failed ({_user_failure(exc)})") from None
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"--model {spec}: {attr} returned {type(model).__name__}, not a torch.nn.Module")
    return model, files


def _user_failure(exc: BaseException) -> str:
    if isinstance(exc, SystemExit):
        return f"it called sys.exit({exc.code!r})"
    return first_line(exc)


_STATE_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights")


def load_state_dict(model: nn.Module, weights: Path) -> None:
    """Load weights with weights_only=True (no pickled code runs); tolerate common wrappers."""
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InputError(f"{weights}: weights file not found") from None
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"{weights}: cannot load as a state dict with weights_only=True ({first_line(exc)})") from None
    if isinstance(state, dict):
        for key in _STATE_KEYS:
            if isinstance(state.get(key), dict) and all(isinstance(v, torch.Tensor) for v in state[key].values()):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"{weights}: not a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    own = model.state_dict()
    problems = []
    for label, keys in (
        ("missing keys", [k for k in own if k not in state]),
        ("unexpected keys", [k for k in state if k not in own]),
        ("shape mismatches", [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in state and state[k].shape != own[k].shape]),
    ):
        if keys:
            problems.append(f"{label} {', '.join(keys[:3])}" + (" ..." if len(keys) > 3 else ""))
    if problems:
        raise ModelLoadError(f"{weights}: weights do not fit the model ({'; '.join(problems)})")
    model.load_state_dict(state, strict=True)


class TorchAdapter(ModelAdapter):
    """Any torch callable module; `kind` says which file format it came from."""

    def __init__(
        self,
        module: nn.Module,
        format: str,
        files: list[ModelFile],
        capabilities: dict[Capability, str | None],
        input_spec: InputSpec,
        device: str,
        notes: list[str] | None = None,
        embedding_layer: str | None = None,
    ) -> None:
        super().__init__(format=format, files=files, capabilities=capabilities, input_spec=input_spec, device=device, notes=notes or [])
        self.module = module
        self.output_names = ["output"]
        self.output_name = "output"
        self.embedding_layer = embedding_layer
        self._names = [name for name, _ in user_model(module).named_modules() if name]
        self._head = embedding_layer if embedding_layer is not None else classifier_head(user_model(module))
        self._forward_runtime: tuple[OnnxForward | None, str] | None = None

    def torch_module(self) -> nn.Module | None:
        return self.module if self.capabilities.get(Capability.GRADIENTS) is None else None

    def forward_runtime(self, example: np.ndarray) -> tuple[OnnxForward | None, str]:
        """onnxruntime for forward-only checks when the module exports cleanly (about half torch's time per
        image on 2 CPU cores), built at most once, from the first `example`; the shared pass and taps stay
        in torch. A FixedBatch model is refused: its chunking loop would be frozen into the graph."""
        if self._forward_runtime is None:
            if self.input_spec.fixed_batch is not None:
                runtime, note = None, f"the model only takes batches of {self.input_spec.fixed_batch}"
            else:
                from audit.models.onnx_forward import build_onnx_forward

                runtime, note = build_onnx_forward(self.module, example, self.device)
            self._forward_runtime = (runtime, note if runtime is not None else f"forward-only checks run in torch: {note}")
            self.notes.append(self._forward_runtime[1])
        return self._forward_runtime

    def _hooks_reason(self) -> str | None:
        reason = self.capabilities.get(Capability.HOOKS)
        return None if reason is None else f"taps are read by module hooks: {reason}"

    def _missing_module(self, name: str) -> str:
        return f"the model has no module named {name!r} ({closest_names(name, self._names, 'modules')})"

    def embedding_source(self) -> str | None:
        return self._head if self.embedding_reason() is None else None

    def embedding_reason(self) -> str | None:
        if (reason := self._hooks_reason()) is not None:
            return reason
        if self.embedding_layer is not None and self.embedding_layer not in self._names:
            return f"--embedding-layer: {self._missing_module(self.embedding_layer)}"
        if self._head is None:
            return "no nn.Linear classifier head found; give --embedding-layer (the head module, whose input is the embedding)"
        return None

    def layer_reason(self, name: str | None) -> str | None:
        if (reason := self._hooks_reason()) is not None:
            return reason
        if not self._names:
            return "the model has no named submodules"
        if name is not None and name not in self._names:
            return self._missing_module(name)
        return None

    def forward(self, x: np.ndarray, taps: frozenset[str] = frozenset()) -> dict[str, np.ndarray]:
        self.check_taps(taps)
        layers = {t: t[len(LAYER_TAP) :] for t in taps if t.startswith(LAYER_TAP)}
        heads = {EMBEDDING_TAP: self._head} if EMBEDDING_TAP in taps and self._head is not None else {}
        tensor = torch.from_numpy(np.ascontiguousarray(x)).to(self.device)
        with torch.inference_mode(), module_taps(user_model(self.module), layers, heads) as captured:
            out = self.module(tensor)
        if isinstance(out, (tuple, list)):
            out = out[0]
        result = {"output": out.float().cpu().numpy()}
        names = {**layers, **heads}
        for key, values in captured.items():
            value = self._batch_of(key, names[key], values, len(x))
            result[key] = (value.reshape(len(x), -1) if key == EMBEDDING_TAP else value).float().cpu().numpy()
        return result

    def _batch_of(self, key: str, name: str, values: list[torch.Tensor], n: int) -> torch.Tensor:
        """One tap's captures as an N-row tensor: a FixedBatch model runs once per chunk, the last padded."""
        size = self.input_spec.fixed_batch
        calls = 1 if size is None else math.ceil(n / size)
        if len(values) != calls:
            ran = "did not run" if not values else f"ran {len(values)} times for {calls} call(s) of the model, so its output is ambiguous"
            raise TapError(f"tap {key}: module {name!r} {ran}")
        rows = n if size is None else calls * size
        if any(v.dim() == 0 for v in values) or sum(v.shape[0] for v in values) != rows:
            raise TapError(f"tap {key}: module {name!r} gives shape {tuple(values[0].shape)}, whose first dimension is not the batch")
        return torch.cat(values)[:n]


def _example(spec: InputSpec, device: str) -> torch.Tensor:
    channels = spec.channels or 3
    height, width = spec.size or (32, 32)
    generator = torch.Generator().manual_seed(0)
    return torch.randn(2, channels, height, width, generator=generator).to(device)


def build_torch_adapter(
    model_spec: str,
    weights: Path | None,
    input_spec: InputSpec,
    device: str,
    embedding_layer: str | None = None,
    trust_pickle: bool = False,
) -> TorchAdapter:
    """`embedding_layer` names the head module: the embedding is its input (None: the last nn.Linear);
    `trust_pickle` accepts torch.export archives whose loading unpickles what they carry."""
    path = Path(model_spec)
    suffix = path.suffix.lower()
    notes: list[str] = []
    capabilities: dict[Capability, str | None] = {}
    files: list[Path] = []
    if suffix in (".pt", ".pth") and path.is_file():
        module, files, capabilities = _load_torchscript(path)
        fmt = "torchscript"
        if weights is not None:
            raise InputError(f"--weights {weights}: a TorchScript file carries its own weights; --weights is for model factories")
    elif suffix == ".pt2" and path.is_file():
        module, files, capabilities = _load_exported(path, trust_pickle)
        fmt = "torch.export"
    elif suffix in (".pt", ".pth", ".pt2"):
        raise InputError(f"{path}: model file not found")
    else:
        module, files = load_factory(model_spec)
        fmt = "python"
        if weights is not None:
            load_state_dict(module, weights)
            files.append(weights)
        else:
            notes.append("no --weights given: the factory's own initialisation is audited")
    batch_hint = getattr(module, "_audit_batch_hint", None)
    module = module.eval().to(device)
    inplace = [m for m in module.modules() if isinstance(m, nn.ReLU) and m.inplace]
    for m in inplace:
        m.inplace = False  # same results; module backward hooks (guided backprop, DeepLift) cannot wrap in-place ops
    if inplace:
        notes.append(f"{len(inplace)} in-place nn.ReLU module(s) run out of place, so backward hooks can wrap them (results unchanged)")
    for p in module.parameters():
        p.requires_grad_(False)
    if input_spec.layout in ("nhwc", "nhw", "flat"):
        module = InputLayout(module, input_spec.layout)
    if input_spec.channels is None:
        first_conv = next((m for m in module.modules() if isinstance(m, nn.Conv2d)), None)
        if first_conv is not None:
            input_spec.channels = first_conv.in_channels
    example = _example(input_spec, device)
    if input_spec.size is not None:
        module = _fit_batch(module, example, input_spec, notes, model_spec, batch_hint=batch_hint)
        capabilities.setdefault(Capability.GRADIENTS, gradient_reason(module, example))
        if capabilities.get(Capability.HOOKS, None) is None and Capability.RELU_MODULES not in capabilities:
            capabilities[Capability.RELU_MODULES] = relu_module_reason(module, example)
    else:
        capabilities.setdefault(Capability.GRADIENTS, None)
    capabilities.setdefault(Capability.HOOKS, None)
    named = [n for n, _ in module.named_modules() if n]
    capabilities.setdefault(Capability.NAMED_LAYERS, None if named else "the model has no named submodules")
    capabilities.setdefault(Capability.RELU_MODULES, "not checked: the input size is unknown")
    return TorchAdapter(module, fmt, [ModelFile.of(f) for f in files], capabilities, input_spec, device, notes, embedding_layer)


def _fit_batch(
    module: nn.Module, example: torch.Tensor, spec: InputSpec, notes: list[str], model_spec: str, batch_hint: int | None
) -> nn.Module:
    """Check the model runs on a batch of two; if its batch size is fixed, wrap it in FixedBatch."""
    def runs(m: nn.Module, x: torch.Tensor) -> Exception | None:
        try:
            with torch.no_grad():
                m(x)
        except Exception as exc:  # noqa: BLE001
            return exc
        return None

    odd = torch.cat([example, example[:1]])  # batch of 3: unlike the 1 or 2 a program is often exported with
    error = runs(module, odd)
    if error is None:
        return module
    for size in dict.fromkeys([batch_hint or 1, 1, 2]):
        if runs(module, example[:1].expand(size, *example.shape[1:])) is None:
            spec.fixed_batch = size
            notes.append(f"the model only accepts batches of {size}; it runs in chunks of {size}")
            return FixedBatch(module, size)
    raise ModelLoadError(
        f"{model_spec}: forward pass on a {tuple(example.shape)} input failed ({first_line(error)}); "
        "check --input-size, --channels and --layout"
    )


def _load_torchscript(path: Path) -> tuple[nn.Module, list[Path], dict[Capability, str | None]]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # "torch.jit is deprecated": TorchScript files still exist
            module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # noqa: BLE001
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001
            obj = None
        if isinstance(obj, dict):
            raise InputError(
                f"{path}: this is a state dict, not a TorchScript model; pass --model file.py:factory --weights {path.name}"
            ) from None
        raise ModelLoadError(
            f"{path}: not a TorchScript file ({type(exc).__name__}); pickled nn.Module files are refused because "
            "loading them runs arbitrary code: save with torch.jit.save, torch.export, or use file.py:factory + --weights"
        ) from None
    capabilities: dict[Capability, str | None] = {
        Capability.HOOKS: "TorchScript modules take no hooks",
        Capability.RELU_MODULES: "TorchScript modules take no hooks, so ReLU backward passes cannot be overridden",
    }
    return module, [path], capabilities


def _load_exported(path: Path, trust_pickle: bool = False) -> tuple[nn.Module, list[Path], dict[Capability, str | None]]:
    """A torch.export archive, refused when loading it would unpickle or run what it carries (see
    audit.models.export_archive) unless `trust_pickle`."""
    from audit.models.export_archive import unsafe_parts, weights_only_loads

    if not trust_pickle:
        try:
            unsafe = unsafe_parts(path)
        except ValueError as exc:
            raise ModelLoadError(f"{path}: cannot load torch.export program ({exc})") from None
        if unsafe:
            more = f" (and {len(unsafe) - 1} more)" if len(unsafe) > 1 else ""
            raise ModelLoadError(f"{path}: refused: loading it would unpickle or run code it carries: {unsafe[0]}{more}; "
                                 "re-export without pickled parts, or pass --trust-pickle if you trust whoever made the file")
    try:
        with contextlib.nullcontext() if trust_pickle else weights_only_loads():
            program = torch.export.load(str(path))
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"{path}: cannot load torch.export program ({first_line(exc)})") from None
    capabilities: dict[Capability, str | None] = {}
    example_inputs = getattr(program, "example_inputs", None)
    try:
        module = torch.export.unflatten(program)
    except Exception as exc:  # noqa: BLE001
        module = program.module()
        reason = f"the exported graph could not be unflattened into its submodules ({type(exc).__name__})"
        capabilities[Capability.HOOKS] = reason
        capabilities[Capability.RELU_MODULES] = reason
    else:
        module._audit_linear_modules = _exported_linears(program)
    try:
        module._audit_batch_hint = int(example_inputs[0][0].shape[0])  # type: ignore[index]
    except Exception:  # noqa: BLE001 - the hint is optional
        pass
    return module, [path], capabilities
