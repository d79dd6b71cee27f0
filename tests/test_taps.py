"""The tap vocabulary (output, embedding, layer:NAME) served alike by the torch and the ONNX adapter:
the same network through both gives the same embedding and layer activations, and the ONNX side gets
them from onnxruntime alone, never from the onnx2torch conversion."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from audit.errors import TapError
from audit.models import InputSpec, ModelAdapter, load_model
from tests.conftest import onnx_conversion_forbidden

SIZE = 16
FACTORY = "tests.test_taps"


class CNN(nn.Module):
    """conv-relu-pool-flatten-linear-relu-linear, the shape of the classifiers the audit meets."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(4 * (SIZE // 2) ** 2, 10)
        self.relu2 = nn.ReLU()
        self.fc2 = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.relu2(self.fc1(self.pool(self.relu1(self.conv1(x))).flatten(1))))


class ChannelsLast(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = build_cnn()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.permute(0, 3, 1, 2))


class HardBatch(nn.Module):
    """Reshapes with a literal batch size of 2, so the exported batch dimension cannot be freed."""

    def __init__(self) -> None:
        super().__init__()
        self.net = build_cnn()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).reshape(2, 3)


class SharedRelu(nn.Module):
    """One nn.ReLU module applied twice: its output within a pass is ambiguous."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.relu(self.relu(self.conv(x)) - 0.5).mean((2, 3)))


def build_cnn() -> CNN:
    torch.manual_seed(0)
    return CNN().eval()


def build_channels_last() -> ChannelsLast:
    return ChannelsLast().eval()


def build_shared_relu() -> SharedRelu:
    torch.manual_seed(0)
    return SharedRelu().eval()


def build_conv_head() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 3, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()


def batch(n: int = 5, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, SIZE, SIZE)).astype(np.float32)


def expected(x: np.ndarray) -> dict[str, np.ndarray]:
    """The CNN's activations, computed by calling its parts: no hooks, no adapter."""
    m = build_cnn()
    with torch.no_grad():
        conv1 = m.conv1(torch.from_numpy(x))
        relu1 = m.relu1(conv1)
        flat = m.pool(relu1).flatten(1)
        relu2 = m.relu2(m.fc1(flat))
        return {"conv1": conv1.numpy(), "relu1": relu1.numpy(), "flat": flat.numpy(), "relu2": relu2.numpy(), "output": m.fc2(relu2).numpy()}


def export(m: nn.Module, path: Path, example: torch.Tensor | None = None, dynamic: bool = True) -> Path:
    """As the repo's other ONNX tests export: TorchScript exporter (dynamo=False), opset 17."""
    example = torch.zeros(1, 3, SIZE, SIZE) if example is None else example
    axes = {"x": {0: "n"}, "logits": {0: "n"}} if dynamic else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, (example,), str(path), dynamo=False, opset_version=17, input_names=["x"], output_names=["logits"],
                          dynamic_axes=axes)
    return path


def node(path: Path, name: str) -> onnx.NodeProto:
    """The exported node of a module's operator, e.g. `/relu1/Relu` for module relu1's ReLU."""
    return next(n for n in onnx.load(str(path)).graph.node if n.name == name)


@pytest.fixture
def no_conversion() -> Iterator[list[str]]:
    """onnx2torch disabled: loading records the attempt, any later call fails the test."""
    with onnx_conversion_forbidden() as attempts:
        yield attempts


def torch_cnn(**kwargs: object) -> ModelAdapter:
    return load_model(f"{FACTORY}:build_cnn", InputSpec(size=(SIZE, SIZE)), "cpu", **kwargs)  # type: ignore[arg-type]


def test_embedding_and_layer_taps_agree_between_torch_and_onnx(tmp_path: Path, no_conversion: list[str]) -> None:
    path = export(build_cnn(), tmp_path / "cnn.onnx")
    onnx_model = load_model(path, InputSpec(), "cpu")
    assert onnx_model.torch_module() is None and no_conversion == ["convert_to_torch"]
    torch_model = torch_cnn()
    relu1 = node(path, "/relu1/Relu").output[0]
    conv1 = node(path, "/conv1/Conv").output[0]
    assert onnx_model.embedding_source() == node(path, "/fc2/Gemm").input[0]
    assert torch_model.embedding_source() == "fc2"

    x = batch(5)
    from_torch = torch_model.forward(x, frozenset({"embedding", "layer:relu1", "layer:conv1"}))
    from_onnx = onnx_model.forward(x, frozenset({"embedding", f"layer:{relu1}", f"layer:{conv1}"}))
    ref = expected(x)
    assert from_torch["embedding"].shape == from_onnx["embedding"].shape == (5, 10)
    assert from_torch["embedding"].dtype == from_onnx["embedding"].dtype == np.float32
    np.testing.assert_allclose(from_onnx["embedding"], from_torch["embedding"], atol=1e-5)
    np.testing.assert_allclose(from_onnx[f"layer:{relu1}"], from_torch["layer:relu1"], atol=1e-5)
    np.testing.assert_allclose(from_onnx[f"layer:{conv1}"], from_torch["layer:conv1"], atol=1e-5)
    np.testing.assert_allclose(from_torch["embedding"], ref["relu2"], atol=1e-6)
    np.testing.assert_allclose(from_torch["layer:relu1"], ref["relu1"], atol=1e-6)
    np.testing.assert_allclose(from_onnx["output"], ref["output"], atol=1e-5)
    assert set(onnx_model.forward(x)) == {"output"}  # plain passes stay on the original session
    assert onnx_model.session is not None and len(onnx_model._tap_sessions) == 1  # type: ignore[attr-defined]
    onnx_model.forward(x, frozenset({f"layer:{conv1}", f"layer:{relu1}", "embedding"}))
    assert len(onnx_model._tap_sessions) == 1  # type: ignore[attr-defined]  # cached per set of outputs


