"""Layer-wise Relevance Propagation (Bach et al. 2015) with the epsilon rule, through captum's LRP.

captum propagates relevance through the model's leaf modules only, with a rule per layer type
(`SUPPORTED_LAYERS_WITH_RULES`) and the nonlinearities it passes relevance through unchanged
(`SUPPORTED_NON_LINEAR_LAYERS`); it raises on any other leaf. So `unsupported_reason` names every such layer
before anything runs, and `attribute` refuses the same model rather than crash half-way, as it refuses a
layer called twice in one forward pass (its saved activations would be overwritten).

captum's LRP also changes the module it explains: it sets `rule` and `activations` on every layer, deletes
`rule` afterwards (one the user had set included) and leaves `activations` holding the last batch's inputs.
Here each layer gets captum's EpsilonRule for the call only, whatever rule it carried, and every module gets
back exactly the attributes it had.

Not detected: functional operations between layers (a residual `x + y`, `torch.relu`, `x.mean()`), which
relevance crosses as a plain gradient, as in captum.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from captum import attr as ca
from captum.attr._core.lrp import (
    SUPPORTED_LAYERS_WITH_RULES,
    SUPPORTED_NON_LINEAR_LAYERS,
)
from captum.attr._utils.lrp_rules import EpsilonRule
from torch import Tensor, nn

from audit.attribution.methods.base import (
    AttributionInputs,
    AttributionMethod,
    ChunkFunction,
)
from audit.attribution.methods.common import AttributionUnsupported, ScoreModule
from audit.models.base import Capability

# What captum's LRP reads or sets: `rule` on every module (it checks them all), `activations` on its layers.
_ON_MODULES, _ON_LAYERS = ("rule",), ("rule", "activations")
_SUPPORTED = (*SUPPORTED_LAYERS_WITH_RULES, *SUPPORTED_NON_LINEAR_LAYERS)


class LRP(AttributionMethod):
    name = "lrp"
    title = "LRP (epsilon rule)"
    short_title = "LRP"
    reference = (
        "Bach, Binder, Montavon, Klauschen, Müller, Samek. On Pixel-Wise Explanations for Non-Linear "
        "Classifier Decisions by Layer-Wise Relevance Propagation. PLoS ONE 2015."
    )
    order = 105
    requires = frozenset({Capability.GRADIENTS, Capability.HOOKS})
    epsilon: ClassVar[float] = 1e-9  # EpsilonRule's own default, as a direct captum call uses

    def unsupported_reason(
        self, capabilities: Mapping[Capability, str | None], module: nn.Module | None, layer: str | None = None
    ) -> str | None:
        reason = super().unsupported_reason(capabilities, module, layer)
        if reason is None and module is not None:
            reason = layers_reason(module)
        return reason

    def prepare(self, inputs: AttributionInputs) -> ChunkFunction:
        module = inputs.module
        assert module is not None
        reason = layers_reason(module)
        if reason is not None:
            raise AttributionUnsupported(reason)
        layers = leaf_layers(module)
        scores = ScoreModule(module, inputs.forward)
        return lambda xc, tc, _b: _relevance(scores, module, layers, xc, tc, self.epsilon)


def leaf_layers(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """(name, module) of every leaf module, as captum's LRP collects its layers (a leaf model is its own layer)."""
    children = list(module.named_children())
    if not children:
        return [(prefix, module)]
    return [leaf for name, child in children for leaf in leaf_layers(child, f"{prefix}.{name}" if prefix else name)]


def _label(name: str, layer: nn.Module) -> str:
    return f"{f'layer {name!r}' if name else 'the model itself'} ({type(layer).__name__})"


def layers_reason(module: nn.Module) -> str | None:
    """Why captum's LRP cannot explain this module's layers, before running; None when it can."""
    seen: dict[int, str] = {}
    unsupported = []
    for name, layer in leaf_layers(module):
        if id(layer) in seen:
            return f"LRP needs one module per use; layer {name!r} is also registered as {seen[id(layer)]!r}"
        seen[id(layer)] = name
        if type(layer) not in _SUPPORTED:
            unsupported.append(_label(name, layer))
    if not unsupported:
        return None
    supported = ", ".join(t.__name__ for t in _SUPPORTED)
    return f"LRP has no rule for {' or '.join(unsupported)}; captum's LRP covers only {supported}"


def _relevance(scores: ScoreModule, module: nn.Module, layers: list[tuple[str, nn.Module]], xc: Tensor, tc: Tensor,
               epsilon: float) -> Tensor:
    """captum's LRP of one chunk with the epsilon rule on every layer that takes a rule; the module's own
    attributes are put back and every hook removed, whatever happens."""
    names = {layer: name for name, layer in layers}
    touched = {m: _ON_LAYERS if m in names else _ON_MODULES for m in module.modules()}
    kept = {m: {a: m.__dict__[a] for a in attributes if a in m.__dict__} for m, attributes in touched.items()}
    called: set[nn.Module] = set()

    def new_pass(*_args: object) -> None:
        called.clear()

    def once(layer: nn.Module, _args: tuple[Tensor, ...]) -> None:
        if layer in called:
            raise AttributionUnsupported(
                f"layer {names[layer]!r} is called more than once per forward pass; LRP needs one module per use"
            )
        called.add(layer)

    handles = [scores.register_forward_pre_hook(new_pass)]
    try:
        for m, attributes in touched.items():
            for attribute in attributes:
                m.__dict__.pop(attribute, None)
        for _name, layer in layers:
            handles.append(layer.register_forward_pre_hook(once))
            if type(layer) in SUPPORTED_LAYERS_WITH_RULES:
                layer.rule = EpsilonRule(epsilon)
        return ca.LRP(scores).attribute(xc, target=tc)
    finally:
        for handle in handles:
            handle.remove()
        for m, attributes in touched.items():
            for attribute in attributes:
                m.__dict__.pop(attribute, None)
            m.__dict__.update(kept[m])
