"""Attribution methods: each one against a direct captum call on the same input, hand-computed values
on a model that only sums the left half of the image, refusal where a method would run degraded,
and perturbation methods on a numpy-backed forward function (no autograd)."""

from __future__ import annotations

import copy
import pkgutil

import numpy as np
import pytest
import torch
from captum import attr as ca
from torch import nn

from audit.attribution import (
    METHODS,
    AttributionParams,
    AttributionUnsupported,
    attribute,
    baseline_for,
    find_last_conv,
    positive_mass,
    unsupported_reason,
)
from audit.attribution import methods as methods_package
from audit.attribution.methods import (
    GRADIENT_METHODS,
    PERTURBATION_FALLBACK,
    AttributionInputs,
    AttributionMethod,
    ChunkFunction,
    default_methods,
    fallback_methods,
    grid_mask,
    input_range,
    occlusion_geometry,
)
from audit.models.base import Capability
from audit.models.torch_adapter import relu_module_reason

pytestmark = pytest.mark.filterwarnings("ignore:Setting .*hooks:UserWarning")

NORM = ((0.5, 0.4, 0.3), (0.25, 0.2, 0.3))  # non-trivial, so "zeros" (black) is not the zero tensor


class LeftHalf(nn.Module):
    """logit 0 = sum of the left half of the image (all channels), logit 1 = sum of the right half."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return torch.stack([x[..., :half].sum(dim=(1, 2, 3)), x[..., half:].sum(dim=(1, 2, 3))], dim=1)


def left_half_numpy(x: torch.Tensor) -> torch.Tensor:
    """The same model computed in numpy, as an onnxruntime wrapper would: no autograd possible."""
    a = x.numpy()  # raises if x requires grad
    half = a.shape[-1] // 2
    return torch.from_numpy(np.stack([a[..., :half].sum(axis=(1, 2, 3)), a[..., half:].sum(axis=(1, 2, 3))], axis=1))


class Cnn(nn.Module):
    """Small CNN with nn.ReLU modules. With average pooling no nonlinearity feeds another (captum 0.9.0's
    DeepLift is exact); with max pooling a ReLU feeds a MaxPool, where captum 0.9.0's DeepLift loses
    summation-to-delta."""

    def __init__(self, pool: type[nn.Module] = nn.AvgPool2d) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool = pool(2)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.gap(self.relu2(self.conv2(self.pool(self.relu1(self.conv1(x)))))).flatten(1))


class Functional(nn.Module):
    """Has a convolution but applies ReLU functionally: guided backprop would silently be plain gradients."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def frozen(module: nn.Module) -> nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


@pytest.fixture(scope="module")
def cnn_case() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = frozen(Cnn())
    x = torch.randn(4, 3, 12, 12)
    target = torch.tensor([0, 1, 2, 1])
    return model, x, target


@pytest.fixture(scope="module")
def left_case() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(1)
    return LeftHalf(), torch.rand(3, 3, 8, 8) + 0.1


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


