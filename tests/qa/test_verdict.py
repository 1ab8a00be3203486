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
    v = verdict({"ground_truth": False, "noise_rate_estimated": 0.1}, cal)
    assert v["trust"] == "noise_rate_estimated" and "480 captions of calib/manifest.parquet" in v["why"]


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