def test_missing_layer_is_refused_with_the_name(tmp_path: Path, no_conversion: list[str]) -> None:
    torch_model = torch_cnn()
    reason = torch_model.tap_reason("layer:conv9")
    assert reason is not None and "no module named 'conv9'" in reason and "conv1" in reason
    with pytest.raises(TapError, match=r"tap layer:conv9: the model has no module named 'conv9'"):
        torch_model.forward(batch(2), frozenset({"layer:conv9"}))

    onnx_model = load_model(export(build_cnn(), tmp_path / "cnn.onnx"), InputSpec(), "cpu")
    reason = onnx_model.tap_reason("layer:/conv9/Conv_output_0")
    assert reason is not None and reason.startswith("no tensor named '/conv9/Conv_output_0' in the ONNX graph (closest: /conv1/Conv_output_0")
    with pytest.raises(TapError, match="tap layer:/conv9/Conv_output_0: no tensor named"):
        onnx_model.forward(batch(2), frozenset({"layer:/conv9/Conv_output_0"}))

    for model in (torch_model, onnx_model):
        assert model.supported_taps() == {"output": None, "embedding": None, "layer:*": None}
        assert model.tap_reason("output") is None
        assert model.tap_reason("logits") == "unknown tap 'logits' (taps: output, embedding, layer:NAME)"
        assert model.tap_reason("layer:") == "a layer tap needs a name: layer:NAME"
        with pytest.raises(TapError, match="unknown tap"):
            model.forward(batch(2), frozenset({"logits"}))


def test_fixed_batch_onnx_taps_for_a_batch_not_a_multiple(tmp_path: Path, no_conversion: list[str]) -> None:
    path = export(HardBatch().eval(), tmp_path / "hard.onnx", torch.zeros(2, 3, SIZE, SIZE), dynamic=False)
    adapter = load_model(path, InputSpec(), "cpu")
    assert adapter.input_spec.fixed_batch == 2
    relu1 = node(path, "/net/relu1/Relu").output[0]
    x = batch(5)
    out = adapter.forward(x, frozenset({"embedding", f"layer:{relu1}"}))
    ref = expected(x)
    assert out[f"layer:{relu1}"].shape == (5, 4, SIZE, SIZE)
    np.testing.assert_allclose(out[f"layer:{relu1}"], ref["relu1"], atol=1e-5)
    np.testing.assert_allclose(out["embedding"], ref["relu2"], atol=1e-5)
    np.testing.assert_allclose(out["output"], ref["output"], atol=1e-5)


def test_fixed_batch_torch_taps_resolve_through_the_wrapper(tmp_path: Path) -> None:
    """torch.export at batch 2 runs in chunks (FixedBatch around the unflattened program): one capture
    per chunk, the padding dropped; names are the user's, not FixedBatch's `inner.` ones."""
    program = torch.export.export(build_cnn(), (torch.zeros(2, 3, SIZE, SIZE),))
    torch.export.save(program, tmp_path / "cnn.pt2")
    adapter = load_model(tmp_path / "cnn.pt2", InputSpec(size=(SIZE, SIZE)), "cpu")
    assert adapter.input_spec.fixed_batch == 2
    assert adapter.embedding_source() == "fc2"  # from the program's module stack: its submodules are no nn.Linear
    assert adapter.tap_reason("layer:inner.conv1") is not None
    x = batch(5)
    out = adapter.forward(x, frozenset({"layer:conv1", "embedding"}))
    ref = expected(x)
    np.testing.assert_allclose(out["layer:conv1"], ref["conv1"], atol=1e-5)
    np.testing.assert_allclose(out["embedding"], ref["relu2"], atol=1e-5)


