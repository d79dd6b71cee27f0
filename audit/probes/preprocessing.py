"""Preprocessing: does the model score better under a common input convention than under the one given?

Wrong normalisation is the commonest way an audit of a real model measures the wrong thing, and it
fails silently: a model fed [0, 1] pixels it was trained to see in [-1, 1] still answers, only worse.
On a small stratified sample the model runs under the preprocessing the audit uses and under the
common conventions ([0, 1], [-1, 1], ImageNet mean/std, 0-255, channels reversed), every variant
computed from the same decoded pixels, so the comparison is paired sample by sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from pydantic import Field

from audit.data import channel_values
from audit.execution.costs import Passes
from audit.metrics.classification import Bootstrap, percentile_interval
from audit.metrics.declarations import ColumnSpec, MetricSpec, TableSpec
from audit.metrics.names import scope
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
    SAMPLE_COLUMNS,
    probabilities_function,
    sample_rows,
)
from audit.probes.registry import register
from audit.probes.sampling import detail_sample

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SAME_TOLERANCE = 1e-4  # relative: a stated 0.229 is ImageNet's std, whatever digits follow


@dataclass(frozen=True)
class Convention:
    """One way of normalising pixels in [0, 1]. `name` (the metric scope) carries the flags that
    select it, so a finding can quote them."""

    title: str
    flags: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    reverse_channels: bool = False
    is_given: bool = False

    @property
    def name(self) -> str:
        return f"{self.title} ({self.flags})"

    def normalise(self, raw: np.ndarray) -> np.ndarray:
        """NCHW pixels in [0, 1] -> what the model gets under this convention."""
        pixels = raw[:, ::-1] if self.reverse_channels else raw
        mean = np.asarray(self.mean, np.float32).reshape(1, -1, 1, 1)
        std = np.asarray(self.std, np.float32).reshape(1, -1, 1, 1)
        return np.ascontiguousarray((pixels - mean) / std, dtype=np.float32)


def flags_text(mean: Sequence[float], std: Sequence[float]) -> str:
    """The CLI flags that select a normalisation: '--mean 0.5 --std 0.5' (one value when all channels share it)."""
    return f"--mean {channel_values(mean)} --std {channel_values(std)}"


def _same(a: Sequence[float], b: Sequence[float]) -> bool:
    return len(a) == len(b) and bool(np.allclose(a, b, rtol=SAME_TOLERANCE, atol=1e-9))


def conventions(mean: Sequence[float], std: Sequence[float], channels: int) -> list[Convention]:
    """The given normalisation and the common ones, each once; the one equal to the given is marked.

    ImageNet's statistics and the RGB/BGR swap exist only for three channels; the swap keeps the
    given normalisation (a model trained on BGR images with these statistics)."""
    mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    common = [("[0, 1]", (0.0,) * channels, (1.0,) * channels), ("[-1, 1]", (0.5,) * channels, (0.5,) * channels)]
    if channels == 3:
        common.append(("ImageNet", IMAGENET_MEAN, IMAGENET_STD))
    common.append(("0-255", (0.0,) * channels, (1 / 255,) * channels))
    out = [Convention(title, flags_text(m, s), m, s, is_given=_same(m, mean) and _same(s, std)) for title, m, s in common]
    if not any(c.is_given for c in out):
        out.insert(0, Convention("as given", flags_text(mean, std), mean, std, is_given=True))
    if channels == 3:
        out.append(Convention("BGR", f"channels reversed, then {flags_text(mean, std)}", mean, std, reverse_channels=True))
    return out


def paired_accuracy(correct: np.ndarray, given: int, replicates: int, seed: int, level: float) -> dict[str, np.ndarray]:
    """Accuracy of each column of `correct` (samples x conventions, bool) and its gain over column
    `given`, with percentile intervals from one set of bootstrap resamples shared by every column:
    a sample drawn twice counts twice under every convention, so the gain's interval is paired.
    `best` is the most accurate column, or the given one when the top is not clearly above it;
    `tied` marks the columns the top is not clearly above (its paired lower bound at most 0)."""
    n, k = correct.shape
    accuracy = correct.mean(axis=0) if n else np.full(k, np.nan)
    gain = accuracy - accuracy[given]
    boot = Bootstrap(n, replicates if n > 1 else 0, seed)
    for c in range(k):
        boot.add(correct[:, c])
    sums = boot.replicate_sums()
    nan = np.full((k, 2), np.nan)
    acc_interval, gain_interval = nan.copy(), nan.copy()
    top = int(np.argmax(accuracy)) if n else given
    tied = accuracy == accuracy[top]
    if len(sums):
        share = sums / n
        for c in range(k):
            acc_interval[c] = percentile_interval(share[:, c], level)
            gain_interval[c] = percentile_interval(share[:, c] - share[:, given], level)
            tied[c] = percentile_interval(share[:, top] - share[:, c], level)[0] <= 0
    best = given if tied[given] else top  # the data cannot tell the given one from the top: it stays the best
    return {"accuracy": accuracy, "accuracy_interval": acc_interval, "gain": gain, "gain_interval": gain_interval,
            "best": best, "tied": tied}


class PreprocessingParams(ProbeParams):
    samples: int = Field(default=256, ge=1, description="samples run under every convention (stratified by class, else by domain)")
    bootstrap: int = Field(default=1000, ge=0, description="bootstrap replicates for the accuracy intervals")
    confidence_level: float = Field(default=0.95, gt=0, lt=1, description="level of the bootstrap intervals")


@register
class PreprocessingCheck(Probe):
    name = "preprocessing"
    title = "Preprocessing check"
    question = (
        "Was the model audited with the preprocessing it was trained with? It runs on a small sample under the "
        "normalisation given and under the common conventions; one that scores clearly better means the audit's "
        "other numbers were measured on inputs the model does not expect."
    )
    Params = PreprocessingParams
    profile_defaults = {"thorough": {"samples": 1024, "bootstrap": 2000}}
    references = ["Efron, Tibshirani. An Introduction to the Bootstrap. 1993."]
    metrics = (
        MetricSpec("preprocessing.n", ("global",), "count", "samples run under every convention"),
        MetricSpec("preprocessing.n_labelled", ("global",), "count", "of them, samples with a label"),
        MetricSpec("preprocessing.given_accuracy", ("global",), "percent", "accuracy under the preprocessing the audit used", interval=True),
        MetricSpec("preprocessing.accuracy", ("convention",), "percent", "accuracy under the convention", interval=True),
        MetricSpec("preprocessing.accuracy_gain", ("convention",), "points",
                   "the convention's accuracy minus the given preprocessing's, on the same samples (paired bootstrap interval)", interval=True),
        MetricSpec("preprocessing.mean_confidence", ("convention",), "percent", "mean probability of the predicted class"),
        MetricSpec("preprocessing.mean_entropy", ("convention",), "number", "mean entropy of the predicted distribution (nats)"),
    )
    provides = (
        TableSpec("preprocessing", "detail", "one row per sample and convention", (
            *SAMPLE_COLUMNS,
            ColumnSpec("convention", "text", "the convention (its title and the flags that select it)"),
            ColumnSpec("pred", "number", "predicted class index"),
            ColumnSpec("confidence", "percent", "probability of the predicted class"),
            ColumnSpec("entropy", "number", "entropy of the predicted distribution (nats)"),
            ColumnSpec("correct", "number", "1 when the prediction is right (empty when unlabelled)"),
        ), keys=("id", "convention")),
    )

    @property
    def conventions(self) -> list[Convention]:
        prep = self.context.prep
        return conventions(prep.mean, prep.std, prep.channels)

    def map(self, batch, taps: Taps) -> pd.DataFrame:  # type: ignore[no-untyped-def]
        return sample_rows(batch, taps, self.context.classes).assign(label=batch.labels)

    def select(self, rows: pd.DataFrame, inputs: ProbeInputs) -> DetailPlan:
        """Labelled samples stratified by class; with no label at all, every sample stratified by domain."""
        labelled = rows[rows["label"] >= 0]
        pool = labelled if len(labelled) else rows.assign(**{"class": rows["domain"].fillna("").astype(str)})
        n = self.params.samples
        chosen = detail_sample(pool, n, self.limited(n), self.context.seed)
        return DetailPlan.of(chosen["id"].tolist(), self.context.batch_size)

    def passes(self, plan: DetailPlan) -> Passes:
        """One forward pass per sample and convention."""
        return Passes(forward=float(len(self.conventions) * sum(len(b.ids) for b in plan.batches)))

    def detail(self, batch: DetailBatch) -> DetailOutput:
        assert batch.raw is not None, "the batch was planned without inputs"
        forward = probabilities_function(self.context)
        labels = batch.rows["label"].to_numpy(np.int64)
        base = batch.rows[["id", "class", "domain"]]
        frames = []
        for convention in self.conventions:
            probs = forward(torch.from_numpy(convention.normalise(batch.raw))).numpy().astype(np.float64)
            pred = probs.argmax(axis=1)
            frames.append(base.assign(
                convention=convention.name, pred=pred.astype(np.int64), confidence=probs.max(axis=1),
                entropy=-(probs * np.log(np.clip(probs, 1e-12, 1.0))).sum(axis=1),
                correct=_correct(pred, labels)))
        return DetailOutput(tables={"preprocessing": pd.concat(frames, ignore_index=True)})

    def reduce(self, data: ProbeData) -> Evidence:
        table = data.tables["preprocessing"]
        listed = self.conventions
        names = [c.name for c in listed]
        given = next(i for i, c in enumerate(listed) if c.is_given)
        evidence = Evidence()
        by_sample = {name: frame.sort_values("id", kind="stable") for name, frame in table.groupby("convention", sort=False)}
        first = by_sample.get(names[given], table.iloc[:0])
        labelled_mask = first["correct"].notna().to_numpy()
        n, n_labelled = len(first), int(labelled_mask.sum())
        evidence.add("preprocessing.n", n)
        evidence.add("preprocessing.n_labelled", n_labelled)
        rows: list[dict[str, Any]] = []
        for name, convention in zip(names, listed, strict=True):
            frame = by_sample.get(name, table.iloc[:0])
            confidence = float(frame["confidence"].mean()) if len(frame) else None
            entropy = float(frame["entropy"].mean()) if len(frame) else None
            evidence.add("preprocessing.mean_confidence", confidence, scope(convention=name), len(frame))
            evidence.add("preprocessing.mean_entropy", entropy, scope(convention=name), len(frame))
            rows.append({"name": name, "title": convention.title, "flags": convention.flags, "mean": list(convention.mean),
                         "std": list(convention.std), "reverse_channels": convention.reverse_channels, "is_given": convention.is_given,
                         "confidence": confidence, "entropy": entropy, "accuracy": None, "lo": None, "hi": None,
                         "gain": None, "gain_lo": None, "gain_hi": None})
        best, tied = None, []
        if n_labelled:
            correct = np.stack([by_sample[name]["correct"].to_numpy()[labelled_mask].astype(bool) for name in names], axis=1)
            result = paired_accuracy(correct, given, self.params.bootstrap, self.context.seed, self.params.confidence_level)
            for c, name in enumerate(names):
                s = scope(convention=name)
                acc_interval, gain_interval = tuple(result["accuracy_interval"][c]), tuple(result["gain_interval"][c])
                evidence.add("preprocessing.accuracy", float(result["accuracy"][c]), s, n_labelled, acc_interval)
                rows[c].update(accuracy=float(result["accuracy"][c]), lo=_finite(acc_interval[0]), hi=_finite(acc_interval[1]))
                if c == given:
                    evidence.add("preprocessing.given_accuracy", float(result["accuracy"][c]), n=n_labelled, interval=acc_interval)
                    continue
                evidence.add("preprocessing.accuracy_gain", float(result["gain"][c]), s, n_labelled, gain_interval)
                rows[c].update(gain=float(result["gain"][c]), gain_lo=_finite(gain_interval[0]), gain_hi=_finite(gain_interval[1]))
            best = names[result["best"]]
            tied = [name for c, name in enumerate(names) if result["tied"][c] and name != best]
        else:
            evidence.notes.append("No sampled input has a label, so the conventions are compared by mean confidence and entropy "
                                  "only, and the preprocessing-mismatch rule does not judge them: a model can be confident on "
                                  "inputs it was never trained on.")
        prep = self.context.prep
        evidence.details = {
            "given": {"name": names[given], "title": listed[given].title, "flags": listed[given].flags,
                      "mean": list(prep.mean), "std": list(prep.std)},
            "stated": prep.stated,
            "conventions": rows,
            "best": best,
            "tied": tied,  # as good as the best within sampling noise: the sample cannot tell them apart
            "samples": n,
            "labelled": n_labelled > 0,
            "n_labelled": n_labelled,
            "confidence_level": self.params.confidence_level,
        }
        return evidence


def _correct(pred: np.ndarray, labels: np.ndarray) -> pd.arrays.BooleanArray:
    """Whether each prediction is right; missing where the sample has no label."""
    return pd.arrays.BooleanArray(pred == labels, labels < 0)


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None
