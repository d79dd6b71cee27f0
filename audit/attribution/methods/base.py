"""The base class every attribution method subclasses, the registry its subclasses fill, and the two entry
points that read it: `unsupported_reason` (can this method run on this model?) and `attribute` (run it).

A method is one file in this package with one `AttributionMethod` subclass: defining the class registers it,
and the package imports every file, so adding a method touches nothing else.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from audit.attribution.methods.common import (
    CAPTUM_CHATTER,
    AttributionParams,
    AttributionUnsupported,
    Forward,
    Normalisation,
    Reduction,
    baseline_for,
    capability_reason,
    layer_reason,
    reduce_channels,
    relu_reason,
    seeded,
)
from audit.models.base import Capability

# chunk of inputs, its targets, its baseline (None unless the method declares `needs_baseline`) -> raw (N, C, H, W)
ChunkFunction = Callable[[Tensor, Tensor, Tensor | None], Tensor]

METHODS: dict[str, AttributionMethod] = {}


@dataclass(frozen=True)
class AttributionInputs:
    """One `attribute` call, checked: detached NCHW `x`, one long target per input, the module for methods
    that hook it (None for the others), and the batch's mean colour when the baseline is "mean"."""

    forward: Forward | nn.Module
    x: Tensor
    target: Tensor
    params: AttributionParams
    normalisation: Normalisation
    module: nn.Module | None
    pixel_mean: Tensor | None


class AttributionMethod:
    """One attribution algorithm: what it needs from the model, how to read its maps, how to compute them.

    A subclass that sets `name` is registered in `METHODS` (in `order`) as a single instance. What it
    declares is all the rest of the package reads:

    - `requires`: model capabilities; `Capability.GRADIENTS` makes it a gradient method (autograd through a
      torch module), `Capability.HOOKS` means it hooks the module itself (so it needs `module`),
      `Capability.RELU_MODULES` that every ReLU must be an `nn.ReLU` module (checked again before running).
    - `needs_layer`: explains a layer (`params.layer`, else the last convolution).
    - `needs_baseline`: is given each chunk's `params.baseline` reference input.
    - `stochastic`: draws random numbers (noise, samples, coalitions); its maps depend on `params.seed`.
    - `reduction`: how raw channels become one map; `signed`: whether the map's sign means something.
    - `default`: in the attribution probe's default list; `fallback`: run through the model's own runtime
      when gradients are unavailable; `order`: the display order.
    - `title`, `short_title` (column headers, captions) and `reference` (cited in the report).

    `prepare` builds whatever a call needs once and returns the chunk function; the default `attribute`
    feeds it chunks of `params.batch_size` inputs. Methods that batch across inputs themselves override
    `attribute`; methods with checks beyond their declarations extend `unsupported_reason`.
    """

    name: ClassVar[str]
    title: ClassVar[str]
    short_title: ClassVar[str]
    reference: ClassVar[str]
    order: ClassVar[int]
    requires: ClassVar[frozenset[Capability]] = frozenset()
    needs_layer: ClassVar[bool] = False
    needs_baseline: ClassVar[bool] = False
    stochastic: ClassVar[bool] = False
    reduction: ClassVar[Reduction] = "sum"
    signed: ClassVar[bool] = True
    default: ClassVar[bool] = False
    fallback: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            _register(cls())

    @property
    def gradient(self) -> bool:
        """True: needs autograd through a torch module. False: runs on any forward function (onnxruntime included)."""
        return Capability.GRADIENTS in self.requires

    @property
    def needs_module(self) -> bool:
        """Hooks modules of the model itself, not just the score function."""
        return Capability.HOOKS in self.requires

    def __repr__(self) -> str:
        return f"<attribution method {self.name!r}>"

    def passes(self, params: AttributionParams, height: int, width: int) -> tuple[float, float]:
        """(forward+backward, forward-only) images the method pushes through the model per explained
        image: what the audit's cost estimate and the benchmarks count. One gradient, or one forward."""
        return (1.0, 0.0) if self.gradient else (0.0, 1.0)

    def unsupported_reason(
        self, capabilities: Mapping[Capability, str | None], module: nn.Module | None, layer: str | None = None
    ) -> str | None:
        """None if the method can run on this model; otherwise why not, in the adapter's own words."""
        reason = capability_reason(self.requires, capabilities)
        if reason is not None:
            return reason
        if self.needs_module and module is None:
            return "no torch module to attach hooks to"
        if self.needs_layer:
            return "no torch module to find the layer in" if module is None else layer_reason(module, layer)
        return None

    def prepare(self, inputs: AttributionInputs) -> ChunkFunction:
        """Build the call's captum object (or other state) once; return chunk -> raw attribution."""
        raise NotImplementedError(f"{type(self).__name__} defines neither prepare nor attribute")

    def attribute(self, inputs: AttributionInputs) -> np.ndarray:
        """float32 (N, H, W) maps: chunks of `params.batch_size` inputs through `prepare`'s function, each
        graph freed before the next chunk."""
        x, target, params = inputs.x, inputs.target, inputs.params
        run = self.prepare(inputs)
        chunk = max(1, params.batch_size)
        maps = []
        for start in range(0, x.shape[0], chunk):
            xc = x[start : start + chunk]
            base = (
                baseline_for(xc, params.baseline, inputs.pixel_mean, inputs.normalisation)
                if self.needs_baseline
                else None
            )
            if self.gradient:
                xc = xc.clone().requires_grad_(True)
            with torch.enable_grad() if self.gradient else torch.no_grad():
                raw = run(xc, target[start : start + chunk], base)
            maps.append(reduce_channels(self.reduction, raw.detach()).float().cpu().numpy())
            del raw, xc, base
        return np.concatenate(maps).astype(np.float32, copy=False)