def captum_reference(name: str, model: nn.Module, x: torch.Tensor, target: torch.Tensor, p: AttributionParams) -> np.ndarray:
    """The direct captum call for each method, reduced over channels the way `attribute` documents."""
    n, c, h, w = x.shape
    base = baseline_for(x, p.baseline, None, NORM)
    xg = x.clone().requires_grad_(True)
    seed_all(p.seed)
    if name == "saliency":
        return ca.Saliency(model).attribute(xg, target=target, abs=True).abs().sum(1).detach().numpy()
    if name == "gradient_x_input":
        return ca.InputXGradient(model).attribute(xg, target=target).sum(1).detach().numpy()
    if name == "integrated_gradients":
        raw = ca.IntegratedGradients(model).attribute(xg, baselines=base, target=target, n_steps=p.ig_steps)
        return raw.sum(1).detach().numpy()
    if name == "smoothgrad":
        raw = ca.NoiseTunnel(ca.Saliency(model)).attribute(
            xg, nt_type="smoothgrad", nt_samples=p.smoothgrad_samples,
            nt_samples_batch_size=min(p.smoothgrad_samples, p.internal_batch_size // n),
            stdevs=p.smoothgrad_stdev * input_range(NORM), target=target, abs=False,
        )
        return raw.abs().sum(1).detach().numpy()
    if name == "gradcam":
        layer = dict(model.named_modules())[find_last_conv(model)]
        coarse = ca.LayerGradCam(model, layer).attribute(xg, target=target, relu_attributions=True)
        return ca.LayerAttribution.interpolate(coarse, (h, w), "bilinear")[:, 0].detach().numpy()
    if name == "guided_backprop":
        return ca.GuidedBackprop(model).attribute(xg, target=target).sum(1).detach().numpy()
    if name == "deconvolution":
        return ca.Deconvolution(model).attribute(xg, target=target).sum(1).detach().numpy()
    if name == "guided_gradcam":
        layer = dict(model.named_modules())[find_last_conv(model)]
        raw = ca.GuidedGradCam(model, layer).attribute(xg, target=target, interpolate_mode="bilinear")
        return raw.sum(1).detach().numpy()
    if name == "deeplift":
        return ca.DeepLift(model).attribute(xg, baselines=base, target=target).sum(1).detach().numpy()
    if name == "gradient_shap":
        raw = ca.GradientShap(model).attribute(xg, baselines=base[:1], n_samples=p.shap_samples, stdevs=0.0, target=target)
        return raw.sum(1).detach().numpy()
    if name == "occlusion":
        (wh, ww), (sh, sw) = occlusion_geometry(h, w, p)
        raw = ca.Occlusion(model).attribute(x, sliding_window_shapes=(c, wh, ww), strides=(1, sh, sw), baselines=base, target=target)
        return raw.mean(1).numpy()
    if name == "feature_ablation":
        mask = grid_mask(h, w, p.grid)[None, None]
        return ca.FeatureAblation(model).attribute(x, baselines=base, target=target, feature_mask=mask).mean(1).numpy()
    if name == "kernel_shap":
        mask = grid_mask(h, w, p.grid)[None, None]
        maps = []
        for i in range(n):  # captum fits one example at a time; each with the same seed as ours
            seed_all(p.seed)
            raw = ca.KernelShap(model).attribute(
                x[i : i + 1], baselines=base[i : i + 1], target=int(target[i]), feature_mask=mask,
                n_samples=p.kernel_shap_samples, perturbations_per_eval=8,
            )
            maps.append(raw.mean(1).numpy())
        return np.concatenate(maps)
    if name == "lrp":  # on a copy: captum leaves its `activations` on the layers it explained
        return ca.LRP(copy.deepcopy(model)).attribute(xg, target=target).sum(1).detach().numpy()
    raise AssertionError(name)


TOLERANCE = {"kernel_shap": 2e-4}  # captum fits in float32 through sklearn; ours in float64


@pytest.mark.parametrize("name", list(METHODS))
def test_matches_direct_captum_call(name: str, cnn_case: tuple[nn.Module, torch.Tensor, torch.Tensor]) -> None:
    model, x, target = cnn_case
    params = AttributionParams(
        ig_steps=8, smoothgrad_samples=4, shap_samples=4, kernel_shap_samples=60, grid=3,
        internal_batch_size=64, baseline="zeros", seed=3,
    )
    ours = attribute(name, lambda t: model(t), x, target, params, NORM, module=model)
    expected = captum_reference(name, model, x, target, params)
    assert ours.dtype == np.float32 and ours.shape == (4, 12, 12)
    scale = max(1e-6, float(np.abs(expected).max()))
    assert np.abs(expected).max() > 0
    np.testing.assert_allclose(ours, expected, rtol=0, atol=TOLERANCE.get(name, 1e-5) * scale)


@pytest.mark.parametrize("name", ["gradcam", "guided_backprop", "guided_gradcam", "deeplift", "occlusion"])
def test_hooks_released(name: str, cnn_case: tuple[nn.Module, torch.Tensor, torch.Tensor]) -> None:
    model, x, target = cnn_case
    attribute(name, lambda t: model(t), x[:2], target[:2], AttributionParams(), NORM, module=model)
    for sub in model.modules():
        assert not (sub._forward_hooks or sub._forward_pre_hooks or sub._backward_hooks or sub._backward_pre_hooks), sub
        assert not hasattr(sub, "input") and not hasattr(sub, "output")


def test_chunking_does_not_change_results(cnn_case: tuple[nn.Module, torch.Tensor, torch.Tensor]) -> None:
    model, x, target = cnn_case
    for name in ("integrated_gradients", "gradient_shap", "gradcam", "occlusion", "kernel_shap"):
        common = {"ig_steps": 4, "kernel_shap_samples": 30, "occlusion_window": 4, "occlusion_stride": 2, "shap_samples": 5}
        whole = attribute(name, model, x, target, AttributionParams(batch_size=8, **common), NORM, module=model)
        parts = attribute(
            name, model, x, target,
            AttributionParams(batch_size=3, internal_batch_size=5, perturbations_per_eval=2, **common), NORM, module=model,
        )
        np.testing.assert_allclose(parts, whole, rtol=1e-5, atol=1e-6)


class ReusedRelu(nn.Module):
    """One nn.ReLU called twice, as in torchvision's ResNet blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.relu(self.conv2(self.relu(self.conv1(x)))).mean(dim=(2, 3)))


def test_deeplift_refuses_a_reused_module_and_cleans_up() -> None:
    torch.manual_seed(0)
    model = frozen(ReusedRelu())
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(AttributionUnsupported, match="more than once"):
        attribute("deeplift", model, x, torch.tensor([0, 1]), AttributionParams(), module=model)
    for sub in model.modules():
        assert not (sub._forward_hooks or sub._forward_pre_hooks or sub._backward_pre_hooks), sub
    assert attribute("guided_backprop", model, x, torch.tensor([0, 1]), AttributionParams(), module=model).shape == (2, 8, 8)



def test_relu_check_is_traced_once_but_again_when_the_model_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    from audit.models import torch_adapter

    traces = []
    trace = torch_adapter.relu_module_reason
    monkeypatch.setattr(torch_adapter, "relu_module_reason", lambda m, e: traces.append(1) or trace(m, e))
    torch.manual_seed(0)
    model = frozen(Cnn())
    x, target = torch.randn(2, 3, 8, 8), torch.tensor([0, 1])
    for _ in range(3):
        attribute("guided_backprop", model, x, target, AttributionParams(), module=model)
    assert len(traces) == 1
    model.relu1.inplace = True
    with pytest.raises(AttributionUnsupported, match="in-place"):
        attribute("guided_backprop", model, x, target, AttributionParams(), module=model)
    model.relu1.inplace = False
    attribute("deconvolution", model, x[:1], target[:1], AttributionParams(), module=model)
    assert len(traces) == 3

def test_deeplift_summation_to_delta_with_relu_feeding_maxpool() -> None:
    torch.manual_seed(2)
    model = frozen(Cnn(pool=nn.MaxPool2d))
    x = torch.randn(3, 3, 12, 12)
    target = torch.tensor([0, 1, 2])
    for kind in ("zeros", "blur"):
        maps = attribute("deeplift", model, x, target, AttributionParams(baseline=kind), NORM, module=model)
        base = baseline_for(x, kind, None, NORM)
        with torch.no_grad():
            delta = (model(x) - model(base)).gather(1, target[:, None])[:, 0].numpy()
        np.testing.assert_allclose(maps.reshape(3, -1).sum(1), delta, rtol=1e-4, atol=1e-6)


class CaptumDeepLiftFixed(ca.DeepLift):
    """captum's DeepLift with captum issue #1104 fixed (as upstream did after 0.9.0): each module's
    output gradient is read by a full backward pre-hook, after downstream hooks have rewritten it."""

    def _register_hooks(self, module: nn.Module, attribute_to_layer_input: bool = True) -> None:
        if not self._can_register_hook(module):
            return
        grad_out: dict[torch.device, torch.Tensor] = {}

        def capture(_m: nn.Module, grad_output: tuple[torch.Tensor, ...]) -> None:
            grad_out[grad_output[0].device] = grad_output[0]

        def pre_hook(_m: nn.Module, inp: tuple[torch.Tensor, ...]) -> torch.Tensor:
            def rewrite(input_grad: torch.Tensor) -> torch.Tensor:
                return self._backward_hook(module, input_grad, grad_out[input_grad.device])

            inp[0].register_hook(rewrite)
            return inp[0].clone()

        self.forward_handles += [module.register_forward_hook(self._forward_hook), module.register_forward_pre_hook(self._forward_pre_hook),
                                 module.register_forward_pre_hook(pre_hook)]
        self.backward_handles.append(module.register_full_backward_pre_hook(capture))


class EveryRule(nn.Module):
    """Every DeepLift rule: ReLU, Tanh into an overlapping max pool, ELU (in place or not), and a softmax output."""

    def __init__(self, inplace: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 5, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(5, 6, 3, padding=1)
        self.tanh = nn.Tanh()
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(6, 4, 3, padding=1)
        self.elu = nn.ELU(inplace=inplace)
        self.fc = nn.Linear(4, 3)
        self.softmax = nn.Softmax(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(self.tanh(self.conv2(self.relu(self.conv1(x)))))
        return self.softmax(self.fc(self.elu(self.conv3(h)).mean(dim=(2, 3))))


@pytest.mark.parametrize("kind", ["zeros", "blur"])
@pytest.mark.parametrize("make", [lambda: Cnn(pool=nn.MaxPool2d), EveryRule], ids=["relu-into-maxpool", "every-rule"])
def test_deeplift_matches_captum_with_its_hook_order_fixed(make, kind: str) -> None:  # type: ignore[no-untyped-def]
    """Our DeepLift is an autograd rule per nonlinearity, not captum's hooks; with non-zero baselines
    and a nonlinearity feeding another it must equal captum's own rules applied in the right order."""
    torch.manual_seed(4)
    model = frozen(make())
    x = torch.randn(3, 3, 12, 12)
    x[0, :, :7] = baseline_for(x, "zeros", None, NORM)[0, :, :7]  # equal to the reference there: the ratio is undefined
    target = torch.tensor([0, 2, 1])
    params = AttributionParams(baseline=kind)
    ours = attribute("deeplift", model, x, target, params, NORM, module=model)
    base = baseline_for(x, kind, None, NORM)
    expected = CaptumDeepLiftFixed(model).attribute(x.clone().requires_grad_(True), baselines=base, target=target)
    expected = expected.sum(1).detach().numpy()
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-5 * float(np.abs(expected).max()))
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_deeplift_reads_the_input_of_an_in_place_module_before_it_is_overwritten() -> None:
    torch.manual_seed(5)
    model = frozen(EveryRule())
    in_place = frozen(EveryRule(inplace=True))
    in_place.load_state_dict(model.state_dict())
    x, target = torch.randn(2, 3, 10, 10), torch.tensor([1, 0])
    maps = [attribute("deeplift", m, x, target, AttributionParams(baseline="blur"), NORM, module=m) for m in (model, in_place)]
    np.testing.assert_array_equal(maps[0], maps[1])


