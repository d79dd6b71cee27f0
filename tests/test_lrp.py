"""LRP (epsilon rule, through captum): equal to a direct captum call, refused before running where captum has
no rule for a layer, the user's module left exactly as it was, and the same trust checks as every method."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from captum import attr as ca
from captum.attr._utils.lrp_rules import GammaRule
from torch import nn

from audit.attribution import (
    METHODS,
    AttributionParams,
    AttributionUnsupported,
    attribute,
    baseline_for,
    curve_ends,
    deletion_curve,
    randomisation_test,
    unsupported_reason,
)
from audit.attribution.methods import default_methods, fallback_methods
from audit.models.base import Capability

pytestmark = pytest.mark.filterwarnings("ignore:Setting .*hooks:UserWarning")

ALL = {c: None for c in Capability}


class Tiny(nn.Module):
    """conv + ReLU + linear, every leaf one captum's LRP has a rule for (the flatten is functional)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.relu(self.conv(x)).flatten(1))


class WithFlattenAndElu(Tiny):
    """Leaves captum's LRP has no rule for: an nn.Flatten and an nn.ELU."""

    def __init__(self) -> None:
        super().__init__()
        self.act = nn.ELU()
        self.flatten = nn.Flatten()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.act(self.conv(x))))


class ReusedRelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.gap(self.relu(self.conv2(self.relu(self.conv1(x))))).flatten(1))


