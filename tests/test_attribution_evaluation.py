"""Sanity (cascading parameter randomisation) and faithfulness (deletion curve) of attribution maps."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

from audit.attribution import (
    AttributionParams,
    attribute,
    curve_ends,
    deletion_curve,
    randomisation_test,
    randomisation_tests,
    spearman_rows,
)
from audit.attribution.evaluation import (
    RandomisationResult,
    _parameterised_layers,
    cascade_steps,
    descending_order,
)


class Cnn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.gap(self.relu2(self.conv2(self.relu1(self.conv1(x))))).flatten(1))


class LeftHalf(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return torch.stack([x[..., :half].sum(dim=(1, 2, 3)), x[..., half:].sum(dim=(1, 2, 3))], dim=1)


def scores(module: nn.Module):  # type: ignore[no-untyped-def]
    return lambda t: module(t)


def edge_detector(forward, x, target, module) -> np.ndarray:  # type: ignore[no-untyped-def]
    """A 'method' that ignores the model entirely: the failure the randomisation test exists to catch."""
    return x.abs().sum(1).numpy()


@pytest.fixture(scope="module")
def cnn_case() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = Cnn().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.randn(6, 3, 10, 10)
    with torch.no_grad():
        target = model(x).argmax(1)
    return model, x, target


@pytest.fixture(scope="module")
def saliency_randomisation(cnn_case):  # type: ignore[no-untyped-def]
    model, x, target = cnn_case
    before = copy.deepcopy(model.state_dict())
    result = randomisation_test(model, scores, "saliency", x, target, AttributionParams(), seed=5)
    return result, before


def test_gradient_maps_decorrelate_under_randomisation(saliency_randomisation, cnn_case) -> None:  # type: ignore[no-untyped-def]
    result, _ = saliency_randomisation
    assert result.method == "saliency"
    assert result.layers == ["fc", "conv2", "conv1"]  # output side first
    assert result.step_correlations.shape == (3,) and result.step_sample_correlations.shape == (3, 6)
    assert result.sample_correlations.shape == (6,)
    assert result.final_correlation == pytest.approx(result.step_correlations[-1])
    assert result.final_correlation < 0.5  # far below the original's 1.0


def test_weight_blind_method_keeps_correlation(cnn_case) -> None:  # type: ignore[no-untyped-def]
    model, x, target = cnn_case
    result = randomisation_test(model, scores, edge_detector, x, target, AttributionParams())
    assert result.method == "edge_detector"
    assert result.final_correlation > 0.99 and (result.step_correlations > 0.99).all()


def test_randomisation_leaves_module_alone_and_is_deterministic(saliency_randomisation, cnn_case) -> None:  # type: ignore[no-untyped-def]
    model, x, target = cnn_case
    result, before = saliency_randomisation
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    again = randomisation_test(model, scores, "saliency", x, target, AttributionParams(), seed=5)
    np.testing.assert_array_equal(again.step_sample_correlations, result.step_sample_correlations)
    one = randomisation_test(model, scores, "gradcam", x, target, AttributionParams(), layers=1)
    assert one.layers == ["fc"] and one.step_correlations.shape == (1,)



def broken(forward, x, target, module) -> np.ndarray:  # type: ignore[no-untyped-def]
    raise RuntimeError("cannot explain this model")


def test_methods_tested_together_get_the_results_they_get_alone(cnn_case) -> None:  # type: ignore[no-untyped-def]
    """One copy of the model, randomised once per step for every method: SmoothGrad's own noise must
    not shift the weights the next method sees, and a failing method must not stop the others."""
    model, x, target = cnn_case
    params = AttributionParams(smoothgrad_samples=3, seed=2)
    together = randomisation_tests(model, scores, ["smoothgrad", broken, "saliency", edge_detector], x, target, params, seed=7)
    assert list(together) == ["smoothgrad", "broken", "saliency", "edge_detector"]
    assert isinstance(together["broken"], RuntimeError)
    for method in ("smoothgrad", "saliency", edge_detector):
        alone = randomisation_test(model, scores, method, x, target, params, seed=7)
        name = alone.method
        np.testing.assert_array_equal(together[name].step_sample_correlations, alone.step_sample_correlations)  # type: ignore[union-attr]
    with pytest.raises(RuntimeError, match="cannot explain"):
        randomisation_test(model, scores, broken, x, target, params)

def test_spearman_rows_matches_scipy() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4, 30))
    b = a + rng.normal(size=(4, 30))
    b[1, :10] = b[1, 0]  # ties
    expected = [spearmanr(a[i], b[i]).statistic for i in range(4)]
    np.testing.assert_allclose(spearman_rows(a, b), expected, rtol=1e-12)
    flat = np.zeros((2, 5))
    assert spearman_rows(flat, flat).tolist() == [1.0, 1.0]
    assert spearman_rows(flat, a[:2, :5]).tolist() == [0.0, 0.0]


def test_deletion_attribution_order_beats_random() -> None:
    torch.manual_seed(3)
    model = LeftHalf()
    x = torch.rand(5, 3, 8, 8) * 0.2 + 0.05
    target = torch.zeros(5, dtype=torch.long)
    maps = attribute("saliency", model, x, target, AttributionParams())

    def probs(t: torch.Tensor) -> torch.Tensor:
        return torch.softmax(model(t), dim=1)

    faithful = deletion_curve(probs, x, target, maps, steps=8)
    control = deletion_curve(probs, x, target, maps, steps=8, order="random", seed=1)
    assert faithful.curves.shape == (5, 9) and faithful.fractions.tolist() == pytest.approx(np.linspace(0, 1, 9).tolist())
    assert (faithful.auc < control.auc).all() and faithful.mean_auc < control.mean_auc
    np.testing.assert_allclose(faithful.curves[:, -1], 0.5, rtol=1e-6)  # everything removed: logits equal
    again = deletion_curve(probs, x, target, maps, steps=8, order="random", seed=1)
    np.testing.assert_array_equal(again.curves, control.curves)


def test_deletion_rows_that_removed_the_same_pixels_share_a_pass() -> None:
    """Two methods whose maps rank the pixels alike (one a rescaled copy, one a blocky map whose
    halves tie) give the same curves as run apart, from fewer forward passes."""
    torch.manual_seed(3)
    model = LeftHalf()
    x = torch.rand(3, 3, 8, 8)
    target = torch.zeros(3, dtype=torch.long)
    seen = []

    def probs(t: torch.Tensor) -> torch.Tensor:
        seen.append(len(t))
        return torch.softmax(model(t), dim=1)

    maps = attribute("saliency", model, x, target, AttributionParams())
    blocky = np.repeat(np.repeat(np.random.default_rng(0).random((3, 2, 2)), 4, axis=1), 4, axis=2)
    stacked = np.concatenate([maps, 3 * maps, blocky])
    rows = x.repeat(3, 1, 1, 1)
    alone = deletion_curve(probs, rows, target.repeat(3), stacked, steps=8, batch_size=1000)
    passes_alone = sum(seen)
    seen.clear()
    shared = deletion_curve(probs, rows, target.repeat(3), stacked, steps=8, batch_size=1000, images=np.tile(np.arange(3), 3))
    np.testing.assert_array_equal(shared.curves, alone.curves)
    ranking = [np.argsort(-m.reshape(-1), kind="stable") for m in stacked]
    distinct = sum(len({(i % 3, frozenset(ranking[i][:k * 8].tolist())) for i in range(9)}) for k in range(9))
    assert passes_alone == 9 * 9 and sum(seen) == distinct <= 9 * 6  # the rescaled copy never runs


def test_deletion_auc_by_hand_two_steps_on_numpy_forward() -> None:
    calls = []

    def probs(t: torch.Tensor) -> torch.Tensor:  # numpy-backed, like an onnxruntime wrapper
        a = t.numpy()
        calls.append(len(a))
        logits = np.stack([a[..., 0].sum(axis=(1, 2)), a[..., 1].sum(axis=(1, 2))], axis=1)
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return torch.from_numpy(e / e.sum(axis=1, keepdims=True))

    x = torch.tensor([[[[2.0, 1.0]]]])  # one 1 x 2 image: logits (2, 1)
    maps = np.array([[[1.0, 0.0]]])  # the left pixel matters most
    result = deletion_curve(probs, x, torch.tensor([0]), maps, steps=2, batch_size=2)
    sigmoid = lambda v: 1.0 / (1.0 + math.exp(-v))  # noqa: E731
    p0, p1, p2 = sigmoid(1.0), sigmoid(-1.0), 0.5  # nothing removed; left pixel removed; both removed
    np.testing.assert_allclose(result.curves[0], [p0, p1, p2], rtol=1e-6)  # float32 images
    expected_auc = 0.5 * (p0 + p1) / 2 + 0.5 * (p1 + p2) / 2
    assert result.auc[0] == pytest.approx(expected_auc) and result.mean_auc == pytest.approx(0.4422, abs=1e-4)
    assert calls == [2, 1]  # 3 images in batches of 2
    filled = deletion_curve(probs, x, torch.tensor([0]), maps, steps=2, fill=torch.full_like(x, 1.0))
    np.testing.assert_allclose(filled.curves[0], [p0, 0.5, 0.5], rtol=1e-6)



def test_deletion_curve_with_shared_ends_skips_them_and_draws_the_same_curve() -> None:
    torch.manual_seed(4)
    model = LeftHalf()
    x, target = torch.rand(3, 3, 6, 6), torch.tensor([0, 1, 0])
    fill = torch.full_like(x, 0.5)
    maps = np.random.default_rng(0).standard_normal((3, 6, 6))
    seen = []

    def probs(t: torch.Tensor) -> torch.Tensor:
        seen.append(len(t))
        return torch.softmax(model(t), dim=1)

    ends = curve_ends(probs, x, fill, target)
    assert seen == [6]
    np.testing.assert_allclose(ends[1], 0.5, rtol=1e-6)  # a uniform image: both halves equal
    seen.clear()
    full = deletion_curve(probs, x, target, maps, steps=4, fill=fill, batch_size=3)
    assert sum(seen) == 15
    seen.clear()
    shared = deletion_curve(probs, x, target, maps, steps=4, fill=fill, batch_size=3, ends=ends)
    assert sum(seen) == 9  # the three middle steps only
    np.testing.assert_allclose(shared.curves, full.curves, rtol=1e-6)
    np.testing.assert_allclose(shared.auc, full.auc, rtol=1e-6)

def test_descending_order_equals_stable_argsort_with_ties_signed_zeros_nan_and_inf() -> None:
    rng = np.random.default_rng(0)
    maps = rng.standard_normal((6, 400)).astype(np.float32)
    maps[:, ::5] = 0.0
    maps[:, 1::7] = -0.0
    maps[:, 2::11] = np.nan
    maps[:, 3::13] = np.inf
    maps[:, 4::17] = -np.inf
    maps[:, 6::3] = maps[:, 6::3].round(1)  # many ties among ordinary values
    expected = torch.argsort(-torch.nan_to_num(torch.from_numpy(maps), nan=-torch.inf), dim=1, stable=True).numpy()
    np.testing.assert_array_equal(descending_order(maps), expected)
    np.testing.assert_array_equal(descending_order(np.array([[1.0, 3.0, 3.0, -2.0, 0.0]], dtype=np.float32)), [[1, 2, 0, 4, 3]])


def _resnet18() -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=3).eval()
    for m in model.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False  # as the torch adapter does, so backward hooks can wrap them
    return model


def _demo_cnn() -> nn.Module:
    from audit.demo import build_model

    torch.manual_seed(0)
    return build_model().eval()


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return Cnn().eval()


def test_block_cascade_of_resnet18_takes_six_steps_from_the_head() -> None:
    model = _resnet18()
    layers = _parameterised_layers(model, model, torch.zeros(1, 3, 32, 32))
    steps = cascade_steps(model, layers)
    assert [label for label, _ in steps] == ["fc", "layer4", "layer3", "layer2", "layer1", "bn1 + conv1"]
    assert [n for _, names in steps for n in names] == list(reversed(layers))  # same layers, same order as per layer
    assert len(cascade_steps(model, layers, None)) == len(layers) == 41


@pytest.mark.parametrize("build, size", [(_cnn, 10), (_demo_cnn, 32)], ids=["cnn", "demo"])
def test_block_cascade_trusts_the_methods_the_per_layer_cascade_trusts(build, size: int) -> None:  # type: ignore[no-untyped-def]
    """The verdict is taken on the fully randomised model, which both granularities reach through the
    same re-initialisations in the same order: the final correlations, and so which methods are
    trusted, must not move (checked on the test models; a ResNet-18 per layer takes minutes)."""
    model = build()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        target = model(x).argmax(1)
    methods = ["saliency", "gradient_x_input", "integrated_gradients", "gradcam", "guided_backprop", "deconvolution", "smoothgrad"]
    params = AttributionParams(ig_steps=4, smoothgrad_samples=2, seed=3)
    blocks = randomisation_tests(model, scores, methods, x, target, params, seed=5)
    layers = randomisation_tests(model, scores, methods, x, target, params, seed=5, max_steps=None)
    for method in methods:
        block, layer = blocks[method], layers[method]
        assert isinstance(block, RandomisationResult) and isinstance(layer, RandomisationResult), method
        assert len(block.layers) <= 6 and len(block.layers) <= len(layer.layers)
        np.testing.assert_allclose(block.sample_correlations, layer.sample_correlations, atol=1e-6, err_msg=method)
        assert (block.final_correlation < 0.5) == (layer.final_correlation < 0.5), method
