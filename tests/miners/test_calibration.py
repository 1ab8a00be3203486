"""Calibrator fit, save/load, fingerprint guard and the default prior."""

import numpy as np
import pytest

from miners.calibration import Calibrator, default_calibrator, fit_calibrator
from miners.matching import UnitMatches
from miners.metrics import expected_calibration_error


def _matches(n, rng):
    agree = rng.random(n) < 0.6
    no_words = rng.random(n) < 0.2
    return UnitMatches(
        region_index=np.zeros(n, dtype=np.int64),
        clip_cosine=rng.normal(0.2, 0.1, n).astype(np.float32),
        softmax_prob=rng.random(n).astype(np.float32),
        margin=rng.random(n).astype(np.float32) * 0.3,
        mutual_best=rng.random(n) < 0.5,
        part_agreement=np.where(no_words, 0.5, np.where(agree, 1.0, 0.0)).astype(np.float32),
        has_part_words=~no_words,
        region_quality=np.full(n, 0.8, dtype=np.float32),
        region_label=[["head", "upper", "bag", None][k % 4] for k in range(n)],
    )


def _labels(m, rng):
    # Truth drawn from a known logistic model of the features.
    z = -1.0 + 3.0 * (m.part_agreement == 1.0) - 2.0 * (~m.has_part_words) + 4.0 * m.margin
    return rng.random(len(z)) < 1 / (1 + np.exp(-z))


def test_fitted_calibrator_is_calibrated_on_held_out_data(tmp_path):
    rng = np.random.default_rng(0)
    train, test = _matches(4000, rng), _matches(4000, rng)
    cal = fit_calibrator(train, _labels(train, rng))
    y_test = _labels(test, rng)
    p = cal.predict(test)
    ece, _ = expected_calibration_error(p, y_test)
    assert ece < 0.03
    # Far better than the uncalibrated default on the same data.
    ece_default, _ = expected_calibration_error(default_calibrator().predict(test), y_test)
    assert ece < ece_default

    cal.model_fingerprint = "abc"
    path = cal.save(tmp_path)
    again = Calibrator.load(path, expect_fingerprint="abc")
    np.testing.assert_allclose(again.predict(test), p, rtol=1e-6)
    with pytest.raises(ValueError, match="refit"):
        Calibrator.load(path, expect_fingerprint="other")


def test_fit_needs_both_classes_and_default_is_flagged():
    rng = np.random.default_rng(1)
    m = _matches(50, rng)
    with pytest.raises(ValueError, match="both correct and incorrect"):
        fit_calibrator(m, np.ones(50, dtype=bool))
    d = default_calibrator("clip")
    assert d.calibrated is False and d.features == ("clip_cosine", "softmax_prob", "margin", "mutual_best")
    p = d.predict(m)
    assert ((p >= 0) & (p <= 1)).all()
