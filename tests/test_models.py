"""Model adapters on the files real users bring: fixed batch sizes, NHWC, several outputs, old opsets,
TorchScript, torch.export, factories with state dicts, probabilities and sigmoid outputs."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from audit.errors import InputError, ModelLoadError
from audit.models import InputSpec, load_model
from audit.models.base import Capability
from audit.models.outputs import interpret

SIZE = 16


class Small(nn.Module):
    def __init__(self, functional: bool = False, classes: int = 3) -> None:
        super().__init__()
        self.functional = functional
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)) if self.functional else self.relu(self.conv(x))
        return self.fc(self.pool(h).flatten(1))


def model(functional: bool = False) -> Small:
    torch.manual_seed(0)
    return Small(functional).eval()


def batch(n: int = 5, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, SIZE, SIZE)).astype(np.float32)


def reference(m: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return m(torch.from_numpy(x)).numpy()


def export(m: nn.Module, path: Path, example: torch.Tensor | None = None, dynamic: bool = True, **kwargs) -> Path:  # type: ignore[no-untyped-def]
    example = torch.zeros(1, 3, SIZE, SIZE) if example is None else example
    names = kwargs.pop("output_names", ["logits"])
    axes = {"x": {0: "n"}, **{o: {0: "n"} for o in names}} if dynamic else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, (example,), str(path), dynamo=False, opset_version=kwargs.pop("opset", 17), input_names=["x"],
                          output_names=names, dynamic_axes=axes, **kwargs)
    return path


def test_onnx_matches_torch_and_converts_for_gradients(tmp_path: Path) -> None:
    m = model()
    adapter = load_model(export(m, tmp_path / "m.onnx"), InputSpec(), "cpu")
    x = batch()
    assert np.allclose(adapter.forward(x)["output"], reference(m, x), atol=1e-5)
    assert adapter.input_spec.size == (SIZE, SIZE) and adapter.input_spec.channels == 3
    assert all(reason is None for reason in adapter.capabilities.values())
    converted = adapter.torch_module()
    assert converted is not None
    assert np.allclose(reference(converted, x), reference(m, x), atol=1e-5)


def test_fixed_batch_of_one_is_rewritten(tmp_path: Path) -> None:
    m = model()
    adapter = load_model(export(m, tmp_path / "fixed.onnx", dynamic=False), InputSpec(), "cpu")
    assert adapter.input_spec.fixed_batch is None
    assert any("rewritten to a free batch dimension" in n for n in adapter.notes)
    x = batch(7)
    assert np.allclose(adapter.forward(x)["output"], reference(m, x), atol=1e-5)


class HardBatch(nn.Module):
    """Reshapes with a literal batch size of 1, so the batch dimension cannot simply be freed."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = model()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x).reshape(1, 3)


def test_fixed_batch_that_cannot_be_rewritten_runs_in_chunks(tmp_path: Path) -> None:
    m = HardBatch().eval()
    adapter = load_model(export(m, tmp_path / "hard.onnx", dynamic=False), InputSpec(), "cpu")
    assert adapter.input_spec.fixed_batch == 1
    assert any("running in chunks of 1" in n for n in adapter.notes)
    x = batch(4)
    assert np.allclose(adapter.forward(x)["output"], reference(m.inner, x), atol=1e-5)
    converted = adapter.torch_module()
    if converted is not None:  # gradients still work through the chunking wrapper
        assert np.allclose(reference(converted, x), reference(m.inner, x), atol=1e-5)


class ChannelsLastModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = model()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.permute(0, 3, 1, 2))


def test_nhwc_layout_is_read_from_the_file(tmp_path: Path) -> None:
    m = ChannelsLastModel().eval()
    adapter = load_model(export(m, tmp_path / "nhwc.onnx", torch.zeros(1, SIZE, SIZE, 3)), InputSpec(), "cpu")
    assert adapter.input_spec.layout == "nhwc" and adapter.input_spec.channels == 3
    x = batch()
    assert np.allclose(adapter.forward(x)["output"], reference(m.inner, x), atol=1e-5)
    assert np.allclose(reference(adapter.torch_module(), x), reference(m.inner, x), atol=1e-5)


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = model()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.inner(x)
        return logits * 0 + 1, logits