def test_left_half_saliency_and_gradient_x_input(left_case: tuple[nn.Module, torch.Tensor]) -> None:
    model, x = left_case
    zero, one = torch.zeros(3, dtype=torch.long), torch.ones(3, dtype=torch.long)
    sal = attribute("saliency", model, x, zero, AttributionParams())
    assert (sal[..., :4] == 3.0).all() and (sal[..., 4:] == 0.0).all()  # 1 per channel, 3 channels
    raw = ca.Saliency(model).attribute(x.clone().requires_grad_(True), target=zero)
    assert (raw[..., :4] == 1.0).all() and (raw[..., 4:] == 0.0).all()
    sal1 = attribute("saliency", model, x, one, AttributionParams())
    assert (sal1[..., :4] == 0.0).all() and (sal1[..., 4:] == 3.0).all()
    gxi = attribute("gradient_x_input", model, x, zero, AttributionParams())
    np.testing.assert_allclose(gxi[..., :4], x.sum(1)[..., :4].numpy(), rtol=1e-6)
    assert (gxi[..., 4:] == 0.0).all()


def test_left_half_integrated_gradients_completeness(left_case: tuple[nn.Module, torch.Tensor]) -> None:
    model, x = left_case
    target = torch.zeros(3, dtype=torch.long)
    ig = attribute("integrated_gradients", model, x, target, AttributionParams(baseline="zeros", ig_steps=8))
    np.testing.assert_allclose(ig[..., :4], x.sum(1)[..., :4].numpy(), rtol=1e-5)
    assert (ig[..., 4:] == 0.0).all()
    with torch.no_grad():
        gap = (model(x) - model(torch.zeros_like(x)))[:, 0].numpy()
    np.testing.assert_allclose(ig.reshape(3, -1).sum(1), gap, rtol=1e-5)


