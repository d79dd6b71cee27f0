"""One registry of attribution methods, each explaining a target class for a batch, as 2-D maps.

Hook-based methods (Grad-CAM, guided backpropagation, deconvolution, guided Grad-CAM), saliency,
gradient x input and feature ablation run through captum. The methods that evaluate each input
many times, or whose captum bookkeeping cost more than the model, are computed here with captum's
exact semantics, tested equal to direct captum calls: Integrated Gradients, SmoothGrad and
GradientSHAP (same alphas and weights, same random draws in the same order, but the (sample,
input) pairs cut into passes of `internal_batch_size` images whatever the batch, without captum's
per-call bookkeeping and its slow noise draw), DeepLift (captum's rules as autograd nodes, one
forward and one backward pass), occlusion (vectorised windows over a reused buffer) and KernelSHAP
(captum fits one example at a time; here the coalitions are drawn once with captum's own sampler
and shared by the whole batch, and one least-squares solve serves every sample). Inputs are
processed in chunks so a large sample never holds one giant graph (GPU memory was the most common
complaint about attribution tools).

Methods that rewrite ReLU backward passes (guided backprop, deconvolution, guided Grad-CAM) or
hook every nonlinearity (DeepLift) only mean something when every ReLU is an `nn.ReLU` module:
`unsupported_reason` refuses them otherwise, and `attribute` checks again before running, so they
are never reported as if they had run on a model where they silently fall back to plain gradients.
"""

from __future__ import annotations

import contextlib
import math
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from captum import attr as ca  # imported once with the module: the import costs seconds
from captum.attr._utils.approximation_methods import approximation_parameters
from torch import Tensor, nn

from audit.errors import AuditError
from audit.models.base import Capability

Forward = Callable[[Tensor], Tensor]
Normalisation = tuple[Sequence[float], Sequence[float]]

_G, _H, _R = Capability.GRADIENTS, Capability.HOOKS, Capability.RELU_MODULES


class AttributionUnsupported(AuditError):
    """The method cannot run faithfully on this model; the message says why."""


@dataclass(frozen=True)
class Method:
    """What a method needs from the model and how to read its maps; `reference` is cited in the report."""

    name: str
    title: str
    requires: frozenset[Capability]
    gradient: bool  # False: runs on any forward function (onnxruntime included), no autograd
    signed: bool  # whether raw attributions carry sign
    reference: str


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "saliency", "Saliency (gradient magnitude)", frozenset({_G}), True, False,
            "Simonyan, Vedaldi, Zisserman. Deep Inside Convolutional Networks: Visualising Image "
            "Classification Models and Saliency Maps. ICLR workshop 2014.",
        ),
        Method(
            "gradient_x_input", "Gradient x input", frozenset({_G}), True, True,
            "Shrikumar, Greenside, Shcherbina, Kundaje. Not Just a Black Box: Learning Important Features "
            "Through Propagating Activation Differences. arXiv:1605.01713, 2016.",
        ),
        Method(
            "integrated_gradients", "Integrated Gradients", frozenset({_G}), True, True,
            "Sundararajan, Taly, Yan. Axiomatic Attribution for Deep Networks. ICML 2017.",
        ),
        Method(
            "smoothgrad", "SmoothGrad", frozenset({_G}), True, False,
            "Smilkov, Thorat, Kim, Viegas, Wattenberg. SmoothGrad: removing noise by adding noise. "
            "ICML workshop 2017.",
        ),
        Method(
            "gradcam", "Grad-CAM", frozenset({_G, _H}), True, False,
            "Selvaraju, Cogswell, Das, Vedantam, Parikh, Batra. Grad-CAM: Visual Explanations from Deep "
            "Networks via Gradient-based Localization. ICCV 2017.",
        ),
        Method(
            "guided_backprop", "Guided backpropagation", frozenset({_G, _H, _R}), True, True,
            "Springenberg, Dosovitskiy, Brox, Riedmiller. Striving for Simplicity: The All Convolutional "
            "Net. ICLR workshop 2015.",
        ),
        Method(
            "deconvolution", "Deconvolution", frozenset({_G, _H, _R}), True, True,
            "Zeiler, Fergus. Visualizing and Understanding Convolutional Networks. ECCV 2014.",
        ),
        Method(
            "guided_gradcam", "Guided Grad-CAM", frozenset({_G, _H, _R}), True, True,
            "Selvaraju, Cogswell, Das, Vedantam, Parikh, Batra. Grad-CAM: Visual Explanations from Deep "
            "Networks via Gradient-based Localization. ICCV 2017.",
        ),
        Method(
            "deeplift", "DeepLift (rescale rule)", frozenset({_G, _H, _R}), True, True,
            "Shrikumar, Greenside, Kundaje. Learning Important Features Through Propagating Activation "
            "Differences. ICML 2017.",
        ),
        Method(
            "gradient_shap", "GradientSHAP", frozenset({_G}), True, True,
            "Lundberg, Lee. A Unified Approach to Interpreting Model Predictions. NeurIPS 2017.",
        ),
        Method(
            "occlusion", "Occlusion (sliding window)", frozenset(), False, True,
            "Zeiler, Fergus. Visualizing and Understanding Convolutional Networks. ECCV 2014.",
        ),
        Method(
            "feature_ablation", "Feature ablation (grid cells)", frozenset(), False, True,
            "Zeiler, Fergus. Visualizing and Understanding Convolutional Networks. ECCV 2014 "
            "(occlusion of a fixed grid of cells).",
        ),
        Method(
            "kernel_shap", "KernelSHAP (grid cells)", frozenset(), False, True,
            "Lundberg, Lee. A Unified Approach to Interpreting Model Predictions. NeurIPS 2017.",
        ),
    )
}