def test_several_outputs_and_output_name(tmp_path: Path) -> None:
    m = TwoHeads().eval()
    path = export(m, tmp_path / "two.onnx", output_names=["aux", "scores"])
    default = load_model(path, InputSpec(), "cpu")
    assert default.output_name == "aux" and any("auditing 'aux'" in n for n in default.notes)
    chosen = load_model(path, InputSpec(), "cpu", output_name="scores")
    x = batch()
    assert np.allclose(chosen.forward(x)["output"], reference(m.inner, x), atol=1e-5)
    assert np.allclose(reference(chosen.torch_module(), x), reference(m.inner, x), atol=1e-5)
    with pytest.raises(InputError, match="the model's outputs are aux, scores"):
        load_model(path, InputSpec(), "cpu", output_name="nope")


def opset7_model(path: Path) -> tuple[Path, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A hand-built opset-7 graph (Conv, Relu, GlobalAveragePool, Flatten, Gemm), as old exporters wrote."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    fw = rng.standard_normal((3, 4)).astype(np.float32)
    fb = rng.standard_normal(3).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["data", "w", "b"], ["c"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "fw", "fb"], ["prob_logits"], transB=1),
    ]
    weights = {"w": w, "b": b, "fw": fw, "fb": fb}
    graph = helper.make_graph(
        nodes, "old",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, SIZE, SIZE])]
        + [helper.make_tensor_value_info(n, TensorProto.FLOAT, a.shape) for n, a in weights.items()],  # IR 3 lists weights as inputs
        [helper.make_tensor_value_info("prob_logits", TensorProto.FLOAT, [1, 3])],
        [numpy_helper.from_array(a, n) for n, a in weights.items()],
    )
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 7)], ir_version=3)
    onnx.save(onnx_model, path)
    return path, w, b, fw, fb


def test_old_opset_file_runs_and_converts(tmp_path: Path) -> None:
    path, w, b, fw, fb = opset7_model(tmp_path / "old.onnx")
    adapter = load_model(path, InputSpec(), "cpu")
    x = batch(3)
    ref = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b), padding=1).relu().mean((2, 3))
    expected = (ref @ torch.from_numpy(fw).T + torch.from_numpy(fb)).numpy()
    assert np.allclose(adapter.forward(x)["output"], expected, atol=1e-4)
    assert adapter.describe()["opset"] == 7
    assert adapter.capabilities[Capability.GRADIENTS] is None, adapter.notes
    assert any("opset 7 converted to opset" in n for n in adapter.notes)


def test_unreadable_onnx_file(tmp_path: Path) -> None:
    path = tmp_path / "junk.onnx"
    path.write_bytes(b"not a protobuf at all")
    with pytest.raises(ModelLoadError, match=r"junk\.onnx: not a readable ONNX file"):
        load_model(path, InputSpec(), "cpu")
    with pytest.raises(InputError, match="model file not found"):
        load_model(tmp_path / "absent.onnx", InputSpec(), "cpu")


def write_factory(tmp_path: Path, functional: bool = False) -> str:
    source = tmp_path / "net.py"
    source.write_text(
        "import torch\nfrom tests.test_models import Small\n\n"
        f"def build():\n    torch.manual_seed(0)\n    return Small(functional={functional})\n"
    )
    return f"{source}:build"


def test_factory_with_state_dict_and_capabilities(tmp_path: Path) -> None:
    trained = model()
    with torch.no_grad():
        trained.fc.bias.fill_(3.0)
    torch.save({"state_dict": {f"module.{k}": v for k, v in trained.state_dict().items()}}, tmp_path / "w.pt")
    adapter = load_model(write_factory(tmp_path), InputSpec(size=(SIZE, SIZE)), "cpu", weights=tmp_path / "w.pt")
    x = batch()
    assert np.allclose(adapter.forward(x)["output"], reference(trained, x), atol=1e-6)
    assert adapter.format == "python" and adapter.input_spec.channels == 3
    assert all(reason is None for reason in adapter.capabilities.values())
    assert len(adapter.files) == 2


def test_functional_relu_is_detected(tmp_path: Path) -> None:
    adapter = load_model(write_factory(tmp_path, functional=True), InputSpec(size=(SIZE, SIZE)), "cpu")
    reason = adapter.capabilities[Capability.RELU_MODULES]
    assert reason is not None and "applies ReLU functionally" in reason
    assert adapter.capabilities[Capability.GRADIENTS] is None


