"""qa.inject: the estimator check swaps a known fraction of units for other people's and re-scores them;
the re-scoring config is the run's own (read through miners.run_config)."""

from __future__ import annotations

import pytest

from miners.rsm import RSMConfig
from miners.run_config import RunConfig, read_run_config
from qa.inject import injection_rsm_config
from qa.report import build_report


def test_rescoring_uses_the_runs_settings(tiny_run, tmp_path):
    run = read_run_config(tiny_run)
    assert injection_rsm_config(run, None) == run.rsm
    other = injection_rsm_config(
        RunConfig(rsm=RSMConfig(clip_model="a", calibrator="a/cal.json", crop_mode="mask")), "b"
    )
    assert (other.clip_model, other.calibrator, other.crop_mode) == (
        "b",
        None,
        "mask",
    )  # calibrator is bound to "a"
    with pytest.raises(ValueError, match="--clip-model"):
        injection_rsm_config(None, None)


def test_injected_noise_is_reported_at_the_requested_rate(tiny_run, tiny_clip_dir, tmp_path):
    fraction = 0.25
    qa = build_report(
        tiny_run,
        tmp_path / "qa",
        sheet_samples=0,
        inject_noise=fraction,
        clip_model=str(tiny_clip_dir),
        inject_max_samples=12,
        seed=7,
    )
    inj = qa["injection"]
    assert inj["captions"] == 12 and inj["lost"] <= 1
    assert abs(inj["injected"] - fraction * inj["units"]) <= 1
    assert inj["injected_rate"] == pytest.approx(fraction, abs=1 / inj["units"])
    assert 0.0 <= inj["auroc_clean_vs_injected"] <= 1.0
    assert 0.0 <= inj["injected_kept_fraction"] <= 1.0
    assert inj["recovered_rate"] == pytest.approx(inj["estimated_noise_mixed"] - inj["estimated_noise_clean"])
    assert "true_noise_rise" in inj
    assert "injected rate" in (tmp_path / "qa" / "report.md").read_text()
