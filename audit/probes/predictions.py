"""Predictions: accuracy, per-class precision / recall / F1, confusion, calibration (ECE), per domain.

Every number carries a bootstrap confidence interval. Samples without labels still get
predictions (confidence, predicted-class shares) but count towards no accuracy.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from pydantic import Field

from audit.metrics.classification import (
    Bootstrap,
    calibration_bins,
    confusion_matrix,
    expected_calibration_error,
    percentile_interval,
    precision_recall_f1,
    reliability_table,
)
from audit.metrics.declarations import ColumnSpec, MetricSpec, TableSpec
from audit.metrics.names import pair, scope
from audit.probes.base import Evidence, Probe, ProbeData, ProbeParams, Taps
from audit.probes.registry import register

MAX_STORED_PROBABILITIES = 100  # wider outputs keep only top-1 facts per sample
MISTAKES_SHOWN = 12  # most confident mistakes the report shows as thumbnails

_CLASS_SCOPES = ("class", "domain/class")
_RUN_SCOPES = ("global", "domain")


class PredictionsParams(ProbeParams):
    bootstrap: int = Field(default=1000, ge=0, description="bootstrap replicates for confidence intervals")
    confidence_level: float = Field(default=0.95, gt=0, lt=1, description="level of the bootstrap intervals")
    ece_bins: int = Field(default=15, ge=2, le=100, description="equal-width confidence bins of the calibration error and reliability diagram")
    histogram_bins: int = Field(default=20, ge=2, le=100, description="bins of the confidence histogram")


def most_confident_mistakes(rows: pd.DataFrame, n: int) -> list[str]:
    """Ids of the n wrong predictions made with the highest confidence, most confident first."""
    worst = rows.dropna(subset=["error_confidence"]).sort_values("error_confidence", ascending=False, kind="stable")
    return worst["id"].astype(str).head(n).tolist()


def choose_reference_domain(domains: list[str], counts: dict[str, int], requested: str | None) -> str | None:
    """The domain others are compared with: the configured one, else `sim`, else the largest."""
    if not domains:
        return None
    if requested is not None:
        return requested
    if "sim" in domains:
        return "sim"
    return sorted(domains, key=lambda d: (-counts.get(d, 0), d))[0]


@register
class Predictions(Probe):
    name = "predictions"
    title = "Predictions and calibration"
    question = (
        "How often is the model right, for which classes and domains, and does its confidence mean "
        "what it says? Intervals are 95% bootstrap intervals over samples."
    )
    Params = PredictionsParams
    profile_defaults = {"smoke": {"bootstrap": 200}, "standard": {"bootstrap": 1000}, "thorough": {"bootstrap": 2000}}
    references = [
        "Guo, Pleiss, Sun, Weinberger. On Calibration of Modern Neural Networks. ICML 2017.",
        "Efron, Tibshirani. An Introduction to the Bootstrap. 1993.",
    ]
    metrics = (
        MetricSpec("predictions.n", ("global",), "count", "samples predicted"),
        MetricSpec("predictions.n_labelled", ("global",), "count", "samples with a label"),
        MetricSpec("predictions.accuracy", _RUN_SCOPES, "percent", "share of labelled samples predicted right", interval=True),
        MetricSpec("predictions.ece", _RUN_SCOPES, "percent", "expected calibration error over equal-width confidence bins", interval=True),
        MetricSpec("predictions.mean_confidence", _RUN_SCOPES, "percent", "mean confidence of the predicted class, labelled or not"),
        MetricSpec("predictions.accuracy_gap", ("domain",), "points", "accuracy of the reference domain minus this domain's", interval=True),
        MetricSpec("predictions.support", _CLASS_SCOPES, "count", "labelled samples of the class"),
        MetricSpec("predictions.recall", _CLASS_SCOPES, "percent", "share of the class's samples predicted as the class", interval=True),
        MetricSpec("predictions.precision", _CLASS_SCOPES, "percent", "share of the predictions of the class that are right", interval=True),
        MetricSpec("predictions.f1", _CLASS_SCOPES, "percent", "harmonic mean of precision and recall", interval=True),
        MetricSpec("predictions.predicted_share", _CLASS_SCOPES, "percent", "share of samples predicted as the class, labelled or not"),
        MetricSpec("predictions.confusion_rate", ("pair",), "percent", "share of class A's samples predicted as B (the ten most frequent)"),
    )
    provides = (
        TableSpec("predictions", "map", "one row per sample: label, prediction, confidence", (
            ColumnSpec("label", "number", "true class index (empty when unlabelled)"),
            ColumnSpec("pred", "number", "predicted class index"),
            ColumnSpec("confidence", "percent", "probability of the predicted class"),
            ColumnSpec("prob_true", "percent", "probability of the true class"),
            ColumnSpec("correct", "number", "1 when the prediction is right (empty when unlabelled)"),
            ColumnSpec("margin", "percent", "top-1 minus top-2 probability"),
            ColumnSpec("entropy", "number", "entropy of the predicted distribution (nats)"),
            ColumnSpec("error_confidence", "percent", "confidence of a wrong prediction (empty when right or unlabelled)"),
        )),
    )

    def map(self, batch, taps: Taps) -> pd.DataFrame:  # type: ignore[no-untyped-def]
        probs = taps.probabilities
        names = np.asarray(self.context.classes, dtype=object)
        rows = np.arange(len(probs))
        if probs.shape[1] > 1:
            top2 = np.argpartition(-probs, 1, axis=1)[:, :2]
            swap = probs[rows, top2[:, 1]] > probs[rows, top2[:, 0]]
            top2[swap] = top2[swap][:, ::-1]
            pred, second = top2[:, 0], probs[rows, top2[:, 1]]
        else:
            pred, second = np.zeros(len(probs), np.int64), np.zeros(len(probs))
        top = probs[rows, pred]
        labels = batch.labels
        unlabelled = labels < 0
        safe = np.where(unlabelled, 0, labels)
        correct = pred == labels
        label_name = np.where(unlabelled, None, names[safe])
        frame = pd.DataFrame(
            {
                "id": batch.ids,
                "label": pd.arrays.IntegerArray(safe.astype(np.int64), unlabelled),
                "label_name": label_name,
                "pred": pred.astype(np.int64),
                "pred_name": names[pred],
                "class": np.where(unlabelled, names[pred], label_name),
                "confidence": top.astype(np.float64),
                "prob_true": np.where(unlabelled, np.nan, probs[rows, safe]),
                "correct": pd.arrays.BooleanArray(correct, unlabelled),
                "margin": (top - second).astype(np.float64),
                "entropy": -(probs * np.log(np.clip(probs, 1e-12, 1.0))).sum(axis=1),
                "error_confidence": np.where(~unlabelled & ~correct, top, np.nan),
                "domain": [s.domain for s in batch.samples],
                "group": [s.group for s in batch.samples],
            }
        )
        if probs.shape[1] <= MAX_STORED_PROBABILITIES:
            frame["probabilities"] = list(probs.astype(np.float32))
        return frame

    def reduce(self, data: ProbeData) -> Evidence:
        rows = data.rows
        evidence = Evidence(thumbnails=most_confident_mistakes(rows, MISTAKES_SHOWN))
        classes = self.context.classes
        k = len(classes)
        evidence.add("predictions.n", len(rows))
        labelled = rows[rows["correct"].notna()]
        evidence.add("predictions.n_labelled", len(labelled))
        details: dict[str, Any] = {
            "classes": list(classes),
            "n": len(rows),
            "n_labelled": len(labelled),
            "output_kind": self.context.interpretation.kind,
            "scopes": {},
        }
        self._prediction_shares(rows, evidence)

        domains = sorted(d for d in rows["domain"].dropna().unique())
        counts = labelled["domain"].value_counts().to_dict()
        reference = choose_reference_domain(domains, counts, self.context.reference_domain)
        details["domains"] = domains
        details["reference_domain"] = reference

        replicate_accuracy: dict[str, np.ndarray] = {}
        for index, domain in enumerate([None, *domains]):
            scope_text = scope(domain=domain)
            subset = labelled if domain is None else labelled[labelled["domain"] == domain]
            result = self._labelled_metrics(subset, domain, k, self.context.seed + 7919 * index, evidence)
            details["scopes"][scope_text] = result["details"]
            replicate_accuracy[scope_text] = result["replicate_accuracy"]
            everyone = rows if domain is None else rows[rows["domain"] == domain]
            if len(everyone):
                evidence.add("predictions.mean_confidence", float(everyone["confidence"].mean()), scope_text, len(everyone))
        for domain in domains:
            if reference is None or domain == reference:
                continue
            ref_key, key = scope(domain=reference), scope(domain=domain)
            ref_acc = evidence.metrics.get(f"predictions.accuracy@{ref_key}")
            acc = evidence.metrics.get(f"predictions.accuracy@{key}")
            if ref_acc is None or acc is None:
                continue
            ref_rep, rep = replicate_accuracy.get(ref_key), replicate_accuracy.get(key)
            interval = None
            if ref_rep is not None and rep is not None and len(ref_rep) and len(rep):
                interval = percentile_interval(ref_rep - rep, self.params.confidence_level)
            n = int(min(evidence.metrics[f"predictions.accuracy@{ref_key}:n"], evidence.metrics[f"predictions.accuracy@{key}:n"]))
            evidence.add("predictions.accuracy_gap", ref_acc - acc, key, n, interval)
        if len(labelled) == 0:
            evidence.notes.append("no sample has a label: predictions are reported, accuracy and calibration are not")
        evidence.details = details
        return evidence

    def _prediction_shares(self, rows: pd.DataFrame, evidence: Evidence) -> None:
        classes = self.context.classes
        for domain in [None, *sorted(rows["domain"].dropna().unique())]:
            subset = rows if domain is None else rows[rows["domain"] == domain]
            counts = np.bincount(subset["pred"].to_numpy(np.int64), minlength=len(classes))
            for c, name in enumerate(classes):
                evidence.add("predictions.predicted_share", counts[c] / max(len(subset), 1), scope(domain=domain, class_=name), len(subset))

    def _labelled_metrics(self, subset: pd.DataFrame, domain: str | None, k: int, seed: int, evidence: Evidence) -> dict[str, Any]:
        params = self.params
        n = len(subset)
        scope_text = scope(domain=domain)
        details: dict[str, Any] = {"n_labelled": n}
        if n == 0:
            return {"details": details, "replicate_accuracy": np.empty(0)}
        labels = subset["label"].to_numpy(np.int64)
        preds = subset["pred"].to_numpy(np.int64)
        correct = subset["correct"].to_numpy(bool)
        confidence = subset["confidence"].to_numpy(np.float64)

        boot = Bootstrap(n, params.bootstrap if n > 1 else 0, seed)
        c_correct = boot.add(correct)
        c_ones = boot.add(np.ones(n))
        c_label = [boot.add(labels == c) for c in range(k)]
        c_label_ok = [boot.add((labels == c) & correct) for c in range(k)]
        c_pred = [boot.add(preds == c) for c in range(k)]
        bins = calibration_bins(confidence, params.ece_bins)
        gap = confidence - correct
        c_gap = [boot.add(np.where(bins == b, gap, 0.0)) for b in range(params.ece_bins)]
        reps = boot.replicate_sums()  # point estimates come from the tested pure functions, intervals from here
        matrix = confusion_matrix(labels, preds, k)
        level = params.confidence_level

        def ratio(sums: np.ndarray, num: int | list[int], den: int | list[int]) -> np.ndarray:
            with np.errstate(invalid="ignore", divide="ignore"):
                return sums[..., num] / np.where(sums[..., den] > 0, sums[..., den], np.nan)

        accuracy = float(correct.mean())
        rep_accuracy = ratio(reps, c_correct, c_ones)
        evidence.add("predictions.accuracy", accuracy, scope_text, n, percentile_interval(rep_accuracy, level) if len(reps) else None)

        ece = expected_calibration_error(confidence, correct, params.ece_bins)
        rep_ece = np.abs(reps[:, c_gap]).sum(axis=1) / reps[:, c_ones] if len(reps) else np.empty(0)
        evidence.add("predictions.ece", ece, scope_text, n, percentile_interval(rep_ece, level) if len(reps) else None)

        precision, recall, f1 = precision_recall_f1(matrix)
        # TP for class c = correct & label c (= correct & pred c), so both ratios share one numerator column.
        rep_recall = ratio(reps, c_label_ok, c_label) if len(reps) else None
        rep_precision = ratio(reps, c_label_ok, c_pred) if len(reps) else None
        with np.errstate(invalid="ignore", divide="ignore"):
            rep_f1 = 2 * rep_precision * rep_recall / (rep_precision + rep_recall) if rep_recall is not None else None
        supports, predicted_counts = matrix.sum(axis=1), matrix.sum(axis=0)
        for c, name in enumerate(self.context.classes):
            s = scope(domain=domain, class_=name)
            support = int(supports[c])
            predicted = int(predicted_counts[c])
            evidence.add("predictions.support", support, s, support)
            if support:
                evidence.add("predictions.recall", recall[c], s, support, percentile_interval(rep_recall[:, c], level) if rep_recall is not None else None)
            if predicted:
                evidence.add("predictions.precision", precision[c], s, predicted, percentile_interval(rep_precision[:, c], level) if rep_precision is not None else None)
            if support and predicted:
                evidence.add("predictions.f1", f1[c], s, support, percentile_interval(rep_f1[:, c], level) if rep_f1 is not None else None)

        details["confusion"] = matrix.tolist()
        details["reliability"] = [vars(b) for b in reliability_table(confidence, correct, params.ece_bins)]
        edges = np.linspace(0, 1, params.histogram_bins + 1)
        details["confidence_histogram"] = {
            "edges": edges.tolist(),
            "correct": np.histogram(confidence[correct], edges)[0].tolist(),
            "wrong": np.histogram(confidence[~correct], edges)[0].tolist(),
        }
        self._confused_pairs(matrix, scope_text, evidence)
        return {"details": details, "replicate_accuracy": rep_accuracy}

    def _confused_pairs(self, matrix: np.ndarray, scope_text: str, evidence: Evidence) -> None:
        """The ten most frequent confusions A->B as `predictions.confusion_rate@pair:A->B` (global only)."""
        if scope_text != "global":
            return
        off = matrix.astype(float).copy()
        np.fill_diagonal(off, 0)
        support = matrix.sum(axis=1)
        order = np.argsort(-off, axis=None)[:10]
        classes = self.context.classes
        for flat in order:
            a, b = divmod(int(flat), matrix.shape[1])
            if off[a, b] <= 0:
                break
            evidence.add("predictions.confusion_rate", off[a, b] / support[a], pair(classes[a], classes[b]), int(support[a]))