def test_weights_that_do_not_fit(tmp_path: Path) -> None:
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(ModelLoadError, match=r"bad\.pt: weights do not fit the model \(missing keys conv\.bias, fc\.weight, fc\.bias; shape mismatches conv\.weight \(1,\) vs \(4, 3, 3, 3\)\)"):
        load_model(write_factory(tmp_path), InputSpec(size=(SIZE, SIZE)), "cpu", weights=tmp_path / "bad.pt")


def test_torchscript_takes_no_hooks(tmp_path: Path) -> None:
    m = model()
    torch.jit.script(m).save(str(tmp_path / "m.pt"))
    adapter = load_model(tmp_path / "m.pt", InputSpec(size=(SIZE, SIZE)), "cpu")
    assert adapter.format == "torchscript"
    assert adapter.capabilities[Capability.HOOKS] == "TorchScript modules take no hooks"
    assert adapter.capabilities[Capability.GRADIENTS] is None
    x = batch()
    assert np.allclose(adapter.forward(x)["output"], reference(m, x), atol=1e-6)


def test_state_dict_given_as_model_is_explained(tmp_path: Path) -> None:
    torch.save(model().state_dict(), tmp_path / "sd.pt")
    with pytest.raises(InputError, match=r"this is a state dict, not a TorchScript model; pass --model file\.py:factory --weights sd\.pt"):
        load_model(tmp_path / "sd.pt", InputSpec(size=(SIZE, SIZE)), "cpu")


def test_exported_program_with_static_batch_runs_in_chunks(tmp_path: Path) -> None:
    m = model()
    program = torch.export.export(m, (torch.zeros(2, 3, SIZE, SIZE),))
    torch.export.save(program, tmp_path / "m.pt2")
    adapter = load_model(tmp_path / "m.pt2", InputSpec(size=(SIZE, SIZE)), "cpu")
    assert adapter.format == "torch.export" and adapter.input_spec.fixed_batch == 2
    x = batch(5)
    assert np.allclose(adapter.forward(x)["output"], reference(m, x), atol=1e-5)


def test_factory_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        load_model(f"{tmp_path / 'nope.py'}:build", InputSpec(size=(SIZE, SIZE)), "cpu")
    with pytest.raises(InputError, match="has no attribute 'missing'"):
        load_model(write_factory(tmp_path).replace(":build", ":missing"), InputSpec(size=(SIZE, SIZE)), "cpu")
    with pytest.raises(ModelLoadError, match="check --input-size, --channels and --layout"):
        load_model(write_factory(tmp_path), InputSpec(size=(SIZE, SIZE), channels=5), "cpu")


@pytest.mark.parametrize(
    ("raw", "requested", "kind", "classes"),
    [
        (np.array([[2.0, -1.0, 0.5], [0.1, 0.2, 0.3]]), "auto", "logits", 3),
        (np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]), "auto", "probabilities", 3),
        (np.array([[0.7, 0.2, 0.1]]), "logits", "logits", 3),
        (np.array([[0.9], [0.2]]), "auto", "sigmoid-probability", 2),
        (np.array([[3.0], [-2.0]]), "auto", "sigmoid-logit", 2),
        (np.array([3.0, -2.0]), "sigmoid", "sigmoid-logit", 2),
    ],
)
def test_output_interpretation(raw: np.ndarray, requested: str, kind: str, classes: int) -> None:
    interpretation = interpret(raw, requested)
    assert (interpretation.kind, interpretation.num_classes) == (kind, classes)
    probs = interpretation.probabilities(raw)
    assert probs.shape == (len(raw), classes) and np.allclose(probs.sum(axis=1), 1)
    torch_probs = interpretation.torch_probabilities(torch.from_numpy(np.asarray(raw, np.float64)))
    assert np.allclose(torch_probs.numpy(), probs)
    if kind == "probabilities":
        assert np.allclose(probs, raw)  # no second softmax
    if kind == "sigmoid-probability":
        assert np.allclose(probs[:, 1], raw[:, 0])


def test_output_interpretation_errors() -> None:
    with pytest.raises(ModelLoadError, match="N x classes"):
        interpret(np.zeros((2, 3, 4)), "auto")
    with pytest.raises(ModelLoadError, match="needs a single output column"):
        interpret(np.zeros((2, 3)), "sigmoid")
    with pytest.raises(ModelLoadError, match="NaN"):
        interpret(np.array([[np.nan, 1.0]]), "auto")