# Methods that hook modules of the model itself (not just the score function).
_MODULE_METHODS = frozenset({"gradcam", "guided_backprop", "deconvolution", "guided_gradcam", "deeplift"})
_LAYER_METHODS = frozenset({"gradcam", "guided_gradcam"})
_BASELINE_METHODS = frozenset({"integrated_gradients", "deeplift", "occlusion", "feature_ablation"})
_MAGNITUDE = frozenset({"saliency", "smoothgrad"})  # sum of |.| over channels
_PERTURBATION = frozenset({"occlusion", "feature_ablation", "kernel_shap"})
# Checked first: the most specific reason wins (a TorchScript file lacks hooks *and* ReLU modules).
_REASON_ORDER = (Capability.GRADIENTS, Capability.RELU_MODULES, Capability.HOOKS, Capability.NAMED_LAYERS)

_CAPTUM_CHATTER = (
    r"Setting backward hooks on ReLU activations",
    r"Setting forward, backward hooks and attributes on non-linear",
    r"Input Tensor \d+ did not already require gradients",
    r"You are providing multiple inputs for Lime",
)


@dataclass
class AttributionParams:
    """How hard each method works. Defaults suit a CPU smoke run; probes pass profile values.

    `batch_size` inputs are explained per chunk (the graph is freed between chunks).
    `internal_batch_size` bounds the images in one forward pass for methods that evaluate each input
    several times: Integrated Gradients' steps, SmoothGrad's noise samples, GradientSHAP's samples,
    and the perturbations of occlusion, feature ablation and KernelSHAP (`perturbations_per_eval`
    is the most perturbations of one input per pass, lowered to keep within that bound).
    `smoothgrad_stdev` is a fraction of the nominal input range (pixels in [0, 1] through the
    normalisation). `grid` cells per side define the features of feature ablation and KernelSHAP.
    `seed` makes the stochastic methods (SmoothGrad, GradientSHAP, KernelSHAP) reproducible without
    touching the caller's random state.
    """

    ig_steps: int = 32
    internal_batch_size: int = 32
    baseline: Literal["zeros", "blur", "mean"] = "zeros"
    smoothgrad_samples: int = 16
    smoothgrad_stdev: float = 0.15
    shap_samples: int = 16
    kernel_shap_samples: int = 200
    grid: int = 8
    occlusion_window: int | None = None
    occlusion_stride: int | None = None
    perturbations_per_eval: int = 32
    batch_size: int = 32
    layer: str | None = None
    seed: int = 0


def _channel_vector(values: Sequence[float], channels: int, like: Tensor) -> Tensor:
    v = torch.as_tensor(list(values), dtype=like.dtype, device=like.device).reshape(-1)
    if v.numel() == 1:
        v = v.expand(channels)
    if v.numel() != channels:
        raise ValueError(f"normalisation has {v.numel()} values for {channels} channels")
    return v.reshape(1, channels, 1, 1)


