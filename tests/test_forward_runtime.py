"""Forward-only passes of torch models through onnxruntime (audit.models.onnx_forward), and when they
are refused: the audit must keep torch, with the reason, rather than trust a graph that may differ."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from audit.models.base import InputSpec, ModelAdapter
from audit.models.onnx_forward import build_onnx_forward
from audit.models.torch_adapter import TorchAdapter


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    )
    bn = model[1]
    bn.running_mean.uniform_(-0.5, 0.5)  # statistics away from the identity, so folding them is checked
    bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


class Eigenvalues(nn.Module):
    """torch.linalg.eigvals has no ONNX symbolic at opset 17."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.mean(dim=(2, 3))[:, :2]
        return torch.linalg.eigvals(torch.stack([m, m.flip(1)], 1)).real


class BranchOnValues(nn.Module):
    """A Python-side branch on tensor values: the trace freezes the branch taken on the example."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x / 255 if x.max() > 1 else x
        return x.flatten(1)[:, :4]


def batch(n: int = 5, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 32, 32)).astype(np.float32)


def test_onnxruntime_forward_agrees_with_torch_on_new_inputs_and_batch_sizes() -> None:
    model = small_cnn()
    runtime, note = build_onnx_forward(model, batch(4))
    assert runtime is not None, note
    assert "onnxruntime" in note and "\n" not in note
    for n in (1, 7):
        x = batch(n, seed=n)
        with torch.no_grad():
            expected = model(torch.from_numpy(x)).numpy()
        got = runtime.forward(x)
        assert got.dtype == np.float32 and got.shape == (n, 5)
        np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max())


def test_a_module_without_an_onnx_symbolic_keeps_torch_with_the_exporters_reason(capfd) -> None:
    log_was = torch._C._jit_is_onnx_log_enabled()  # other exports in this process may have left it on
    runtime, reason = build_onnx_forward(Eigenvalues(), batch())
    assert runtime is None
    assert reason.startswith("the ONNX export failed") and "linalg_eigvals" in reason and "\n" not in reason
    out, err = capfd.readouterr()
    assert "Torch IR graph" not in out + err  # the exporter's C++ log of the whole graph is silenced
    assert torch._C._jit_is_onnx_log_enabled() == log_was


def test_a_branch_on_tensor_values_is_not_frozen_into_a_graph() -> None:
    runtime, reason = build_onnx_forward(BranchOnValues(), batch())
    assert runtime is None
    assert "tracer warning" in reason and "\n" not in reason


def test_a_cuda_model_keeps_torch() -> None:
    assert build_onnx_forward(small_cnn(), batch(), device="cuda") == (None, "the model runs on cuda")


def test_the_torch_adapter_builds_its_runtime_once_and_refuses_fixed_batches() -> None:
    spec = InputSpec(channels=3, size=(32, 32))
    adapter = TorchAdapter(small_cnn(), "python", [], {}, spec, "cpu")
    first = adapter.forward_runtime(batch())
    assert first[0] is not None
    assert adapter.forward_runtime(batch(2, seed=1)) is first
    np.testing.assert_allclose(first[0].forward(batch()), adapter.forward(batch())["output"], rtol=1e-3, atol=1e-4)

    fixed = TorchAdapter(small_cnn(), "python", [], {}, InputSpec(channels=3, size=(32, 32), fixed_batch=1), "cpu")
    assert fixed.forward_runtime(batch()) == (None, "forward-only checks run in torch: the model only takes batches of 1")


class OnnxruntimeAlready(ModelAdapter):
    """Stands in for the ONNX adapter, which inherits the base method: its forward is onnxruntime."""

    def forward(self, x: np.ndarray, taps: frozenset[str] = frozenset()) -> dict[str, np.ndarray]:
        return {"output": x}

    def torch_module(self) -> None:
        return None


def test_adapters_that_already_run_onnxruntime_keep_their_own_forward() -> None:
    adapter = OnnxruntimeAlready(format="onnx", files=[], capabilities={}, input_spec=InputSpec())
    assert adapter.forward_runtime(batch()) == (None, None)
