"""qa.verdict: the report says which noise figure to trust, and the calibrator's provenance."""

from __future__ import annotations

import json

from qa.render import render_markdown
from qa.verdict import calibrator_provenance, verdict


def _calibrator(tmp_path, calibrated: bool):
    raw = {
        "version": 3,
        "calibrated": calibrated,
        "features": ["a", "b"],
        "model_fingerprint": "f" * 16,
        "fit_info": {"manifest": "calib/manifest.parquet", "split": None, "samples": 480},
    }
    (tmp_path / "rsm-calibrator.json").write_text(json.dumps(raw))
    return calibrator_provenance(str(tmp_path), None)


def test_ground_truth_is_trusted_and_a_far_label_free_estimate_is_called_out(tmp_path):
    cal = _calibrator(tmp_path, True)
    qa = {"ground_truth": True, "noise_rate_true": 0.07, "noise_rate_estimated": 0.19, "pairs_judged": 100}
    v = verdict(qa, cal)
    assert v["trust"] == "noise_rate_true" and "off by 0.120" in v["why"]
    assert "close to it" in verdict({**qa, "noise_rate_estimated": 0.08}, cal)["why"]


def test_without_ground_truth_a_calibrated_reliability_is_trusted_with_its_provenance(tmp_path):
    cal = _calibrator(tmp_path, True)
    assert cal["fitted_on"] == "calib/manifest.parquet" and cal["samples"] == 480 and cal["calibrated"]
    # trusted only with evidence that it applies here (qa.domain; tests/qa/test_domain.py on real data)
    cal["domain"] = {"applies": True, "why": "checked here: (the checks)"}
    v = verdict({"ground_truth": False, "noise_rate_estimated": 0.29327258886769414}, cal)
    assert v["trust"] == "noise_rate_estimated" and "480 captions of calib/manifest.parquet" in v["why"]
    # Rounded for people (before: "Read mean(1 − reliability) (0.29327258886769414)"); qa.json keeps it all
    assert "Read mean(1 − reliability) (0.293):" in v["why"] and "0.2932725" not in v["why"]
    cal["domain"] = {"applies": False, "why": "a classifier tells them apart"}
    v = verdict({"ground_truth": False, "noise_rate_estimated": 0.29327258886769414}, cal)
    assert v["trust"] is None and "(0.293) is unverified here" in v["why"]


def test_without_ground_truth_an_audit_is_trusted_before_any_label_free_figure(tmp_path):
    audit = {
        "noise_rate_kept": {"estimate": 0.081, "ci_low": 0.05, "ci_high": 0.129, "n_labels": 185},
        "calibrator": "audit/rsm-calibrator.json",
    }
    for cal in (_calibrator(tmp_path, True), None):
        v = verdict({"ground_truth": False, "noise_rate_estimated": 0.19, "audit": audit}, cal)
        assert v["trust"] == "audit.noise_rate_kept"
        assert "185 labelled pairs" in v["why"] and "0.050–0.129" in v["why"]
    # ground truth still comes first
    gt = {"ground_truth": True, "noise_rate_true": 0.07, "noise_rate_estimated": 0.19, "audit": audit}
    assert verdict(gt, None)["trust"] == "noise_rate_true"


def test_the_default_prior_and_the_mixture_are_not_noise_rates(tmp_path):
    for cal in (_calibrator(tmp_path, False), None):
        v = verdict({"ground_truth": False, "noise_rate_estimated": 0.1, "noise_rate_mixture": 0.9}, cal)
        assert v["trust"] is None and "no figure here is a noise rate" in v["why"]
    assert calibrator_provenance(str(tmp_path / "nowhere"), None) is None


def test_the_verdict_heads_the_report(tiny_run, tmp_path):
    from qa.report import build_report

    qa = build_report(tiny_run, tmp_path / "qa", sheet_samples=0)
    assert qa["verdict"]["trust"] == "noise_rate_true"  # the tiny dataset has ground truth
    md = render_markdown(qa)
    assert md.index("Verdict: which figure to trust") < md.index("## Noise")


def test_the_mixture_is_read_only_when_a_measurement_backs_it():
    from qa.render import render_markdown
    from qa.verdict import mixture_check

    far = {"noise_rate_mixture": 0.62, "noise_rate_true": 0.07}
    assert mixture_check(far)["status"] == "inconsistent" and "off by 0.550" in mixture_check(far)["why"]
    assert mixture_check({"noise_rate_mixture": 0.09, "noise_rate_true": 0.07})["status"] == "consistent"
    audit = {"noise_rate_kept": {"estimate": 0.08, "ci_low": 0.05, "ci_high": 0.13, "n_labels": 185}}
    assert mixture_check({"noise_rate_mixture": 0.62, "audit": audit})["status"] == "inconsistent"
    assert mixture_check({"noise_rate_mixture": 0.1, "audit": audit})["status"] == "consistent"
    alone = {"noise_rate_mixture": 0.62}
    assert mixture_check(alone)["status"] == "unverified"
    qa = {"noise_rate_mixture": 0.62, "mixture_check": mixture_check(alone), "checks": {}}
    assert "2-component mixture — unverified hint" in render_markdown(qa)
    qa["mixture_check"] = mixture_check(far)
    assert "UNRELIABLE here" in render_markdown(qa)


def test_the_calibrator_says_whether_this_runs_data_looks_like_its_fitting_data(tmp_path):
    import numpy as np

    from miners.calibration import fit_calibrator
    from miners.matching import UnitMatches
    from qa.verdict import data_shift

    def matches(n, rng, margin_shift=0.0):
        return UnitMatches(
            region_index=np.zeros(n, dtype=np.int64),
            clip_cosine=rng.normal(0.2, 0.1, n).astype(np.float32),
            softmax_prob=rng.random(n).astype(np.float32),
            margin=(rng.random(n) * 0.3 + margin_shift).astype(np.float32),
            mutual_best=rng.random(n) < 0.5,
            part_agreement=np.where(rng.random(n) < 0.6, 1.0, 0.0).astype(np.float32),
            has_part_words=np.ones(n, dtype=bool),
            region_quality=np.full(n, 0.8, dtype=np.float32),
            region_label=[["head", "upper"][k % 2] for k in range(n)],
        )

    rng = np.random.default_rng(0)
    fit_on = matches(3000, rng)
    y = rng.random(3000) < 0.3 + 0.5 * (fit_on.part_agreement == 1.0)
    path = fit_calibrator(fit_on, y).save(tmp_path / "rsm-calibrator.json")
    same = data_shift(path, matches(2000, rng))
    assert same["applies"] and same["shifted"] == {}
    moved = data_shift(path, matches(2000, rng, margin_shift=0.1))
    assert not moved["applies"] and list(moved["shifted"]) == ["margin"] and "margin by" in moved["why"]
    # The per-feature mean check stays in qa.json as a figure; the verdict reads qa.domain's checks
    # (a moved mean alone cannot vouch for a calibrator: tests/qa/test_domain.py)