class LeftHalf(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return torch.stack([x[..., :half].sum(dim=(1, 2, 3)), x[..., half:].sum(dim=(1, 2, 3))], dim=1)


def frozen(module: nn.Module) -> nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


@pytest.fixture
def case() -> tuple[Tiny, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = Tiny()
    frozen(model)
    return model, torch.randn(5, 3, 6, 6), torch.tensor([0, 1, 2, 1, 0])


def captum_lrp(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> np.ndarray:
    """captum's LRP called directly (on a copy: captum leaves `activations` behind), summed over channels."""
    return ca.LRP(copy.deepcopy(model)).attribute(x.clone().requires_grad_(True), target=target).sum(1).detach().numpy()


def untouched(model: nn.Module) -> None:
    for sub in model.modules():
        assert not (sub._forward_hooks or sub._forward_pre_hooks or sub._backward_hooks or sub._backward_pre_hooks), sub
        assert not hasattr(sub, "activations"), sub


def test_opt_in_gradient_method() -> None:
    spec = METHODS["lrp"]
    assert spec.title == "LRP (epsilon rule)" and spec.short_title == "LRP" and "Bach" in spec.reference
    assert spec.gradient and spec.needs_module and spec.signed and not spec.stochastic
    assert spec.requires == {Capability.GRADIENTS, Capability.HOOKS}
    assert "lrp" not in default_methods() and "lrp" not in fallback_methods()


def test_equals_a_direct_captum_call(case: tuple[Tiny, torch.Tensor, torch.Tensor]) -> None:
    model, x, target = case
    expected = captum_lrp(model, x, target)
    assert np.abs(expected).max() > 0
    direct = attribute("lrp", model, x, target, AttributionParams())
    scores = attribute("lrp", lambda t: model(t), x, target, AttributionParams(), module=model)
    chunked = attribute("lrp", model, x, target, AttributionParams(batch_size=2), module=model)
    for ours in (direct, scores, chunked):
        assert ours.dtype == np.float32 and ours.shape == (5, 6, 6)
        np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-6 * float(np.abs(expected).max()))
    np.testing.assert_array_equal(direct, expected)


def test_the_users_module_is_left_as_it_was(case: tuple[Tiny, torch.Tensor, torch.Tensor]) -> None:
    model, x, target = case
    own_rule = GammaRule()
    model.conv.rule = own_rule  # a rule the user set (captum's LRP would use it, then delete it)
    model.conv.activations = "the user's"  # type: ignore[assignment]  # captum's LRP overwrites it, leaves its own
    model.fc.rule = "not a captum rule"  # type: ignore[assignment]  # captum's LRP would raise TypeError
    state = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        before = model(x)
    maps = attribute("lrp", model, x, target, AttributionParams(), module=model)
    assert model.conv.rule is own_rule and model.conv.activations == "the user's"
    assert model.fc.rule == "not a captum rule"
    del model.conv.rule, model.conv.activations, model.fc.rule
    untouched(model)
    assert all(not hasattr(m, "rule") for m in model.modules())
    after = model.state_dict()
    assert list(after) == list(state) and all(torch.equal(after[k], state[k]) for k in state)
    with torch.no_grad():
        assert torch.equal(model(x), before)
    np.testing.assert_array_equal(maps, captum_lrp(model, x, target))  # the epsilon rule, whatever rule it carried


def test_unsupported_layers_are_named_before_running() -> None:
    torch.manual_seed(1)
    model = frozen(WithFlattenAndElu())
    reason = unsupported_reason("lrp", ALL, model)
    assert reason is not None
    assert reason.startswith("LRP has no rule for layer 'act' (ELU) or layer 'flatten' (Flatten); "
                             "captum's LRP covers only ")
    assert "Conv2d" in reason and "ReLU" in reason
    x = torch.randn(2, 3, 6, 6)
    with pytest.raises(TypeError):  # what a direct captum call does with the same model
        ca.LRP(copy.deepcopy(model)).attribute(x.clone().requires_grad_(True), target=0)
    with pytest.raises(AttributionUnsupported) as refused:
        attribute("lrp", model, x, torch.tensor([0, 1]), AttributionParams(), module=model)
    assert str(refused.value) == reason
    untouched(model)
    assert str(unsupported_reason("lrp", ALL, LeftHalf())).startswith("LRP has no rule for the model itself (LeftHalf)")
    assert unsupported_reason("lrp", ALL, frozen(Tiny())) is None


def test_capabilities_and_module_come_first() -> None:
    onnx_only = {c: "onnx2torch: unsupported operator" for c in Capability}
    assert unsupported_reason("lrp", onnx_only, None) == "onnx2torch: unsupported operator"
    no_hooks = {**ALL, Capability.HOOKS: "TorchScript: no hooks"}
    assert unsupported_reason("lrp", no_hooks, Tiny()) == "TorchScript: no hooks"
    assert unsupported_reason("lrp", ALL, None) == "no torch module to attach hooks to"


def test_a_layer_used_twice_is_refused_and_cleaned_up() -> None:
    torch.manual_seed(2)
    model = frozen(ReusedRelu())
    assert unsupported_reason("lrp", ALL, model) is None  # only a forward pass shows the reuse
    with pytest.raises(AttributionUnsupported, match="'relu' is called more than once"):
        attribute("lrp", model, torch.randn(2, 3, 6, 6), torch.tensor([0, 1]), AttributionParams(), module=model)
    untouched(model)
    assert not any(hasattr(m, "rule") for m in model.modules())
    shared = Tiny()
    shared.block = nn.Sequential(shared.relu)  # one module registered under two parents: captum would hook it twice
    reason = unsupported_reason("lrp", ALL, shared)
    assert reason == "LRP needs one module per use; layer 'block.0' is also registered as 'relu'"


def test_randomisation_and_deletion_checks_run(case: tuple[Tiny, torch.Tensor, torch.Tensor]) -> None:
    model, x, target = case
    before = copy.deepcopy(model.state_dict())
    result = randomisation_test(model, lambda m: (lambda t: m(t)), "lrp", x, target, AttributionParams(), seed=5)
    assert result.method == "lrp" and result.layers == ["fc", "conv"]
    assert np.isfinite(result.step_correlations).all() and np.isfinite(result.final_correlation)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    untouched(model)

    def probs(t: torch.Tensor) -> torch.Tensor:
        return torch.softmax(model(t), dim=1)

    maps = attribute("lrp", model, x, target, AttributionParams())
    fill = baseline_for(x, "blur")
    ends = curve_ends(probs, x, fill, target)
    for order in ("attribution", "random"):
        deletion = deletion_curve(probs, x, target, maps, steps=4, fill=fill, order=order, ends=ends)
        assert deletion.curves.shape == (5, 5) and np.isfinite(deletion.auc).all() and np.isfinite(deletion.mean_auc)