def baseline_for(
    x: Tensor,
    kind: str,
    pixel_mean: Tensor | None = None,
    normalisation: Normalisation = ((0.0,), (1.0,)),
    blur_sigma: float | None = None,
) -> Tensor:
    """The reference input, in the model's normalised space, with the shape of `x`.

    "zeros" is a black image in pixel space, i.e. (0 - mean) / std after normalisation (a zero
    tensor would be the mean colour, not black). "blur" is a strongly blurred copy of each input
    (sigma = a tenth of the longer side unless given): it removes the detail the model might use
    while keeping colours (Fong & Vedaldi, ICCV 2017; compared with black by Sturmfels, Lundberg,
    Lee, "Visualizing the Impact of Feature Attribution Baselines", Distill 2020).
    "mean" is the per-channel mean of `x` over the batch and pixels, or `pixel_mean` when given
    (so chunks of one batch share one baseline).
    """
    x = x.detach()
    channels = x.shape[1]
    if kind == "zeros":
        mean = _channel_vector(normalisation[0], channels, x)
        std = _channel_vector(normalisation[1], channels, x)
        return ((0.0 - mean) / std).expand_as(x).contiguous()
    if kind == "mean":
        m = x.mean(dim=(0, 2, 3)) if pixel_mean is None else pixel_mean.to(x)
        return m.reshape(1, channels, 1, 1).expand_as(x).contiguous()
    if kind == "blur":
        sigma = blur_sigma if blur_sigma is not None else max(x.shape[2], x.shape[3]) / 10.0
        return gaussian_blur(x, sigma)
    raise ValueError(f"unknown baseline {kind!r} (zeros, blur, mean)")


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur with replicated borders (no dark frame bleeding in from zero padding)."""
    if sigma <= 0:
        return x.clone()
    radius = max(1, math.ceil(3.0 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = x.shape[1]
    horizontal = kernel.reshape(1, 1, 1, -1).expand(channels, 1, 1, -1)
    vertical = kernel.reshape(1, 1, -1, 1).expand(channels, 1, -1, 1)
    out = F.conv2d(_replicate_pad(x, (radius, radius, 0, 0)), horizontal, groups=channels)
    return F.conv2d(_replicate_pad(out, (0, 0, radius, radius)), vertical, groups=channels)


def _replicate_pad(x: Tensor, pad: tuple[int, int, int, int]) -> Tensor:
    """Replicate padding by indexing, so the pad may be wider than the image (sigma large vs a tiny input)."""
    left, right, top, bottom = pad
    h, w = x.shape[2], x.shape[3]
    cols = torch.arange(-left, w + right, device=x.device).clamp(0, w - 1)
    rows = torch.arange(-top, h + bottom, device=x.device).clamp(0, h - 1)
    return x[:, :, rows][:, :, :, cols]


def find_last_conv(module: nn.Module) -> str | None:
    """Name of the last nn.Conv2d in registration order: Grad-CAM's default layer (Selvaraju et al.)."""
    last = None
    for name, sub in module.named_modules():
        if name and isinstance(sub, nn.Conv2d):
            last = name
    return last


def unsupported_reason(
    method: Method | str,
    capabilities: dict[Capability, str | None],
    module: nn.Module | None,
    layer: str | None = None,
) -> str | None:
    """None if the method can run on this model; otherwise why not, in the adapter's own words."""
    spec = _spec(method)
    for cap in _REASON_ORDER:
        if cap in spec.requires:
            if cap not in capabilities:
                return f"{cap.value}: not declared by this model format"
            if capabilities[cap] is not None:
                return capabilities[cap]
    if spec.name in _MODULE_METHODS and module is None:
        return "no torch module to attach hooks to"
    if spec.name in _LAYER_METHODS:
        assert module is not None
        if layer is not None:
            if layer not in dict(module.named_modules()):
                return f"layer {layer!r} not found in the model"
        elif find_last_conv(module) is None:
            return "no convolution layer for Grad-CAM"
    return None


def positive_mass(maps: np.ndarray | Tensor) -> np.ndarray:
    """clamp(map, 0): the evidence *for* the class, which localisation metrics compare with masks."""
    if isinstance(maps, Tensor):
        maps = maps.detach().cpu().numpy()
    return np.clip(np.asarray(maps, dtype=np.float32), 0.0, None)