def test_left_half_perturbations_on_numpy_forward(left_case: tuple[nn.Module, torch.Tensor]) -> None:
    _model, x = left_case
    target = torch.zeros(3, dtype=torch.long)
    params = AttributionParams(occlusion_window=2, occlusion_stride=2, grid=2, kernel_shap_samples=40)
    occ = attribute("occlusion", left_half_numpy, x, target, params)
    assert (occ[..., 4:] == 0.0).all()  # covering the right half changes nothing for class 0
    windows = x.sum(1).reshape(3, 4, 2, 4, 2).sum(dim=(2, 4))  # sum of each 2x2 window over channels
    expected = windows.repeat_interleave(2, 1).repeat_interleave(2, 2).numpy()
    np.testing.assert_allclose(occ[..., :4], expected[..., :4], rtol=1e-5)
    cells = x.sum(1).reshape(3, 2, 4, 2, 4).sum(dim=(2, 4))  # 2 x 2 grid of cells
    cell_maps = cells.repeat_interleave(4, 1).repeat_interleave(4, 2).numpy()
    for name in ("feature_ablation", "kernel_shap"):  # additive model: KernelSHAP recovers the cell sums exactly
        maps = attribute(name, left_half_numpy, x, target, params)
        np.testing.assert_allclose(maps[..., :4], cell_maps[..., :4], rtol=1e-4)
        np.testing.assert_allclose(maps[..., 4:], 0.0, atol=1e-4)