def _register(method: AttributionMethod) -> None:
    """Add `method` to METHODS, kept in display order in place (modules that imported METHODS see it)."""
    for attribute in ("title", "short_title", "reference", "order"):
        if not hasattr(method, attribute):
            raise TypeError(f"attribution method {method.name!r} does not declare {attribute}")
    known = METHODS.get(method.name)
    if known is not None and _qualified(known) != _qualified(method):  # the same class again: a module reloaded
        raise ValueError(
            f"attribution method {method.name!r} is declared by {_qualified(known)} and {_qualified(method)}"
        )
    METHODS[method.name] = method
    ordered = sorted(METHODS.values(), key=lambda m: (m.order, m.name))
    METHODS.clear()
    METHODS.update((m.name, m) for m in ordered)


def _qualified(method: AttributionMethod) -> str:
    return f"{type(method).__module__}.{type(method).__qualname__}"


def method_spec(method: AttributionMethod | str) -> AttributionMethod:
    """The registered method of that name (a method passes through)."""
    if isinstance(method, AttributionMethod):
        return method
    try:
        return METHODS[method]
    except KeyError:
        raise ValueError(f"unknown attribution method {method!r} (known: {', '.join(METHODS)})") from None


def default_methods() -> list[str]:
    """The methods the attribution probe runs unless told otherwise, in display order."""
    return [name for name, method in METHODS.items() if method.default]


def fallback_methods() -> list[str]:
    """The perturbation methods that run through the model's own runtime when it cannot be differentiated."""
    return [name for name, method in METHODS.items() if method.fallback]


def unsupported_reason(
    method: AttributionMethod | str,
    capabilities: Mapping[Capability, str | None],
    module: nn.Module | None,
    layer: str | None = None,
) -> str | None:
    """None if the method can run on this model; otherwise why not, in the adapter's own words."""
    return method_spec(method).unsupported_reason(capabilities, module, layer)


def attribute(
    method: AttributionMethod | str,
    forward: Forward | nn.Module,
    x: Tensor,
    target: Tensor,
    params: AttributionParams,
    normalisation: Normalisation = ((0.0,), (1.0,)),
    module: nn.Module | None = None,
) -> np.ndarray:
    """Explain `target` for every input of `x`: float32 (N, H, W) maps at input resolution.

    `forward` maps normalised NCHW input to per-class scores (N, K); for gradient methods it must
    be differentiable (e.g. `lambda t: interpretation.torch_scores(module(t))`), for perturbation
    methods any function returning a tensor will do (onnxruntime included). Methods that hook the
    model also need `module`, the nn.Module `forward` runs. Each method reduces channels as it
    declares (`AttributionMethod.reduction`). Random draws are seeded with `params.seed` and the
    caller's random state is restored afterwards.
    """
    spec = method_spec(method)
    if x.ndim != 4:
        raise ValueError(f"expected NCHW input, got shape {tuple(x.shape)}")
    x = x.detach()
    target = torch.as_tensor(target, dtype=torch.long, device=x.device).reshape(-1)
    if target.numel() != x.shape[0]:
        raise ValueError(f"{target.numel()} targets for {x.shape[0]} inputs")
    if x.shape[0] == 0:
        return np.zeros((0, x.shape[2], x.shape[3]), dtype=np.float32)
    if spec.needs_module:
        module = _module_for(spec, forward, module, x)
    pixel_mean = x.mean(dim=(0, 2, 3)) if params.baseline == "mean" else None
    inputs = AttributionInputs(forward, x, target, params, normalisation, module, pixel_mean)
    with warnings.catch_warnings(), seeded(params.seed, x.device):
        for pattern in CAPTUM_CHATTER:
            warnings.filterwarnings("ignore", message=pattern)
        return spec.attribute(inputs)


def _module_for(
    spec: AttributionMethod, forward: Forward | nn.Module, module: nn.Module | None, x: Tensor
) -> nn.Module:
    """The module to hook; methods that need ReLU modules are refused here, before running, where they
    would silently fall back to plain gradients."""
    if module is None:
        if isinstance(forward, nn.Module):
            module = forward
        else:
            raise AttributionUnsupported(f"{spec.name} needs the torch module (pass module=...)")
    if Capability.RELU_MODULES in spec.requires:
        reason = relu_reason(module, x[:1])
        if reason is not None:
            raise AttributionUnsupported(reason)
    return module
