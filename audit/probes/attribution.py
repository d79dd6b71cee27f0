"""Attributions: which pixels the model's decision rests on, by ten gradient methods (captum), each
checked before it is believed.

Every method explains the predicted class on a stratified sample. Two checks decide what to trust:
the model-parameter randomisation test (Adebayo et al. 2018: a map that survives randomising the
weights shows the image, not the model) and the deletion curve (removing the most relevant pixels
first must lower the class probability faster than removing random ones). When the model cannot be
differentiated (an ONNX file onnx2torch cannot convert), perturbation methods run through
onnxruntime instead, and the report says so.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import Field, field_validator

from audit.attribution.evaluation import (
    MAX_STEPS,
    _parameterised_layers,
    cascade_steps,
    curve_ends,
    deletion_curve,
    randomisation_tests,
)
from audit.attribution.methods import (
    METHODS,
    AttributionParams,
    AttributionUnsupported,
    attribute,
    baseline_for,
    default_methods,
    fallback_methods,
    unsupported_reason,
)
from audit.errors import first_line
from audit.execution.costs import Passes
from audit.metrics.declarations import ColumnSpec, MetricSpec, TableSpec
from audit.metrics.names import scope
from audit.models.base import Capability
from audit.probes.base import (
    DetailBatch,
    DetailOutput,
    DetailPlan,
    Evidence,
    Probe,
    ProbeData,
    ProbeInputs,
    ProbeParams,
    Taps,
)
from audit.probes.model_functions import (
    DELETION_COLUMNS,
    SAMPLE_COLUMNS,
    deletion_batch,
    inputs_tensor,
    normalisation,
    probabilities_function,
    runs_onnxruntime,
    sample_rows,
    scores_function,
    shrink,
    torch_threads,
)
from audit.probes.registry import register
from audit.probes.sampling import detail_sample
from audit.store import ArrayTable

SANITY_REFERENCE = "Adebayo, Gilmer, Muelly, Goodfellow, Hardt, Kim. Sanity Checks for Saliency Maps. NeurIPS 2018."
DELETION_REFERENCE = ("Samek, Binder, Montavon, Lapuschkin, Müller. Evaluating the Visualization of What a Deep Neural "
                      "Network Has Learned. IEEE TNNLS 2017; Petsiuk, Das, Saenko. RISE. BMVC 2018.")


class AttributionProbeParams(ProbeParams):
    methods: list[str] | None = Field(default=None, description=(
        "methods to run; unset: the ten gradient methods other than lrp. A model without gradients runs feature_ablation "
        "and kernel_shap instead"))
    per_class: int = Field(default=64, ge=1, description="samples per class (true class, else prediction)")
    max_samples: int = Field(default=1024, ge=1, description="samples in all")
    ig_steps: int = Field(default=16, ge=2, description="Integrated Gradients steps")
    baseline: Literal["zeros", "blur", "mean"] = Field(default="zeros", description="reference input: black, blurred input, or mean colour")
    smoothgrad_samples: int = Field(default=8, ge=1, description="noisy copies per image for SmoothGrad")
    shap_samples: int = Field(default=8, ge=1, description="samples per image for GradientSHAP")
    kernel_shap_samples: int = Field(default=200, ge=10, description="coalitions per image for KernelSHAP (fallback)")
    grid: int = Field(default=8, ge=2, description="cells per side for feature ablation and KernelSHAP (fallback)")
    layer: str | None = Field(default=None, description="Grad-CAM layer; unset: the last convolution")
    batch_size: int = Field(default=32, ge=1, description="images explained together")
    internal_batch_size: int = Field(default=64, ge=1, description="most images in one forward/backward pass")
    deletion_steps: int = Field(default=12, ge=2, description="steps of the deletion curve (faithfulness)")
    sanity_samples: int = Field(default=8, ge=2, description="images in the randomisation test")
    sanity_steps: int | None = Field(default=MAX_STEPS, ge=1, description=(
        "cascading steps of the randomisation test, head first, at block granularity; null: one per parameterised layer"))
    sanity_threshold: float = Field(default=0.5, gt=0, le=1, description="rank correlation after randomising the weights above which a method is not trusted")

    @field_validator("methods")
    @classmethod
    def _known(cls, value: list[str] | None) -> list[str] | None:
        for name in value or []:
            if name not in METHODS or name == "occlusion":
                raise ValueError(f"unknown method {name!r} (one of {', '.join(m for m in METHODS if m != 'occlusion')}; occlusion is its own probe)")
        return value


@register
class Attribution(Probe):
    name = "attribution"
    title = "Attributions"
    question = (
        "Which pixels does the decision rest on, and which explanation methods can be believed? Each method "
        "explains the predicted class; methods whose maps survive randomising the model's weights, or that "
        "do not beat random pixel order at deleting evidence, are not trusted."
    )
    Params = AttributionProbeParams
    profile_defaults = {
        "smoke": {"per_class": 12, "max_samples": 48, "ig_steps": 8, "smoothgrad_samples": 4, "shap_samples": 4,
                  "kernel_shap_samples": 40, "deletion_steps": 8, "sanity_samples": 6,
                  "methods": ["saliency", "gradient_x_input", "integrated_gradients", "gradcam", "guided_backprop", "deconvolution"]},
        "thorough": {"per_class": 128, "max_samples": 2048, "ig_steps": 64, "smoothgrad_samples": 32, "shap_samples": 32,
                     "deletion_steps": 24, "sanity_samples": 32},
    }
    metrics = (
        MetricSpec("attribution.sanity_correlation", ("method",), "number",
                   "rank correlation of a method's maps with those of the model with randomised weights"),
        MetricSpec("attribution.deletion_auc", ("method",), "number", "area under the class probability as the most relevant pixels go first"),
        MetricSpec("attribution.random_deletion_auc", ("method",), "number", "the same area with pixels removed in random order"),
        MetricSpec("attribution.faithfulness", ("method",), "number", "random-order area minus the method's area (above 0: faithful)"),
        MetricSpec("attribution.trusted", ("method",), "number", "1 when the method passes both checks"),
        MetricSpec("attribution.n", ("global",), "count", "samples explained"),
        MetricSpec("attribution.methods_trusted", ("global",), "count", "methods that pass both checks"),
    )
    provides = (
        TableSpec("attribution", "detail", "one row per sample and method that explained it", (
            *SAMPLE_COLUMNS,
            ColumnSpec("target", "number", "the class explained (the prediction)"),
            ColumnSpec("method", "text", "the attribution method"),
            *DELETION_COLUMNS,
        )),
        TableSpec("attribution_maps", "detail", "each method's map of each sample, at most 64 pixels a side (float16)",
                  kind="array", keys=("id", "method")),
        TableSpec("attribution_failures", "detail", "a method that failed on a detail batch, and why", (
            ColumnSpec("method", "text", "the method"),
            ColumnSpec("status", "text", "unsupported or error"),
            ColumnSpec("reason", "text", "why"),
        ), keys=("batch",)),
        TableSpec("attribution_methods", "reduce", "one row per method: whether it ran, its checks, whether it is trusted", (
            ColumnSpec("sanity_correlation", "number", "randomisation-test rank correlation"),
            ColumnSpec("faithfulness", "number", "random-order deletion area minus the method's"),
            ColumnSpec("trusted", "number", "passes both checks"),
        ), keys=("method",)),
    )

    @classmethod
    def capability_uses(cls) -> list[str]:
        defaults = default_methods()
        lines = [f"{name}: {', '.join(sorted(c.value for c in spec.requires)) or 'a forward pass'}"
                 + ("" if name in defaults or spec.fallback else " (on request)")
                 for name, spec in METHODS.items() if name != "occlusion"]  # occlusion is its own probe
        fallback = ", ".join(fallback_methods())
        return [*lines, f"without gradients: {fallback} through the model's own runtime (the gradient methods are listed as not run)"]

    def map(self, batch, taps: Taps) -> pd.DataFrame:  # type: ignore[no-untyped-def]
        rows = sample_rows(batch, taps, self.context.classes)
        return rows.assign(target=rows["pred"])  # attributions explain the predicted class

    def _methods(self) -> tuple[list[str], dict[str, dict[str, Any]], list[str]]:
        """Which methods run; for the others, why not. Never runs a method in a degraded form."""
        model = self.context.model
        module = model.torch_module()
        notes = []
        requested = list(self.params.methods or default_methods())
        status: dict[str, dict[str, Any]] = {}
        for name in requested:
            spec = METHODS[name]
            reason = model.capabilities.get(Capability.GRADIENTS) if spec.gradient and module is None else None
            reason = reason or unsupported_reason(name, model.capabilities, module, self.params.layer)
            status[name] = {"status": "unsupported", "reason": reason} if reason else {"status": "ran", "reason": None}
        runnable = [m for m in requested if status[m]["status"] == "ran"]
        if module is None and not any(METHODS[m].gradient for m in runnable):
            why = model.capabilities.get(Capability.GRADIENTS) or "no differentiable module"
            notes.append(f"Gradient methods cannot run on this model ({why}); perturbation methods (feature ablation over a "
                         f"{self.params.grid} x {self.params.grid} grid, KernelSHAP) ran through the model's own runtime instead.")
            for name in fallback_methods():
                if name not in status:
                    status[name] = {"status": "ran", "reason": None}
                    runnable.append(name)
        return runnable, status, notes

    def select(self, rows: pd.DataFrame, inputs: ProbeInputs) -> DetailPlan:
        """The stratified sample, in batches of `batch_size`; the randomisation test takes its first
        `sanity_samples` when a gradient method runs. A time budget that cuts the sample cuts the
        randomisation test's images by the same fraction (at least 2, as its rule needs): its cost is
        otherwise fixed, and on a ResNet-18 it is a third of the maps'."""
        p = self.params
        self._runnable, self._status, self._notes = self._methods()
        self._chosen = detail_sample(rows, p.per_class, self.limited(p.max_samples), self.context.seed, prefer="has_mask")
        ids = self._chosen["id"].tolist()
        sanity = p.sanity_samples
        if self.sample_limit is not None and ids:
            full = len(detail_sample(rows, p.per_class, p.max_samples, self.context.seed, prefer="has_mask"))
            sanity = max(2, min(sanity, math.ceil(sanity * len(ids) / max(full, 1))))
        randomised = any(METHODS[m].gradient for m in self._runnable)
        return DetailPlan.of(ids if self._runnable else [], p.batch_size, step=tuple(ids[:sanity]) if randomised else ())

    def passes(self, plan: DetailPlan) -> Passes:
        """Each method's passes per explained image; the deletion curves (the random-order control and
        one per method, their shared first and last points once); and the randomisation test: its
        images through every gradient method on the trained model and after each cascade step."""
        h, w = self.context.prep.input_size
        settings = self._settings()
        per_image = Passes()
        for method in self._runnable:
            gradient, forward = METHODS[method].passes(settings, h, w)
            per_image += Passes(forward, gradient)
        per_image += Passes(forward=(self.params.deletion_steps - 1) * (len(self._runnable) + 1) + 2)
        samples = sum(len(b.ids) for b in plan.batches)
        gradient_methods = [m for m in self._runnable if METHODS[m].gradient]
        step = Passes()
        if plan.step and gradient_methods:
            per_step = sum(METHODS[m].passes(settings, h, w)[0] for m in gradient_methods)
            step = Passes(gradient=len(plan.step) * (self._cascade_length() + 1) * per_step)
        return per_image * samples + step

    def _cascade_length(self) -> int:
        """Steps of the randomisation test's cascade on this model (one forward pass of one image)."""
        module = self.context.model.torch_module()
        if module is None:
            return 0
        h, w = self.context.prep.input_size
        example = torch.zeros(1, self.context.prep.channels, h, w, device=self.context.model.device)
        return len(cascade_steps(module, _parameterised_layers(module, module, example), self.params.sanity_steps))

    def _runtime_threads(self):  # type: ignore[no-untyped-def]
        """Deletion curves run the real model; for ONNX that is onnxruntime, which needs the cores to itself."""
        return torch_threads(1) if runs_onnxruntime(self.context) else contextlib.nullcontext()

    def _deletion(self, probs_fn, x: torch.Tensor, target: torch.Tensor, results: dict[str, np.ndarray],  # type: ignore[no-untyped-def]
                  norm: Any) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Deletion areas of a batch: the random-order control, and the methods' maps stacked about
        `deletion_batch` images per call (bounded memory on large inputs), so the runtime gets large
        calls and torch and onnxruntime alternate about once per batch, not once per method. The
        curves' shared first and last points (intact, fully filled) are computed once."""
        p, seed = self.params, self.context.seed
        fill = baseline_for(x, p.baseline, normalisation=norm)
        n = len(x)
        names = list(results)
        rows = deletion_batch(self.context)
        per_call = max(1, rows // n)
        ranked: dict[str, np.ndarray] = {}
        with self._runtime_threads():
            ends = curve_ends(probs_fn, x, fill, target)
            control = deletion_curve(probs_fn, x, target, np.zeros((n, *x.shape[2:])), p.deletion_steps, fill, "random", seed, rows, ends)
            for start in range(0, len(names), per_call):
                part = names[start : start + per_call]
                k = len(part)
                stacked = deletion_curve(probs_fn, x.repeat(k, 1, 1, 1), target.repeat(k), np.concatenate([results[m] for m in part]),
                                         p.deletion_steps, fill.repeat(k, 1, 1, 1), "attribution", seed, rows,
                                         (np.tile(ends[0], k), np.tile(ends[1], k)), images=np.tile(np.arange(n), k))
                ranked.update({m: stacked.auc[i * n : (i + 1) * n] for i, m in enumerate(part)})
        return control.auc, ranked

    def _settings(self) -> AttributionParams:
        p = self.params
        return AttributionParams(ig_steps=p.ig_steps, internal_batch_size=p.internal_batch_size, baseline=p.baseline,
                                 smoothgrad_samples=p.smoothgrad_samples, shap_samples=p.shap_samples,
                                 kernel_shap_samples=p.kernel_shap_samples, grid=p.grid, batch_size=p.batch_size,
                                 layer=p.layer, seed=self.context.seed)

    def detail(self, batch: DetailBatch) -> DetailOutput:
        """Every method's maps of one batch and their deletion areas against the random-order control."""
        context = self.context
        module = context.model.torch_module()
        x = inputs_tensor(batch, context.model.device)
        target = torch.tensor(batch.rows["target"].to_numpy(np.int64)).to(x.device)
        settings = self._settings()
        norm = normalisation(context)
        probs_fn = probabilities_function(context)
        scores_fn = scores_function(context, module) if module is not None else None
        results: dict[str, np.ndarray] = {}
        failures = []
        for method in self._runnable:
            forward = scores_fn if METHODS[method].gradient else probs_fn
            try:
                results[method] = attribute(method, forward, x, target, settings, norm, module=module)
            except AttributionUnsupported as exc:
                failures.append({"batch": batch.index, "method": method, "status": "unsupported", "reason": str(exc)})
            except Exception as exc:  # noqa: BLE001 - one method failing must not lose the others
                failures.append({"batch": batch.index, "method": method, "status": "error", "reason": first_line(exc)})
        output = DetailOutput()
        if failures:
            output.tables["attribution_failures"] = pd.DataFrame(failures)
        if not results:
            return output
        control, ranked = self._deletion(probs_fn, x, target, results, norm)
        block = batch.rows[["id", "class", "domain", "target"]]
        output.tables["attribution"] = pd.concat([block.assign(method=method, deletion_auc=ranked[method], random_deletion_auc=control)
                                                  for method in results], ignore_index=True)
        names = list(results)
        output.arrays["attribution_maps"] = ArrayTable(
            pd.DataFrame({"id": np.tile(np.asarray(batch.ids, dtype=object), len(names)), "method": np.repeat(names, len(batch))}),
            {"map": np.concatenate([shrink(results[m]).astype(np.float16) for m in names])})  # kept small for localisation
        return output

    def step(self, batch: DetailBatch) -> dict[str, Any]:
        """Cascading randomisation of every gradient method (Adebayo et al.), on the step's samples."""
        x = inputs_tensor(batch, self.context.model.device)
        target = torch.tensor(batch.rows["target"].to_numpy(np.int64)).to(x.device)
        gradient = [m for m in self._runnable if METHODS[m].gradient]
        return self._sanity(gradient, x, target, self.context.model.torch_module(), self._settings(), normalisation(self.context))

    def reduce(self, data: ProbeData) -> Evidence:
        status = {m: dict(v) for m, v in self._status.items()}
        failures = data.tables["attribution_failures"]
        for row in failures.sort_values("batch", kind="stable").itertuples():
            if status[row.method]["status"] == "ran":  # the first batch a method failed on says why
                status[row.method] = {"status": row.status, "reason": row.reason}
        ran = [m for m in self._runnable if status[m]["status"] == "ran"]
        sanity = {m: v for m, v in (data.step or {}).items() if m in ran}
        if len(self._chosen):
            for method in ran:
                if not METHODS[method].gradient:
                    sanity[method] = {"correlation": None, "layers": [], "steps": [], "note": "perturbation method: reads the model only through its outputs"}
        return self._evidence(ran, status, sanity, self._notes, self._chosen, data.tables["attribution"])

    def _sanity(self, gradient: list[str], x: torch.Tensor, target: torch.Tensor, module: Any, settings: AttributionParams,
                norm: Any) -> dict[str, dict[str, Any]]:
        """Cascading randomisation per gradient method (perturbation methods read only outputs: nothing to randomise)."""
        out: dict[str, dict[str, Any]] = {}
        interpretation = self.context.interpretation

        def make_forward(m: torch.nn.Module):  # type: ignore[no-untyped-def]
            return lambda t: interpretation.torch_scores(m(t))

        if not gradient:
            return out
        try:
            results = randomisation_tests(module, make_forward, gradient, x, target, settings, norm, seed=self.context.seed,
                                         max_steps=self.params.sanity_steps)
        except Exception as exc:  # noqa: BLE001 - e.g. a model without parameterised layers
            results = dict.fromkeys(gradient, exc)
        for method, result in results.items():
            if isinstance(result, Exception):
                out[method] = {"correlation": None, "layers": [], "steps": [], "note": f"randomisation test failed ({first_line(result)})"}
                continue
            out[method] = {"correlation": result.final_correlation, "layers": list(result.layers),
                           "steps": [float(v) for v in result.step_correlations], "n": int(len(result.sample_correlations))}
        return out

    def _evidence(self, ran: list[str], status: dict[str, dict[str, Any]], sanity: dict[str, dict[str, Any]],
                  notes: list[str], chosen: pd.DataFrame, table: pd.DataFrame) -> Evidence:
        evidence = Evidence(notes=list(notes))
        threshold = self.params.sanity_threshold
        rows = []
        for name, state in status.items():
            spec = METHODS[name]
            row: dict[str, Any] = {"method": name, "title": spec.title, "short_title": spec.short_title, "reference": spec.reference, **state}
            group = table[table["method"] == name]
            if name in ran and len(group):
                s = scope(method=name)
                faith = float((group["random_deletion_auc"] - group["deletion_auc"]).mean())
                row.update(deletion_auc=float(group["deletion_auc"].mean()), random_deletion_auc=float(group["random_deletion_auc"].mean()),
                           faithfulness=faith, n=int(len(group)))
                evidence.add("attribution.deletion_auc", row["deletion_auc"], s, len(group))
                evidence.add("attribution.random_deletion_auc", row["random_deletion_auc"], s, len(group))
                evidence.add("attribution.faithfulness", faith, s, len(group))
                check = sanity.get(name, {})
                corr = check.get("correlation")
                row.update(sanity_correlation=corr, sanity_layers=check.get("layers", []), sanity_steps=check.get("steps", []),
                           sanity_note=check.get("note"))
                if corr is not None:
                    evidence.add("attribution.sanity_correlation", corr, s, check.get("n"))
                row["passes_sanity"] = (corr is None and not spec.gradient) or (corr is not None and corr < threshold)
                row["faithful"] = faith > 0
                row["trusted"] = bool(row["passes_sanity"] and row["faithful"])
                evidence.add("attribution.trusted", float(row["trusted"]), s, len(group))
            rows.append(row)
        trusted = sorted((r for r in rows if r.get("trusted")), key=lambda r: -r["faithfulness"])
        best = trusted[0] if trusted else None
        for rank, row in enumerate(sorted((r for r in rows if "faithfulness" in r), key=lambda r: -r["faithfulness"]), start=1):
            row["faithfulness_rank"] = rank
        evidence.add("attribution.n", len(chosen))
        evidence.add("attribution.methods_trusted", len(trusted))
        evidence.tables["attribution_methods"] = method_table(rows)
        evidence.details = {
            "samples": int(len(chosen)),
            "per_class": {str(k): int(v) for k, v in chosen["class"].value_counts().sort_index().items()},
            "methods": rows,
            "chosen": best["method"] if best else None,
            "chosen_reason": _trust_sentence(best, threshold) if best else
            "No method passed both checks, so no attribution map is used to judge background reliance.",
            "sanity_threshold": threshold,
            "baseline": self.params.baseline,
            "ig_steps": self.params.ig_steps,
            "deletion_steps": self.params.deletion_steps,
        }
        evidence.references = sorted({METHODS[m].reference for m in ran} | {SANITY_REFERENCE, DELETION_REFERENCE})
        return evidence


def method_table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """The method comparison as a table (the per-layer curves stay in the details)."""
    frame = pd.DataFrame([{k: v for k, v in r.items() if k not in ("sanity_layers", "sanity_steps", "reference")} for r in rows])
    for column in ("passes_sanity", "faithful", "trusted"):
        frame[column] = frame[column].astype("boolean") if column in frame else pd.array([pd.NA] * len(frame), dtype="boolean")
    for column in ("faithfulness", "deletion_auc", "random_deletion_auc", "sanity_correlation"):
        frame[column] = pd.to_numeric(frame[column], errors="coerce") if column in frame else np.nan
    return frame


def _trust_sentence(row: dict[str, Any], threshold: float) -> str:
    sanity = (f"its maps change when the model's weights are randomised (rank correlation {row['sanity_correlation']:.2f}, "
              f"below {threshold:.2f})" if row.get("sanity_correlation") is not None else "it reads the model only through its outputs")
    return (f"{row['title']} is trusted most: {sanity}, and deleting the pixels it ranks highest lowers the class probability "
            f"faster than any other trusted method (area under the deletion curve {row['deletion_auc']:.3f} against "
            f"{row['random_deletion_auc']:.3f} in random order).")