@pytest.fixture(scope="module")
def onnx_forward(cnn_case: tuple[nn.Module, torch.Tensor, torch.Tensor], tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """The CNN exported to ONNX and run by onnxruntime: a forward function with no autograd at all."""
    import warnings

    import onnxruntime as ort

    model = cnn_case[0]
    path = tmp_path_factory.mktemp("onnx") / "cnn.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 3, 12, 12),), str(path), dynamo=False, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def forward(t: torch.Tensor) -> torch.Tensor:
        assert not t.requires_grad
        return torch.from_numpy(session.run(None, {"input": t.numpy()})[0])

    return forward


def test_perturbation_methods_run_on_onnxruntime(cnn_case: tuple[nn.Module, torch.Tensor, torch.Tensor], onnx_forward) -> None:  # type: ignore[no-untyped-def]
    model, x, target = cnn_case
    params = AttributionParams(kernel_shap_samples=30, occlusion_window=4, occlusion_stride=2, baseline="blur")
    for name in ("occlusion", "feature_ablation", "kernel_shap"):
        assert not METHODS[name].gradient and not METHODS[name].requires
        ours = attribute(name, onnx_forward, x, target, params, NORM)
        direct = attribute(name, model, x, target, params, NORM)
        np.testing.assert_allclose(ours, direct, rtol=1e-4, atol=1e-5)


def test_unsupported_reasons() -> None:
    torch.manual_seed(0)
    functional = frozen(Functional())
    example = torch.randn(1, 3, 8, 8)
    reason = relu_module_reason(functional, example)
    assert reason is not None and "functionally" in reason
    caps = {Capability.GRADIENTS: None, Capability.HOOKS: None, Capability.NAMED_LAYERS: None, Capability.RELU_MODULES: reason}
    for name in ("guided_backprop", "deconvolution", "guided_gradcam", "deeplift"):
        assert unsupported_reason(name, caps, functional) == reason
        with pytest.raises(AttributionUnsupported, match="functionally"):  # never run degraded, even if asked
            attribute(name, functional, example, torch.tensor([0]), AttributionParams(), module=functional)
    for name in ("saliency", "integrated_gradients", "gradcam", "occlusion"):
        assert unsupported_reason(name, caps, functional) is None
    plain = {c: None for c in Capability}
    assert unsupported_reason("gradcam", plain, LeftHalf()) == "no convolution layer for Grad-CAM"
    assert unsupported_reason("guided_gradcam", plain, LeftHalf()) == "no convolution layer for Grad-CAM"
    assert unsupported_reason("gradcam", plain, functional, layer="nope") == "layer 'nope' not found in the model"
    onnx_only = {c: "onnx2torch: unsupported operator" for c in Capability}
    assert unsupported_reason("saliency", onnx_only, None) == "onnx2torch: unsupported operator"
    for name in ("occlusion", "feature_ablation", "kernel_shap"):
        assert unsupported_reason(name, onnx_only, None) is None


def test_registry_and_helpers(cnn_case: tuple[nn.Module, torch.Tensor, torch.Tensor]) -> None:
    model, x, _ = cnn_case
    assert list(METHODS) == [
        "saliency", "gradient_x_input", "integrated_gradients", "smoothgrad", "gradcam", "guided_backprop",
        "deconvolution", "guided_gradcam", "deeplift", "gradient_shap", "lrp", "occlusion", "feature_ablation",
        "kernel_shap",
    ]
    assert all(m.reference and m.title and m.short_title for m in METHODS.values())
    assert METHODS["guided_backprop"].requires == {Capability.GRADIENTS, Capability.HOOKS, Capability.RELU_MODULES}
    assert METHODS["gradcam"].requires == {Capability.GRADIENTS, Capability.HOOKS}
    assert find_last_conv(model) == "conv2" and find_last_conv(LeftHalf()) is None
    black = baseline_for(x, "zeros", None, NORM)
    np.testing.assert_allclose(black[0, :, 0, 0].numpy(), [-2.0, -2.0, -1.0])
    mean = baseline_for(x, "mean")
    np.testing.assert_allclose(mean[1, :, 3, 3].numpy(), x.mean(dim=(0, 2, 3)).numpy(), rtol=1e-6)
    blurred = baseline_for(x, "blur")
    assert blurred.shape == x.shape and blurred.std() < 0.5 * x.std()
    flat = torch.full((1, 1, 6, 6), 0.7)
    np.testing.assert_allclose(baseline_for(flat, "blur", blur_sigma=3.0).numpy(), 0.7, rtol=1e-6)
    assert (positive_mass(np.array([[-1.0, 2.0]])) == [[0.0, 2.0]]).all()
    assert occlusion_geometry(64, 32, AttributionParams()) == ((8, 4), (4, 2))
    assert grid_mask(4, 4, 2).tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]


