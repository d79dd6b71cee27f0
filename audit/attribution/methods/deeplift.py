"""DeepLift's rescale rule (Shrikumar et al. 2017) with captum's semantics, as autograd nodes: input and
reference go through the model as one batch, every nonlinearity captum supports gets its rule, and the
attribution is (input - reference) x the multipliers of both halves' target scores. One forward and one
backward pass; captum's per-module clones of inputs and outputs, its hook bookkeeping and its per-call checks
cost twice as much as the passes on a small CNN.

It hooks every nonlinearity, so it only means something when every ReLU is an `nn.ReLU` module and each
nonlinearity module is called once per forward pass; it refuses to run otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from audit.attribution.methods.base import (
    AttributionInputs,
    AttributionMethod,
    ChunkFunction,
)
from audit.attribution.methods.common import (
    AttributionParams,
    AttributionUnsupported,
    Forward,
)
from audit.models.base import Capability

_REUSED = "a nonlinearity module is called more than once per forward pass; DeepLift needs one module per use"


class DeepLift(AttributionMethod):
    name = "deeplift"
    title = "DeepLift (rescale rule)"
    short_title = "DeepLift"
    reference = (
        "Shrikumar, Greenside, Kundaje. Learning Important Features Through Propagating Activation "
        "Differences. ICML 2017."
    )
    order = 90
    requires = frozenset({Capability.GRADIENTS, Capability.HOOKS, Capability.RELU_MODULES})
    needs_baseline = True
    default = True

    def passes(self, params: AttributionParams, height: int, width: int) -> tuple[float, float]:
        return 2.0, 0.0  # the input and its baseline go through together

    def prepare(self, inputs: AttributionInputs) -> ChunkFunction:
        module = inputs.module
        assert module is not None

        def run(xc: Tensor, tc: Tensor, base: Tensor | None) -> Tensor:
            assert base is not None  # needs_baseline: every chunk comes with its baseline
            return deeplift(inputs.forward, module, xc, tc, base)

        return run


def _pool_functions(module: nn.Module) -> tuple[Callable[..., tuple[Tensor, Tensor]], Callable[..., Tensor]]:
    dims = _POOL_DIMS[type(module)]
    return getattr(F, f"max_pool{dims}d"), getattr(F, f"max_unpool{dims}d")


_POOL_DIMS: dict[type[nn.Module], int] = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3}
_DEEPLIFT_RULES: dict[type[nn.Module], str] = {
    **dict.fromkeys((nn.ReLU, nn.ELU, nn.LeakyReLU, nn.Sigmoid, nn.Tanh, nn.Softplus), "rescale"),
    **dict.fromkeys((nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d), "maxpool"),
    nn.Softmax: "softmax",
}


def _local_gradient(module: nn.Module, node: object, inputs: Tensor, grad_output: Tensor) -> Tensor:
    """The module's own input gradient: a ReLU's mask, a max pool's own backward node (it keeps the
    input and indices, not the output), else the module run again with autograd."""
    if type(module) is nn.ReLU:
        return torch.where(inputs > 0, grad_output, torch.zeros((), dtype=grad_output.dtype, device=grad_output.device))
    if type(node).__name__.startswith(("MaxPool2DWithIndices", "MaxPool3DWithIndices")):
        return node(grad_output)  # type: ignore[operator]
    with torch.enable_grad():
        leaf = inputs.detach().requires_grad_(True)
        return torch.autograd.grad(module.forward(leaf.clone()), leaf, grad_output)[0]


class _DeepLiftRule(torch.autograd.Function):
    """Forward: the module's own output, unchanged. Backward: captum's DeepLift multiplier for the
    module (rescale, max-pool or softmax rule) instead of its local gradient, from deltas between
    the input half and the reference half of the batch. As an autograd node it receives the output
    gradient after every downstream rule has rewritten it, which captum 0.9.0's tensor hooks did
    not (captum issue #1104: summation-to-delta failed where a ReLU feeds a MaxPool)."""

    @staticmethod
    def forward(  # type: ignore[no-untyped-def, override]
        ctx, inputs: Tensor, outputs: Tensor, module: nn.Module, eps: float, node: object
    ) -> Tensor:
        """`outputs`: the module's output, detached; `node`: the autograd node that computed it."""
        rule = _DEEPLIFT_RULES[type(module)]
        x_in, ref_in = inputs.chunk(2)
        x_out, ref_out = outputs.chunk(2)
        if rule == "maxpool":
            cross = torch.max(x_out, ref_out)
            delta_out = torch.cat([cross - ref_out, x_out - cross])
            indices = getattr(node, "_saved_result1", None)  # the argmax positions torch kept for its own backward
            if indices is None:
                pool, _ = _pool_functions(module)
                mp = cast(nn.MaxPool2d, module)  # or 1-d, 3-d: the same attributes
                _, indices = pool(inputs, mp.kernel_size, mp.stride, mp.padding, mp.dilation, mp.ceil_mode, True)
            ctx.save_for_backward(inputs, x_in - ref_in, delta_out, indices)
        else:
            ctx.save_for_backward(inputs, x_in - ref_in, x_out - ref_out)
        ctx.module, ctx.rule, ctx.eps, ctx.node = module, rule, eps, node
        ctx.mark_dirty(outputs)  # the output tensor itself, given this node as history: no copy, no view
        return outputs

    @staticmethod
    def backward(  # type: ignore[no-untyped-def, override]
        ctx, grad_output: Tensor
    ) -> tuple[Tensor, None, None, None, None]:
        module, rule = ctx.module, ctx.rule
        if rule == "maxpool":
            inputs, delta_in, delta_out, indices = ctx.saved_tensors
            _, unpool = _pool_functions(module)
            with torch.no_grad():
                unpooled = unpool(grad_output * delta_out, indices, module.kernel_size, module.stride, module.padding,
                                  list(inputs.shape))
                x_part, ref_part = torch.chunk(unpooled, 2)
            ratio = ((x_part + ref_part) / delta_in).expand(2, *delta_in.shape)  # both halves share the multiplier
        else:
            inputs, delta_in, delta_out = ctx.saved_tensors
            ratio = grad_output.unflatten(0, (2, -1)) * delta_out / delta_in
        undefined = abs(delta_in) < ctx.eps
        if bool(undefined.any()):  # input and reference agree (e.g. both zero after a ReLU): the module's own gradient
            local = _local_gradient(module, ctx.node, inputs, grad_output).unflatten(0, (2, -1))
            ratio = torch.where(undefined, local, ratio)
        ratio = ratio.flatten(0, 1)
        if rule == "softmax":
            ratio = ratio - ratio.sum() * 1 / ratio.numel()  # captum's normalisation, over the whole batch
        return ratio, None, None, None, None


def deeplift(forward: Forward | nn.Module, module: nn.Module, x: Tensor, target: Tensor, base: Tensor,
             eps: float = 1e-10) -> Tensor:
    """Raw DeepLift attributions of `x` against `base` for `target`: (N, C, H, W)."""
    called: set[nn.Module] = set()
    inputs: dict[nn.Module, Tensor] = {}

    def before(m: nn.Module, args: tuple[Tensor, ...]) -> tuple[Tensor, ...] | None:
        if m in called:
            raise AttributionUnsupported(_REUSED)
        called.add(m)
        inputs[m] = args[0]
        return (args[0].clone(), *args[1:]) if getattr(m, "inplace", False) else None  # keep the input the rule needs

    def after(m: nn.Module, _args: tuple[Tensor, ...], output: Tensor) -> Tensor:
        return _DeepLiftRule.apply(inputs.pop(m), output.detach(), m, eps, output.grad_fn)

    handles = []
    try:
        for m in module.modules():
            if type(m) in _DEEPLIFT_RULES:
                handles += [m.register_forward_pre_hook(before), m.register_forward_hook(after)]
        scores = forward(torch.cat([x, base]))
        both = torch.cat([target, target])
        gradients = torch.autograd.grad(scores.gather(1, both[:, None]).sum(), x)[0]
    finally:
        for handle in handles:
            handle.remove()
    return (x - base) * gradients
