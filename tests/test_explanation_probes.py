"""Attribution, occlusion and background probes: hand-computed values on tiny models, direct captum
cross-checks through the pipeline, and an ONNX file onnx2torch cannot convert."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from audit.probes.background import localisation, region_shapley
from audit.probes.occlusion import background_region
from audit.probes.sampling import detail_sample
from audit.rules.catalogue import load_catalogue
from audit.rules.engine import ProbeState, RuleEngine
from tests.onnx_fixtures import unconvertible

SIZE = 16

LEFT_HALF_MODEL = textwrap.dedent(
    '''
    import torch
    from torch import nn


    class LeftHalf(nn.Module):
        """Class 0 scores the mean of the image's left half; class 1 a constant: all evidence is on the left."""

        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.tensor(4.0))
            self.relu = nn.ReLU()

        def forward(self, x):
            left = self.relu(x[..., : x.shape[-1] // 2]).mean(dim=(1, 2, 3)) * self.scale
            return torch.stack([left, torch.zeros_like(left) + 0.5], dim=1)


    def build():
        return LeftHalf()
    '''
)


def test_region_shapley_by_hand() -> None:
    masks = np.zeros((1, 4, 4), bool)
    masks[0, :, :1] = True  # the object covers a quarter of the image
    row = region_shapley(np.array([0.9]), np.array([0.2]), np.array([0.8]), np.array([0.1]), masks).iloc[0]
    assert row.phi_object == pytest.approx(0.5 * ((0.9 - 0.8) + (0.2 - 0.1)))
    assert row.phi_background == pytest.approx(0.5 * ((0.9 - 0.2) + (0.8 - 0.1)))
    assert row.phi_object + row.phi_background == pytest.approx(0.9 - 0.1)  # efficiency
    assert row.outside_share == pytest.approx(0.7 / 0.8)
    assert row.outside_ratio == pytest.approx(0.875 / 0.75)
    assert row.pointing_hit == 0.0


def test_localisation_by_hand_and_uniform_maps_do_not_fail() -> None:
    mask = np.zeros((2, 4, 4), np.float32)
    mask[:, :, :2] = 1.0
    maps = np.stack([np.ones((4, 4)), np.where(np.arange(4)[None, :] >= 2, 1.0, -1.0) * np.ones((4, 4))])
    maps[1, 0, 3] = 5.0
    out = localisation(maps, mask)
    assert out["outside_ratio"].tolist() == pytest.approx([1.0, 2.0])  # uniform: no preference; all outside: 1 / 0.5
    assert out["pointing_hit"].tolist() == [1.0, 0.0]  # first maximum of a flat map is at (0, 0), on the object
    table = pd.DataFrame({"id": [f"s{i}" for i in range(12)], "class": "wolf", "domain": "sim", "outside_ratio": 1.0})
    rule = next(r for r in load_catalogue() if r.id == "background-reliance")
    (finding,) = RuleEngine({}, lambda name: table if name == "background" else None, {"background": ProbeState("ok")}).evaluate([rule])
    assert finding.status != "fail"  # calibrated: a model with uniform attribution does not fail


def test_background_region_is_as_large_as_the_object_and_far_from_it() -> None:
    mask = np.zeros((8, 8), bool)
    mask[1:3, 1:3] = True
    region = background_region(mask)
    assert region.sum() == 4 and not (region & mask).any()
    assert region[7, 7] and not region[3, 3]


def test_detail_sample_is_stable_and_prefers_masks() -> None:
    rows = pd.DataFrame({"id": [f"s{i}" for i in range(40)], "class": ["a", "b"] * 20, "has_mask": [i % 4 < 2 for i in range(40)]})
    first = detail_sample(rows, 5, 100, seed=1, prefer="has_mask")
    assert first["id"].tolist() == detail_sample(rows.sample(frac=1, random_state=0), 5, 100, seed=1, prefer="has_mask")["id"].tolist()
    assert (first.groupby("class").size() == 5).all()
    assert first["has_mask"].all()  # ten masked rows per class exist, so only masked ones are chosen


@pytest.fixture(scope="module")
def left_half(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Images bright on the left; the mask (the 'object') is the right half: all evidence is on the background."""
    root = tmp_path_factory.mktemp("left-half")
    rng = np.random.default_rng(0)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[:, SIZE // 2 :] = 255
    Image.fromarray(mask).save(root / "mask.png")
    rows = ["id,path,label,mask"]
    for i in range(24):
        img = (rng.random((SIZE, SIZE, 3)) * 80).astype(np.uint8)
        img[:, : SIZE // 2] += 150
        Image.fromarray(img).save(root / f"{i}.png")
        rows.append(f"s{i},{i}.png,0,mask.png")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    (root / "left.py").write_text(LEFT_HALF_MODEL)
    return root


def run(args: list[str]) -> dict:
    from audit.cli import main

    assert main([*args, "--quiet", "--fail-on", "never"]) == 0
    out = Path(args[args.index("--out") + 1])
    return json.loads((out / "results.json").read_text())


def test_left_half_model_puts_all_evidence_on_the_left(left_half: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    results = run(["run", "--model", f"{left_half / 'left.py'}:build", "--manifest", str(left_half / "manifest.csv"),
                   "--profile", "smoke", "--out", str(out)])
    methods = pd.read_parquet(out / "samples" / "background_methods.parquet")
    by_method = methods.groupby("method")["outside_ratio"].mean()
    for method in ("saliency", "gradient_x_input", "integrated_gradients", "guided_backprop"):
        assert by_method[method] == pytest.approx(2.0), method  # every bit of evidence outside a half-image object
    occlusion = pd.read_parquet(out / "samples" / "occlusion.parquet")
    assert (occlusion["object_drop"].abs() < 1e-6).all()  # covering the right half changes nothing
    assert (occlusion["background_drop"] > 0).all()
    # Re-drawing the model's only weight rescales its maps without reordering them: rank correlation 1,
    # so no gradient method is trusted to have learned anything (the randomisation test's known answer).
    assert results["metrics"]["attribution.sanity_correlation@method:saliency"] == pytest.approx(1.0)
    assert results["probes"]["attribution"]["details"]["chosen"] is None


def test_saliency_through_the_pipeline_equals_direct_captum(left_half: Path, tmp_path: Path) -> None:
    """The probe's localisation for saliency equals the same numbers computed from a direct captum call."""
    from captum.attr import Saliency

    out = tmp_path / "run"
    run(["run", "--model", f"{left_half / 'left.py'}:build", "--manifest", str(left_half / "manifest.csv"),
         "--profile", "smoke", "--out", str(out), "--mean", "0.2", "--std", "0.5"])
    methods = pd.read_parquet(out / "samples" / "background_methods.parquet")
    saliency = methods[methods["method"] == "saliency"].set_index("id")
    import importlib.util

    spec = importlib.util.spec_from_file_location("left_direct", left_half / "left.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    model = module.build().eval()
    ids = list(saliency.index)
    x = np.stack([np.asarray(Image.open(left_half / f"{i[1:]}.png"), np.float32).transpose(2, 0, 1) / 255 for i in ids])
    x = torch.from_numpy((x - 0.2) / 0.5).requires_grad_(True)
    maps = Saliency(model).attribute(x, target=0, abs=True).sum(dim=1).detach().numpy()
    mask = (np.asarray(Image.open(left_half / "mask.png")) > 0).astype(np.float32)
    expected = localisation(maps, np.broadcast_to(mask, maps.shape))
    assert saliency["outside_ratio"].to_numpy() == pytest.approx(expected["outside_ratio"].to_numpy())
    assert saliency["outside_share"].to_numpy() == pytest.approx(expected["outside_share"].to_numpy())


def test_unconvertible_onnx_still_gets_occlusion_background_and_swaps(dataset, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model = unconvertible(tmp_path / "l2norm.onnx", size=SIZE).path
    out = tmp_path / "run"
    results = run(["run", "--model", str(model), "--manifest", str(dataset.manifest), "--classes", str(dataset.classes_file),
                   "--profile", "smoke", "--out", str(out)])
    reason = results["model"]["capabilities"]["gradients"]["reason"]
    assert "onnx2torch cannot convert" in reason and "LpNormalization" in reason
    probes = results["probes"]
    assert {p: probes[p]["status"] for p in ("attribution", "occlusion", "background")} == dict.fromkeys(("attribution", "occlusion", "background"), "ok")
    methods = {m["method"]: m for m in probes["attribution"]["details"]["methods"]}
    assert methods["saliency"]["status"] == "unsupported" and "LpNormalization" in methods["saliency"]["reason"]
    assert methods["feature_ablation"]["status"] == "ran" and methods["kernel_shap"]["status"] == "ran"
    assert any("perturbation methods" in note for note in probes["attribution"]["notes"])
    metrics = results["metrics"]
    assert "background.bg_gap" in metrics and "background.outside_ratio" in metrics and "occlusion.object_drop" in metrics
    html = (out / "report.html").read_text()
    assert "onnx2torch cannot convert" in html and "perturbation methods" in html
    assert html.count("Not run: onnx2torch cannot convert") == 1  # ten methods share one reason, written once under the table