def test_embedding_override_on_both_adapters(tmp_path: Path, no_conversion: list[str]) -> None:
    """torch names the head module (its input is read); ONNX names the tensor itself."""
    path = export(build_cnn(), tmp_path / "cnn.onnx")
    flat = node(path, "/fc1/Gemm").input[0]
    torch_model = torch_cnn(embedding_layer="fc1")
    onnx_model = load_model(path, InputSpec(), "cpu", embedding_layer=flat)
    assert (torch_model.embedding_source(), onnx_model.embedding_source()) == ("fc1", flat)
    x = batch(3)
    from_torch = torch_model.forward(x, frozenset({"embedding"}))["embedding"]
    from_onnx = onnx_model.forward(x, frozenset({"embedding"}))["embedding"]
    assert from_torch.shape == from_onnx.shape == (3, 4 * (SIZE // 2) ** 2)
    np.testing.assert_allclose(from_onnx, from_torch, atol=1e-5)
    np.testing.assert_allclose(from_torch, expected(x)["flat"], atol=1e-6)

    for model, name in ((torch_cnn(embedding_layer="fc9"), "fc9"), (load_model(path, InputSpec(), "cpu", embedding_layer="flat9"), "flat9")):
        reason = model.tap_reason("embedding")
        assert reason is not None and reason.startswith("--embedding-layer: ") and repr(name) in reason
        assert model.embedding_source() is None
        assert model.describe()["taps"]["embedding"] == {"source": None, "reason": reason}
        with pytest.raises(TapError, match=f"tap embedding: --embedding-layer: .*{name}"):
            model.forward(x, frozenset({"embedding"}))


def test_nhwc_inputs(tmp_path: Path, no_conversion: list[str]) -> None:
    """The layout conversion happens before the taps: both take NCHW and read the same activations."""
    path = export(build_channels_last(), tmp_path / "nhwc.onnx", torch.zeros(1, SIZE, SIZE, 3))
    onnx_model = load_model(path, InputSpec(), "cpu")
    assert onnx_model.input_spec.layout == "nhwc"
    torch_model = load_model(f"{FACTORY}:build_channels_last", InputSpec(size=(SIZE, SIZE), layout="nhwc"), "cpu")
    relu1 = node(path, "/net/relu1/Relu").output[0]
    x = batch(4)
    from_onnx = onnx_model.forward(x, frozenset({"embedding", f"layer:{relu1}"}))
    from_torch = torch_model.forward(x, frozenset({"embedding", "layer:net.relu1"}))  # InputLayout's inner. is not part of it
    ref = expected(x)
    np.testing.assert_allclose(from_onnx[f"layer:{relu1}"], ref["relu1"], atol=1e-5)
    np.testing.assert_allclose(from_torch["layer:net.relu1"], ref["relu1"], atol=1e-6)
    np.testing.assert_allclose(from_onnx["embedding"], from_torch["embedding"], atol=1e-5)
    np.testing.assert_allclose(from_torch["embedding"], ref["relu2"], atol=1e-6)


def test_models_without_a_head_or_hooks_say_why(tmp_path: Path) -> None:
    conv_head = load_model(f"{FACTORY}:build_conv_head", InputSpec(size=(SIZE, SIZE)), "cpu")
    assert conv_head.tap_reason("embedding") == (
        "no nn.Linear classifier head found; give --embedding-layer (the head module, whose input is the embedding)"
    )
    assert conv_head.tap_reason("layer:0") is None
    onnx_conv_head = load_model(export(build_conv_head(), tmp_path / "head.onnx"), InputSpec(), "cpu")
    reason = onnx_conv_head.tap_reason("embedding")
    assert reason is not None and reason.startswith("no Gemm or MatMul classifier head found in the ONNX graph")

    torch.jit.script(build_cnn()).save(str(tmp_path / "cnn.pt"))
    scripted = load_model(tmp_path / "cnn.pt", InputSpec(size=(SIZE, SIZE)), "cpu")
    served = scripted.supported_taps()
    assert served["output"] is None
    assert served["embedding"] == served["layer:*"] == "taps are read by module hooks: TorchScript modules take no hooks"
    assert scripted.tap_reason("layer:conv1") == served["layer:*"]
    with pytest.raises(TapError, match="tap layer:conv1: taps are read by module hooks"):
        scripted.forward(batch(2), frozenset({"layer:conv1"}))
    assert scripted.forward(batch(2))["output"].shape == (2, 3)


def test_a_module_run_twice_has_no_single_output() -> None:
    adapter = load_model(f"{FACTORY}:build_shared_relu", InputSpec(size=(SIZE, SIZE)), "cpu")
    with pytest.raises(TapError, match=r"tap layer:relu: module 'relu' ran 2 times for 1 call\(s\) of the model"):
        adapter.forward(batch(2), frozenset({"layer:relu"}))
    assert adapter.forward(batch(2), frozenset({"layer:conv"}))["layer:conv"].shape == (2, 3, SIZE, SIZE)


def test_describe_lists_the_taps(tmp_path: Path, no_conversion: list[str]) -> None:
    path = export(build_cnn(), tmp_path / "cnn.onnx")
    assert torch_cnn().describe()["taps"] == {
        "embedding": {"source": "fc2", "reason": None},
        "served": {"output": None, "embedding": None, "layer:*": None},
    }
    info = load_model(path, InputSpec(), "cpu").describe()["taps"]
    assert info["embedding"] == {"source": node(path, "/fc2/Gemm").input[0], "reason": None}
