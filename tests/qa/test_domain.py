"""qa.domain: the checks that say whether a calibrator applies to a run, on data the test draws itself.

A calibrator is fitted on the synthetic benchmark as the demo draws it (ground-truth labels); a fresh
sample of that benchmark (another seed) and the same generator's people drawn in another style
(tests/qa/domain_data.py) are mined with it. The per-feature mean check (qa.verdict.data_shift) passes on
both although the calibrator is wrong on the new style; the joint two-sample test must fail there and pass
on the fresh sample.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from miners.calibration import Calibrator, fit_calibrator, sigmoid
from miners.metrics import expected_calibration_error
from miners.rsm import matches_from_pairs
from qa.domain import (
    clip_vocabulary,
    domain_checks,
    part_drop,
    two_sample_test,
    vocabulary_coverage,
    weighted_auc,
)
from qa.verdict import calibrator_provenance, data_shift, verdict
from storage.truth import judge_pairs
from tests.qa.domain_data import make_clip, make_dataset, mine


@pytest.fixture(scope="module")
def domains(tmp_path_factory):
    from miners.calibration import default_calibrator

    base = tmp_path_factory.mktemp("domains")
    fit_manifest = make_dataset(base / "fit", seed=1, identities=40)
    clip = make_clip(fit_manifest, base / "clip")
    pairs, table = mine(fit_manifest, clip, default_calibrator())
    _, _, correct = judge_pairs(pairs, table)
    cal = fit_calibrator(matches_from_pairs(pairs), correct)
    path = cal.save(clip / "rsm-calibrator.json")
    out = {"cal": cal, "path": path, "clip": clip}
    for name, seed, other in (("fresh", 2, False), ("other_style", 3, True)):
        manifest = make_dataset(base / name, seed=seed, identities=40, other_style=other)
        pairs, table = mine(manifest, clip, cal)
        _, _, correct = judge_pairs(pairs, table)
        out[name] = (matches_from_pairs(pairs), correct, table["caption"].to_pylist())
    return out


def _checks(d, name):
    m, _, captions = d[name]
    rel = d["cal"].predict(m)
    vocab = vocabulary_coverage(captions, clip_vocabulary(d["clip"]))
    return domain_checks(d["cal"], m, rel >= 0.5, 0.5, vocab)


def test_a_new_style_passes_the_mean_check_wrongly_and_fails_the_joint_test(domains):
    m, correct, _ = domains["other_style"]
    rel = domains["cal"].predict(m)
    kept = rel >= 0.5
    # The calibrator is wrong here: its noise of kept pairs is far from the true one, and it is miscalibrated
    claimed, true = float(np.mean(1 - rel[kept])), float(np.mean(~correct[kept]))
    assert true - claimed > 0.05
    assert expected_calibration_error(rel, correct)[0] > 0.06
    assert data_shift(domains["path"], m)["applies"]  # today's check: "this run's data matches it"
    checks = _checks(domains, "other_style")
    assert not checks["applies"] and checks["checks"]["two_sample"]["status"] == "fail"
    assert checks["checks"]["two_sample"]["auc"] > 0.6 and "not drawn like" in checks["why"]


def test_a_fresh_sample_of_the_same_benchmark_passes(domains):
    m, correct, _ = domains["fresh"]
    rel = domains["cal"].predict(m)
    assert expected_calibration_error(rel, correct)[0] < 0.06  # the calibrator does apply here
    checks = _checks(domains, "fresh")
    assert checks["applies"], checks["why"]
    assert (
        checks["checks"]["two_sample"]["p_value"] > 0.01
        and checks["checks"]["vocabulary"]["status"] == "pass"
    )


def test_the_verdict_vouches_only_where_the_checks_pass(domains):
    provenance = calibrator_provenance(None, str(domains["path"]))
    qa = {
        "ground_truth": False,
        "noise_rate_estimated": 0.12,
        "run": {"pairs_dir": "/runs/r1", "run_id": "r1"},
    }
    ok = verdict(qa, {**provenance, "domain": _checks(domains, "fresh")})
    assert ok["trust"] == "noise_rate_estimated" and "checked here" in ok["why"]
    bad = verdict(qa, {**provenance, "domain": _checks(domains, "other_style")})
    assert bad["trust"] is None and bad["unverified"]
    assert "unverified here" in bad["why"] and "python -m qa.audit sample --pairs /runs/r1" in bad["why"]
    assert "classifier tells them apart" in bad["why"]
    # no domain evidence at all (an older calibrator without its fitting sample): unverified too
    assert verdict(qa, provenance)["trust"] is None


def test_a_calibrator_without_its_fitting_sample_cannot_vouch(domains):
    raw = domains["cal"].to_json()
    old = Calibrator.load(domains["path"])
    old.reference = None
    assert "reference" in raw and "reference" not in old.to_json()
    m = domains["fresh"][0]
    assert two_sample_test(old, m)["status"] == "unavailable"
    assert not domain_checks(old, m, np.ones(len(m.region_label), bool), 0.5, None)["applies"]


def test_vocabulary_coverage_names_the_unknown_words():
    vocab = {"a", "man", "in", "red", "shirt", "t"}
    out = vocabulary_coverage(["A man in a red T-shirt.", "a man in a cardigan and a beret"], vocab)
    # words: a man in a red t shirt | a man in a cardigan and a beret -> 15, unknown: cardigan, and, beret
    assert out["status"] == "fail" and out["unknown_distinct"] == 3 and out["distinct_words"] == 9
    assert out["unknown_share_occurrences"] == round(3 / 15, 4)
    assert set(out["unknown_words"]) == {"cardigan", "and", "beret"} and "beret" in out["why"]
    assert vocabulary_coverage(["a man in red"], vocab)["status"] == "pass"
    assert vocabulary_coverage(["anything"], None)["status"] == "unavailable"  # a BPE tokenizer


def test_a_part_almost_all_dropped_here_but_kept_on_the_fitting_data(domains):
    cal = domains["cal"]
    m = domains["fresh"][0]
    labels = list(m.region_label)
    kept = cal.predict(m) >= 0.5
    assert part_drop(cal, labels, kept, 0.5)["status"] == "pass"
    dropped = kept & (np.asarray(labels) != "head")
    out = part_drop(cal, labels, dropped, 0.5)
    ref_rate = out["kept_rate_by_part"]["head"]["kept_reference"]
    assert ref_rate >= 0.25 and out["status"] == "fail" and out["why"].count("head (") == 1


def test_weighted_auc_against_a_count_of_pairs():
    rng = np.random.default_rng(0)
    score, y = rng.normal(size=40), rng.random(40) < 0.5
    pos, neg = score[y], score[~y]
    by_count = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert weighted_auc(score, y.astype(int), np.ones(40)) == pytest.approx(by_count)


def test_the_logistic_takes_any_logit_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = sigmoid(np.array([-1000.0, -30.0, 0.0, 30.0, 1000.0]))
    assert p[0] == 0.0 and p[-1] == 1.0 and p[2] == 0.5
    assert p[1] == pytest.approx(1 / (1 + np.exp(30.0))) and p[3] == pytest.approx(1 / (1 + np.exp(-30.0)))
