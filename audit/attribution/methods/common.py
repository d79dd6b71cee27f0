"""What every attribution method shares: its parameters, reference inputs, the capability-check order, channel
reduction, seeding, and the small torch helpers several methods call.

Nothing here names a method: a method file declares what it needs and these helpers serve the declaration.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from audit.errors import AuditError
from audit.models.base import Capability

Forward = Callable[[Tensor], Tensor]
Normalisation = tuple[Sequence[float], Sequence[float]]
# How a raw (N, C, H, W) attribution becomes an (N, H, W) map: "sum" of signed channels, "magnitude" (sum of |.|),
# "mean" (a perturbation's region effect, the same in every channel) or "first" (a method that yields one channel).
Reduction = Literal["sum", "magnitude", "mean", "first"]

# Checked first: the most specific reason wins (a TorchScript file lacks hooks *and* ReLU modules).
REASON_ORDER = (Capability.GRADIENTS, Capability.RELU_MODULES, Capability.HOOKS, Capability.NAMED_LAYERS)

CAPTUM_CHATTER = (
    r"Setting backward hooks on ReLU activations",
    r"Setting forward, backward hooks and attributes on non-linear",
    r"Input Tensor \d+ did not already require gradients",
    r"You are providing multiple inputs for Lime",
)


class AttributionUnsupported(AuditError):
    """The method cannot run faithfully on this model; the message says why."""


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
    occlusion_fine_side: int | None = None
    perturbations_per_eval: int = 32
    batch_size: int = 32
    layer: str | None = None
    seed: int = 0


def capability_reason(requires: frozenset[Capability], capabilities: Mapping[Capability, str | None]) -> str | None:
    """The adapter's own reason for the first capability in `REASON_ORDER` that `requires` names and the model lacks."""
    for cap in REASON_ORDER:
        if cap in requires:
            if cap not in capabilities:
                return f"{cap.value}: not declared by this model format"
            if capabilities[cap] is not None:
                return capabilities[cap]
    return None


def reduce_channels(reduction: Reduction, raw: Tensor) -> Tensor:
    """(N, C, H, W) -> (N, H, W) as the method declared."""
    if reduction == "magnitude":
        return raw.abs().sum(dim=1)
    if reduction == "first":
        return raw[:, 0]
    if reduction == "mean":
        # A perturbation removes all channels of a region at once: every channel carries the same
        # value, the region's effect, so the mean keeps that value (a sum would scale it by C).
        return raw.mean(dim=1)
    return raw.sum(dim=1)


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


def layer_reason(module: nn.Module, layer: str | None) -> str | None:
    """Why a layer method cannot find its layer (`layer`, else the last convolution); None when it can."""
    if layer is not None:
        if layer not in dict(module.named_modules()):
            return f"layer {layer!r} not found in the model"
    elif find_last_conv(module) is None:
        return "no convolution layer for Grad-CAM"
    return None


def target_layer(module: nn.Module, params: AttributionParams) -> nn.Module:
    """The layer a layer method explains: `params.layer`, else the last convolution."""
    name = params.layer or find_last_conv(module)
    if name is None:
        raise AttributionUnsupported("no convolution layer for Grad-CAM")
    modules = dict(module.named_modules())
    if name not in modules:
        raise AttributionUnsupported(f"layer {name!r} not found in the model")
    return modules[name]


def positive_mass(maps: np.ndarray | Tensor) -> np.ndarray:
    """clamp(map, 0): the evidence *for* the class, which localisation metrics compare with masks."""
    if isinstance(maps, Tensor):
        maps = maps.detach().cpu().numpy()
    return np.clip(np.asarray(maps, dtype=np.float32), 0.0, None)


def occlusion_geometry(height: int, width: int, params: AttributionParams) -> tuple[tuple[int, int], tuple[int, int]]:
    """Window and stride of the occluding patch, unless the params fix them: the fine grid (window
    about 1/8 of each side, stride half of it: 15 positions a side, 225 windows) on inputs of at
    most `occlusion_fine_side` pixels a side (None: at any size). Larger inputs get fewer, larger
    windows, as many as keep the fine grid's cost in pixels at that side (each window is one
    forward pass over the whole image) and at least 4 a side: 6 a side (36 windows) at 224 px for a fine side of 96,
    where the fine grid would take 225 passes per image."""
    fine = params.occlusion_fine_side
    coarse = fine is not None and height * width > fine * fine
    positions = max(4, int(15 * fine / math.sqrt(height * width))) if coarse else 0  # type: ignore[operator]
    window = []
    stride = []
    for side in (height, width):
        if coarse:
            step = math.ceil(side / (positions + 1))
            w, s = params.occlusion_window or min(side, 2 * step), params.occlusion_stride or step
        else:
            w = params.occlusion_window or max(1, round(side / 8))
            s = params.occlusion_stride or max(1, min(w, side) // 2)
        w = min(w, side)
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


def perturbations_per_eval(params: AttributionParams, n: int) -> int:
    """Perturbations of each of `n` inputs per forward pass, so one pass holds at most `internal_batch_size` images."""
    return max(1, min(params.perturbations_per_eval, max(1, params.internal_batch_size) // n))


class ScoreModule(nn.Module):
    """Presents a score function as an nn.Module whose only child is the model.

    captum's hook-based methods need a module to hook and to call; the score function (e.g. logits
    from a sigmoid output) is kept out of the module tree so nothing is hooked twice.
    """

    _scores: Forward

    def __init__(self, module: nn.Module, forward: Forward) -> None:
        super().__init__()
        self.inner = module
        self.__dict__["_scores"] = forward

    def forward(self, x: Tensor) -> Tensor:
        return self._scores(x)


def hookable(forward: Forward | nn.Module, module: nn.Module) -> nn.Module:
    """The module captum should hook and call: `forward` itself when it is the module, else a ScoreModule."""
    return forward if forward is module else ScoreModule(module, forward)


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


def input_gradients(forward: Forward | nn.Module, inputs: Tensor, target: Tensor) -> Tensor:
    """d score[target] / d input for every row: one forward and one backward pass, nothing kept."""
    with torch.enable_grad():
        inputs = inputs.detach().requires_grad_(True)
        picked = forward(inputs).gather(1, target[:, None]).sum()
        return torch.autograd.grad(picked, inputs)[0]


_RELU_REASONS: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[object, ...], str | None]] = weakref.WeakKeyDictionary()


def relu_reason(module: nn.Module, example: Tensor) -> str | None:
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