def occlusion_geometry(height: int, width: int, params: AttributionParams) -> tuple[tuple[int, int], tuple[int, int]]:
    """Window about 1/8 of each side and stride half the window, unless the params fix them."""
    window = []
    stride = []
    for side in (height, width):
        w = params.occlusion_window or max(1, round(side / 8))
        w = min(w, side)
        s = params.occlusion_stride or max(1, w // 2)
        window.append(w)
        stride.append(min(s, w))
    return (window[0], window[1]), (stride[0], stride[1])


def grid_mask(height: int, width: int, cells: int, device: torch.device | str = "cpu") -> Tensor:
    """(H, W) LongTensor of cell ids, `cells` per side (fewer on tiny inputs), numbered row-major."""
    gy, gx = max(1, min(cells, height)), max(1, min(cells, width))
    rows = torch.arange(height, device=device) * gy // height
    cols = torch.arange(width, device=device) * gx // width
    return rows[:, None] * gx + cols[None, :]


def input_range(normalisation: Normalisation) -> float:
    """Width of the pixel range [0, 1] in normalised space, averaged over channels."""
    return float(np.mean([1.0 / s for s in normalisation[1]]))


class _ScoreModule(nn.Module):
    """Presents a score function as an nn.Module whose only child is the model.

    captum's hook-based methods need a module to hook and to call; the score function (e.g. logits
    from a sigmoid output) is kept out of the module tree so nothing is hooked twice.
    """

    def __init__(self, module: nn.Module, forward: Forward) -> None:
        super().__init__()
        self.inner = module
        self.__dict__["_scores"] = forward

    def forward(self, x: Tensor) -> Tensor:
        return self._scores(x)


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch and numpy (captum draws from both) and restore the caller's random state afterwards."""
    state = np.random.get_state()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            np.random.set_state(state)


def _spec(method: Method | str) -> Method:
    if isinstance(method, Method):
        return method
    try:
        return METHODS[method]
    except KeyError:
        raise ValueError(f"unknown attribution method {method!r} (known: {', '.join(METHODS)})") from None


def _layer(module: nn.Module, params: AttributionParams) -> nn.Module:
    name = params.layer or find_last_conv(module)
    if name is None:
        raise AttributionUnsupported("no convolution layer for Grad-CAM")
    modules = dict(module.named_modules())
    if name not in modules:
        raise AttributionUnsupported(f"layer {name!r} not found in the model")
    return modules[name]


def _reduce(name: str, raw: Tensor) -> Tensor:
    if name in _MAGNITUDE:
        return raw.abs().sum(dim=1)
    if name == "gradcam":
        return raw[:, 0]
    if name in _PERTURBATION:
        # A perturbation removes all channels of a region at once: every channel carries the same
        # value, the region's effect, so the mean keeps that value (a sum would scale it by C).
        return raw.mean(dim=1)
    return raw.sum(dim=1)


def attribute(
    method: str,
    forward: Forward | nn.Module,
    x: Tensor,
    target: Tensor,
    params: AttributionParams,
    normalisation: Normalisation = ((0.0,), (1.0,)),
    module: nn.Module | None = None,
) -> np.ndarray:
    """Explain `target` for every input of `x`: float32 (N, H, W) maps at input resolution.

    `forward` maps normalised NCHW input to per-class scores (N, K); for gradient methods it must
    be differentiable (e.g. `lambda t: interpretation.torch_scores(module(t))`), for occlusion,
    feature ablation and KernelSHAP any function returning a tensor will do (onnxruntime included).
    Hook and layer methods also need `module`, the nn.Module `forward` runs.
    Channel reduction: saliency and SmoothGrad sum |.| (magnitude); Grad-CAM is the ReLU'd class map
    upsampled bilinearly; perturbation methods take the region's effect (channel mean); every other
    signed method sums over channels.
    """
    spec = _spec(method)
    if x.ndim != 4:
        raise ValueError(f"expected NCHW input, got shape {tuple(x.shape)}")
    x = x.detach()
    target = torch.as_tensor(target, dtype=torch.long, device=x.device).reshape(-1)
    if target.numel() != x.shape[0]:
        raise ValueError(f"{target.numel()} targets for {x.shape[0]} inputs")
    if x.shape[0] == 0:
        return np.zeros((0, x.shape[2], x.shape[3]), dtype=np.float32)
    if spec.name in _MODULE_METHODS:
        module = _module_for(spec, forward, module, x)
    pixel_mean = x.mean(dim=(0, 2, 3)) if params.baseline == "mean" else None
    with warnings.catch_warnings(), seeded(params.seed, x.device):
        for pattern in _CAPTUM_CHATTER:
            warnings.filterwarnings("ignore", message=pattern)
        if spec.name == "kernel_shap":
            return _kernel_shap(forward, x, target, params, normalisation, pixel_mean)
        if spec.name == "occlusion":
            return _occlusion(forward, x, target, params, normalisation, pixel_mean)
        run = _runner(spec.name, forward, module, x, params, normalisation, pixel_mean)
        chunk = params.batch_size
        chunk = max(1, chunk)
        maps = []
        for start in range(0, x.shape[0], chunk):
            xc = x[start : start + chunk]
            base = (
                baseline_for(xc, params.baseline, pixel_mean, normalisation)
                if spec.name in _BASELINE_METHODS
                else None
            )
            if spec.gradient:
                xc = xc.clone().requires_grad_(True)
            with torch.enable_grad() if spec.gradient else torch.no_grad():
                raw = run(xc, target[start : start + chunk], base)
            maps.append(_reduce(spec.name, raw.detach()).float().cpu().numpy())
            del raw, xc, base
        return np.concatenate(maps).astype(np.float32, copy=False)


def _module_for(spec: Method, forward: Forward | nn.Module, module: nn.Module | None, x: Tensor) -> nn.Module:
    if module is None:
        if isinstance(forward, nn.Module):
            module = forward
        else:
            raise AttributionUnsupported(f"{spec.name} needs the torch module (pass module=...)")
    if Capability.RELU_MODULES in spec.requires:
        reason = _relu_reason(module, x[:1])
        if reason is not None:
            raise AttributionUnsupported(reason)
    return module


_RELU_REASONS: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[object, ...], str | None]] = weakref.WeakKeyDictionary()