SHORT_TITLES = {  # the report's column and caption names (audit/report/viewmodel.py), plus LRP's
    "saliency": "saliency", "gradient_x_input": "grad × input", "integrated_gradients": "integ. gradients",
    "smoothgrad": "SmoothGrad", "gradcam": "Grad-CAM", "guided_backprop": "guided backprop",
    "deconvolution": "deconvolution", "guided_gradcam": "guided Grad-CAM", "deeplift": "DeepLift",
    "gradient_shap": "GradientSHAP", "lrp": "LRP", "occlusion": "occlusion", "feature_ablation": "feature ablation",
    "kernel_shap": "KernelSHAP",
}


def test_declarations_give_the_lists_other_modules_use() -> None:
    gradient = ["saliency", "gradient_x_input", "integrated_gradients", "smoothgrad", "gradcam", "guided_backprop",
                "deconvolution", "guided_gradcam", "deeplift", "gradient_shap"]
    assert default_methods() == GRADIENT_METHODS == gradient
    assert fallback_methods() == PERTURBATION_FALLBACK == ["feature_ablation", "kernel_shap"]
    assert {name: m.short_title for name, m in METHODS.items()} == SHORT_TITLES
    assert [n for n, m in METHODS.items() if m.gradient] == [*gradient, "lrp"]
    assert [n for n, m in METHODS.items() if m.needs_module] == [
        "gradcam", "guided_backprop", "deconvolution", "guided_gradcam", "deeplift", "lrp"]
    assert [n for n, m in METHODS.items() if m.needs_layer] == ["gradcam", "guided_gradcam"]
    assert [n for n, m in METHODS.items() if m.stochastic] == ["smoothgrad", "gradient_shap", "kernel_shap"]
    assert [n for n, m in METHODS.items() if not m.signed] == ["saliency", "smoothgrad", "gradcam"]


def test_every_module_of_the_package_but_the_shared_ones_declares_one_method() -> None:
    modules = {info.name for info in pkgutil.iter_modules(methods_package.__path__)} - {"base", "common"}
    declared = [type(m).__module__.rsplit(".", 1)[1] for m in METHODS.values()]
    assert sorted(declared) == sorted(modules)


def test_a_new_subclass_registers_itself_in_display_order() -> None:
    class Ones(AttributionMethod):
        name = "test_ones"
        title = "All ones"
        short_title = "ones"
        reference = "none"
        order = 15
        signed = False

        def prepare(self, inputs: AttributionInputs) -> ChunkFunction:
            return lambda xc, tc, _b: torch.ones_like(xc)

    try:
        assert list(METHODS)[:3] == ["saliency", "test_ones", "gradient_x_input"]
        assert "test_ones" not in default_methods() and not METHODS["test_ones"].gradient
        maps = attribute("test_ones", LeftHalf(), torch.rand(2, 3, 4, 4), torch.tensor([0, 1]), AttributionParams())
        assert maps.dtype == np.float32 and (maps == 3.0).all()
        assert unsupported_reason("test_ones", {}, None) is None
        with pytest.raises(ValueError, match="declared by"):
            type("Other", (AttributionMethod,), {"name": "test_ones", "title": "t", "short_title": "t",
                                                 "reference": "r", "order": 1})
        with pytest.raises(TypeError, match="short_title"):
            type("Untitled", (AttributionMethod,), {"name": "test_untitled", "title": "t", "reference": "r", "order": 1})
    finally:
        METHODS.pop("test_ones", None)
    assert "test_ones" not in METHODS and "test_untitled" not in METHODS
