"""Metric functions against scikit-learn and hand-computed values; metric names round-trip."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from audit.metrics.classification import (
    Bootstrap,
    calibration_bins,
    confusion_matrix,
    expected_calibration_error,
    percentile_interval,
    precision_recall_f1,
    reliability_table,
)
from audit.metrics.names import (
    MetricKey,
    display_scope,
    pair,
    parse_key,
    parse_scope,
    scope,
    scope_kind,
)


@pytest.fixture
def predictions() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 500)
    preds = np.where(rng.random(500) < 0.7, labels, rng.integers(0, 4, 500))
    preds[preds == 3] = 0  # class 3 is never predicted: precision undefined
    return labels, preds


def test_confusion_and_per_class_scores_match_sklearn(predictions: tuple[np.ndarray, np.ndarray]) -> None:
    labels, preds = predictions
    matrix = confusion_matrix(labels, preds, 4)
    assert (matrix == skm.confusion_matrix(labels, preds, labels=range(4))).all()
    precision, recall, f1 = precision_recall_f1(matrix)
    sk_p, sk_r, sk_f, _ = skm.precision_recall_fscore_support(labels, preds, labels=range(4), zero_division=np.nan)
    assert np.allclose(precision, sk_p, equal_nan=True)
    assert np.allclose(recall, sk_r, equal_nan=True)
    assert np.isnan(precision[3]) and recall[3] == 0
    assert np.allclose(f1[:3], sk_f[:3])


def test_ece_by_hand() -> None:
    confidence = np.array([0.95, 0.95, 0.55, 0.55, 0.55, 0.55])
    correct = np.array([1, 0, 1, 1, 0, 0], bool)
    # bin (0.933, 1]: conf .95, acc .5 -> gap .45 x 2/6; bin (0.533, 0.6]: conf .55, acc .5 -> gap .05 x 4/6
    assert expected_calibration_error(confidence, correct) == pytest.approx(0.45 * 2 / 6 + 0.05 * 4 / 6)
    table = reliability_table(confidence, correct)
    filled = [b for b in table if b.count]
    assert [(b.count, b.accuracy) for b in filled] == [(4, 0.5), (2, 0.5)]
    assert calibration_bins(np.array([0.0, 1 / 15, 1.0])).tolist() == [0, 0, 14]


def test_ece_of_a_perfectly_calibrated_model_is_small() -> None:
    rng = np.random.default_rng(1)
    confidence = rng.uniform(0.3, 1.0, 20000)
    correct = rng.random(20000) < confidence
    assert expected_calibration_error(confidence, correct) < 0.02


def test_bootstrap_sums_and_interval() -> None:
    rng = np.random.default_rng(2)
    correct = rng.random(400) < 0.8
    boot = Bootstrap(400, replicates=500, seed=0)
    c = boot.add(correct)
    ones = boot.add(np.ones(400))
    assert boot.point()[c] == correct.sum() and boot.point()[ones] == 400
    sums = boot.replicate_sums()
    assert sums.shape == (500, 2)
    assert (sums[:, ones] == 400).all()  # every replicate resamples n samples
    lo, hi = percentile_interval(sums[:, c] / sums[:, ones])
    p = correct.mean()
    half = 1.96 * np.sqrt(p * (1 - p) / 400)
    assert lo == pytest.approx(p - half, abs=0.012) and hi == pytest.approx(p + half, abs=0.012)
    again = Bootstrap(400, replicates=500, seed=0)
    again.add(correct)
    again.add(np.ones(400))
    assert (again.replicate_sums() == sums).all()


@pytest.mark.parametrize("name", ["wolf", "n", "a/b", "x:y", "100%", "e@mail", "lo", "snow:n"])
def test_metric_keys_round_trip_for_awkward_class_names(name: str) -> None:
    for scope_text in (scope(class_=name), scope(domain="data", class_=name), scope(domain=name)):
        for suffix in (None, "lo", "hi", "n"):
            key = MetricKey("predictions.recall", scope_text, suffix)
            assert parse_key(str(key)) == key
        assert parse_scope(scope_text).get("class", parse_scope(scope_text).get("domain")) in (name, "data")
    assert parse_key("predictions.accuracy:n") == MetricKey("predictions.accuracy", "global", "n")


def test_scope_helpers() -> None:
    assert scope() == "global"
    assert scope(domain="data", class_="wolf") == "domain:data/class:wolf"
    assert scope_kind("domain:data/class:wolf") == "domain/class"
    assert display_scope("domain:data/class:a%2Fb") == "domain data, class a/b"
    assert pair("husky", "wolf") == "pair:husky->wolf"
    with pytest.raises(ValueError):
        parse_scope("colour:red")