def _relu_reason(module: nn.Module, example: Tensor) -> str | None:
    """`relu_module_reason`, traced once per module structure and input shape: the probe calls the
    method batch after batch on the same model, and each trace is a forward pass."""
    from audit.models.torch_adapter import relu_module_reason

    key = (tuple(example.shape[1:]), *((id(m), type(m), getattr(m, "inplace", None)) for m in module.modules()))
    cached = _RELU_REASONS.get(module)
    if cached is not None and cached[0] == key:
        return cached[1]
    reason = relu_module_reason(module, example)
    _RELU_REASONS[module] = (key, reason)
    return reason


def _hookable(forward: Forward | nn.Module, module: nn.Module) -> nn.Module:
    return forward if forward is module else _ScoreModule(module, forward)


def _runner(
    name: str,
    forward: Forward | nn.Module,
    module: nn.Module | None,
    x: Tensor,
    params: AttributionParams,
    normalisation: Normalisation,
    pixel_mean: Tensor | None,
) -> Callable[[Tensor, Tensor, Tensor | None], Tensor]:
    """Build the captum object once; return chunk -> raw attribution (N, C, H, W) or (N, 1, H, W)."""

    height, width = x.shape[2], x.shape[3]
    budget = max(1, params.internal_batch_size)

    def per_eval(n: int) -> int:
        return max(1, min(params.perturbations_per_eval, budget // n))

    if name == "saliency":
        sal = ca.Saliency(forward)
        return lambda xc, tc, _b: sal.attribute(xc, target=tc, abs=True)
    if name == "gradient_x_input":
        ixg = ca.InputXGradient(forward)
        return lambda xc, tc, _b: ixg.attribute(xc, target=tc)
    if name == "integrated_gradients":
        step_sizes, alphas = (torch.tensor(f(params.ig_steps), dtype=x.dtype, device=x.device)
                              for f in approximation_parameters("gausslegendre"))
        return lambda xc, tc, b: _integrated_gradients(forward, xc, tc, b, step_sizes, alphas, budget)
    if name == "smoothgrad":
        # Raw gradients are averaged and the magnitude taken afterwards (Smilkov et al.): averaging
        # |gradients| would never let the noise cancel.
        stdev = float(params.smoothgrad_stdev * input_range(normalisation))
        return lambda xc, tc, _b: _smoothgrad(forward, xc, tc, params.smoothgrad_samples, stdev, budget)
    if name == "gradcam":
        assert module is not None
        gc = ca.LayerGradCam(forward, _layer(module, params))

        def gradcam(xc: Tensor, tc: Tensor, _b: Tensor | None) -> Tensor:
            coarse = gc.attribute(xc, target=tc, relu_attributions=True)
            if not isinstance(coarse, Tensor) or coarse.ndim != 4:
                raise AttributionUnsupported(
                    f"Grad-CAM layer {params.layer or find_last_conv(module)!r} does not output an N x C x H x W map"
                )
            return ca.LayerAttribution.interpolate(coarse, (height, width), "bilinear")

        return gradcam
    if name in ("guided_backprop", "deconvolution"):
        assert module is not None
        cls = ca.GuidedBackprop if name == "guided_backprop" else ca.Deconvolution
        gb = cls(_hookable(forward, module))
        return lambda xc, tc, _b: gb.attribute(xc, target=tc)
    if name == "guided_gradcam":
        assert module is not None
        ggc = ca.GuidedGradCam(_hookable(forward, module), _layer(module, params))

        def guided_gradcam(xc: Tensor, tc: Tensor, _b: Tensor | None) -> Tensor:
            out = ggc.attribute(xc, target=tc, interpolate_mode="bilinear")
            if out.numel() == 0:  # captum swallows interpolation failures and returns an empty tensor
                raise AttributionUnsupported("Guided Grad-CAM could not upsample the layer's map to the input")
            return out

        return guided_gradcam
    if name == "deeplift":
        assert module is not None
        return lambda xc, tc, b: _deeplift(forward, module, xc, tc, b)  # type: ignore[arg-type]
    if name == "gradient_shap":
        # A fixed reference (black, mean) is a single baseline; with "blur" the blurred copies of the
        # whole batch form the baseline distribution (as SHAP's background set), whatever the chunking.
        reference = baseline_for(x, params.baseline, pixel_mean, normalisation)
        reference = reference if params.baseline == "blur" else reference[:1]
        return lambda xc, tc, _b: _gradient_shap(forward, xc, tc, reference, params.shap_samples, budget)
    if name == "occlusion":
        occ = ca.Occlusion(forward)
        (wh, ww), (sh, sw) = occlusion_geometry(height, width, params)
        return lambda xc, tc, b: occ.attribute(
            xc,
            sliding_window_shapes=(xc.shape[1], wh, ww),
            strides=(1, sh, sw),
            baselines=b,
            target=tc,
            perturbations_per_eval=per_eval(xc.shape[0]),
        )
    if name == "feature_ablation":
        fa = ca.FeatureAblation(forward)
        mask = grid_mask(height, width, params.grid, x.device)[None, None]
        return lambda xc, tc, b: fa.attribute(
            xc, baselines=b, target=tc, feature_mask=mask, perturbations_per_eval=per_eval(xc.shape[0])
        )
    raise ValueError(f"no runner for {name!r}")


def _input_gradients(forward: Forward | nn.Module, inputs: Tensor, target: Tensor) -> Tensor:
    """d score[target] / d input for every row: one forward and one backward pass, nothing kept."""
    with torch.enable_grad():
        inputs = inputs.detach().requires_grad_(True)
        picked = forward(inputs).gather(1, target[:, None]).sum()
        return torch.autograd.grad(picked, inputs)[0]


def _integrated_gradients(forward: Forward | nn.Module, x: Tensor, target: Tensor, base: Tensor, step_sizes: Tensor,
                          alphas: Tensor, budget: int) -> Tensor:
    """Integrated Gradients as captum computes it (Gauss-Legendre alphas and weights, path points
    `base + alpha * (x - base)`), with the (step, input) pairs cut into passes of `budget` images
    whatever the batch, and without captum's per-call bookkeeping, which on a small model cost a
    third as much as the passes themselves."""
    n = x.shape[0]
    diff = x - base
    total = torch.zeros_like(x)
    pairs = torch.arange(len(alphas) * n, device=x.device)
    for start in range(0, len(pairs), budget):
        step, row = pairs[start : start + budget] // n, pairs[start : start + budget] % n
        points = base[row] + alphas[step, None, None, None] * diff[row]
        total.index_add_(0, row, _input_gradients(forward, points, target[row]) * step_sizes[step, None, None, None])
    return total * diff


def _smoothgrad(forward: Forward | nn.Module, x: Tensor, target: Tensor, samples: int, stdev: float, budget: int) -> Tensor:
    """SmoothGrad as captum's NoiseTunnel over Saliency(abs=False) computes it, with the same noise
    draws in the same order (so the same maps for a seed), drawn with `normal_` instead of captum's
    `torch.normal` over a materialised standard-deviation tensor, which is ten times slower and
    cost as much as the model's passes."""
    n = x.shape[0]
    per_pass = max(1, min(samples, budget // n))
    total = torch.zeros_like(x)
    for k in [per_pass] * (samples // per_pass) + ([samples % per_pass] if samples % per_pass else []):
        noisy = x.repeat_interleave(k, dim=0)
        noisy += torch.empty_like(noisy).normal_(0.0, stdev)
        total += _input_gradients(forward, noisy, target.repeat_interleave(k)).view(n, k, *x.shape[1:]).sum(dim=1)
    return total / samples


def _gradient_shap(forward: Forward | nn.Module, x: Tensor, target: Tensor, reference: Tensor, samples: int, budget: int) -> Tensor:
    """GradientSHAP (expected gradients; Lundberg and Lee) as captum computes it with `stdevs=0`: per
    input, `samples` baselines drawn from `reference` and points drawn uniformly on the segment to
    each, numpy's draws in captum's order; the mean of (input - baseline) x gradient. The pairs go
    through the model `budget` images at a time, whatever the batch."""
    n = x.shape[0]
    drawn = torch.as_tensor(np.random.choice(reference.shape[0], samples * n), device=x.device)
    coefficient = torch.tensor(np.random.uniform(0.0, 1.0, samples * n), dtype=x.dtype, device=x.device)
    rows = torch.arange(n, device=x.device).repeat_interleave(samples)
    total = torch.zeros_like(x)
    for start in range(0, samples * n, budget):
        row, base = rows[start : start + budget], reference[drawn[start : start + budget]]
        c = coefficient[start : start + budget].view(-1, 1, 1, 1)
        points = c * x[row] + (1.0 - c) * base
        total.index_add_(0, row, (x[row] - base) * _input_gradients(forward, points, target[row]))
    return total / samples


_REUSED = "a nonlinearity module is called more than once per forward pass; DeepLift needs one module per use"


def _pool_functions(module: nn.Module) -> tuple[Callable[..., tuple[Tensor, Tensor]], Callable[..., Tensor]]:
    dims = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3}[type(module)]
    return getattr(F, f"max_pool{dims}d"), getattr(F, f"max_unpool{dims}d")


_DEEPLIFT_RULES = {
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
    def forward(ctx, inputs: Tensor, outputs: Tensor, module: nn.Module, eps: float, node: object) -> Tensor:  # type: ignore[no-untyped-def, override]
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
                _, indices = pool(inputs, module.kernel_size, module.stride, module.padding, module.dilation, module.ceil_mode, True)  # type: ignore[attr-defined]
            ctx.save_for_backward(inputs, x_in - ref_in, delta_out, indices)
        else:
            ctx.save_for_backward(inputs, x_in - ref_in, x_out - ref_out)
        ctx.module, ctx.rule, ctx.eps, ctx.node = module, rule, eps, node
        ctx.mark_dirty(outputs)  # the output tensor itself, given this node as history: no copy, no view
        return outputs

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None, None, None, None]:  # type: ignore[no-untyped-def, override]
        module, rule = ctx.module, ctx.rule
        if rule == "maxpool":
            inputs, delta_in, delta_out, indices = ctx.saved_tensors
            _, unpool = _pool_functions(module)
            with torch.no_grad():
                x_part, ref_part = torch.chunk(unpool(grad_output * delta_out, indices, module.kernel_size, module.stride,
                                                      module.padding, list(inputs.shape)), 2)
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


def _deeplift(forward: Forward | nn.Module, module: nn.Module, x: Tensor, target: Tensor, base: Tensor,
              eps: float = 1e-10) -> Tensor:
    """DeepLift's rescale rule (Shrikumar et al. 2017) with captum's semantics: input and reference
    go through the model as one batch, every nonlinearity captum supports gets its rule, and the
    attribution is (input - reference) x the multipliers of both halves' target scores. One
    forward and one backward pass; captum's per-module clones of inputs and outputs, its hook
    bookkeeping and its per-call checks cost twice as much as the passes on a small CNN."""
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


def occlusion_boxes(height: int, width: int, params: AttributionParams) -> list[tuple[int, int, int, int]]:
    """(top, bottom, left, right) of every window position, as captum's Occlusion places them.

    Positions start at multiples of the stride; ceil((side - window) / stride) + 1 of them per side,
    the last one cropped at the border when the stride does not divide evenly.
    """
    (wh, ww), (sh, sw) = occlusion_geometry(height, width, params)
    ny = int(np.ceil((height - wh) / sh)) + 1
    nx = int(np.ceil((width - ww) / sw)) + 1
    return [(iy * sh, min(iy * sh + wh, height), ix * sw, min(ix * sw + ww, width)) for iy in range(ny) for ix in range(nx)]


def _occlusion(
    forward: Forward | nn.Module,
    x: Tensor,
    target: Tensor,
    params: AttributionParams,
    normalisation: Normalisation,
    pixel_mean: Tensor | None,
) -> np.ndarray:
    """Occlusion (Zeiler and Fergus 2014) with captum's semantics, vectorised over windows and samples.

    Each window position covers all channels with the baseline; every pixel gets the mean drop of
    the target score over the windows covering it (captum's Occlusion with its feature counts).
    Building all occluded copies of a chunk at once and sending about `internal_batch_size` images
    per call avoids captum's per-perturbation Python bookkeeping, which cost more than the model.
    """
    boxes = occlusion_boxes(x.shape[2], x.shape[3], params)
    masks = torch.zeros(len(boxes), *x.shape[2:], device=x.device, dtype=x.dtype)
    for p, (top, bottom, left, right) in enumerate(boxes):
        masks[p, top:bottom, left:right] = 1.0
    counts = masks.sum(dim=0)
    positions = masks.shape[0]
    out = []
    with torch.no_grad():
        for start in range(0, x.shape[0], max(1, params.batch_size)):
            xc, tc = x[start : start + params.batch_size], target[start : start + params.batch_size]
            n = xc.shape[0]
            base = baseline_for(xc, params.baseline, pixel_mean, normalisation)
            rows = torch.arange(n, device=x.device)
            reference = torch.as_tensor(forward(xc))[rows, tc]
            drops = torch.empty(n, positions, device=x.device)
            per_call = max(1, max(params.internal_batch_size, params.perturbations_per_eval) // n)
            # One buffer of per_call copies, reused: each slot gets its previous window restored and
            # its next window covered, so only two windows are written per image, not whole images.
            buffer = xc.unsqueeze(0).repeat(min(per_call, positions), 1, 1, 1, 1)
            previous: list[tuple[int, int, int, int] | None] = [None] * len(buffer)
            for p0 in range(0, positions, per_call):
                group = boxes[p0 : p0 + per_call]
                for j, (top, bottom, left, right) in enumerate(group):
                    if previous[j] is not None:
                        t, b, l, r = previous[j]  # type: ignore[misc]
                        buffer[j, :, :, t:b, l:r] = xc[:, :, t:b, l:r]
                    buffer[j, :, :, top:bottom, left:right] = base[:, :, top:bottom, left:right]
                    previous[j] = (top, bottom, left, right)
                images = buffer[: len(group)].reshape(-1, *xc.shape[1:])
                scores = torch.as_tensor(forward(images)).reshape(len(group), n, -1)
                drops[:, p0 : p0 + len(group)] = (reference[None] - scores[:, rows, tc]).T
            maps = (drops @ masks.reshape(positions, -1)).reshape(n, *x.shape[2:]) / counts
            out.append(maps.float().cpu().numpy())
    return np.concatenate(out).astype(np.float32, copy=False)


def _kernel_shap(
    forward: Forward | nn.Module,
    x: Tensor,
    target: Tensor,
    params: AttributionParams,
    normalisation: Normalisation,
    pixel_mean: Tensor | None,
) -> np.ndarray:
    """KernelSHAP over grid cells, batched: shared coalitions, batched forwards, one weighted lstsq.

    Coalitions come from captum's own sampler (all features, none, then Shapley-kernel draws), so
    each sample's result equals captum's KernelShap on that sample alone with the same seed; the
    regression is sklearn's weighted least squares with intercept (centre, scale by sqrt(weight)).
    """
    KernelShap = ca.KernelShap
    from torch.distributions.categorical import Categorical

    height, width = x.shape[2], x.shape[3]
    cells = grid_mask(height, width, params.grid, x.device)
    m = int(cells.max()) + 1
    if m < 2:
        raise AttributionUnsupported("KernelSHAP needs at least two grid cells")
    counts = torch.arange(m, dtype=torch.float)
    probs = torch.tensor(float(m - 1)) / (counts * (m - counts))
    probs[0] = 0.0
    sampler = KernelShap(forward).kernel_shap_perturb_generator(
        x, num_select_distribution=Categorical(probs), num_interp_features=m
    )
    coalitions = torch.cat([next(sampler) for _ in range(params.kernel_shap_samples)]).to(x.device)
    s = coalitions.shape[0]
    keep = coalitions[:, cells].bool()  # (S, H, W)
    outputs = torch.empty(s, x.shape[0], dtype=torch.float64)
    chunk = max(1, params.batch_size)
    with torch.no_grad():
        for start in range(0, x.shape[0], chunk):
            xc = x[start : start + chunk]
            tc = target[start : start + chunk]
            base = baseline_for(xc, params.baseline, pixel_mean, normalisation)
            step = max(1, min(params.perturbations_per_eval, max(1, params.internal_batch_size) // xc.shape[0]))
            for s0 in range(0, s, step):
                k = keep[s0 : s0 + step, None, None]  # (s, 1, 1, H, W)
                batch = torch.where(k, xc[None], base[None]).reshape(-1, *xc.shape[1:])
                scores = torch.as_tensor(forward(batch)).reshape(batch.shape[0], -1)
                picked = scores.gather(1, tc.repeat(k.shape[0])[:, None].to(scores.device))
                outputs[s0 : s0 + k.shape[0], start : start + xc.shape[0]] = picked.reshape(k.shape[0], -1).double().cpu()
    z = coalitions.double().cpu().numpy()
    y = outputs.numpy()
    selected = z.sum(axis=1)
    w = np.where((selected == 0) | (selected == m), 1e6, 1.0)
    z_mean = (w[:, None] * z).sum(0) / w.sum()
    y_mean = (w[:, None] * y).sum(0) / w.sum()
    root = np.sqrt(w)[:, None]
    coef = np.linalg.lstsq((z - z_mean) * root, (y - y_mean) * root, rcond=None)[0]  # (M, N)
    return coef.T[:, cells.cpu().numpy()].astype(np.float32)
