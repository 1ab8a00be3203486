"""qa.noise: the EM mixture recovers known proportions; label-free and true figures equal hand values."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qa.noise import (
    add_true_breakdowns,
    fit_mixture,
    fit_mixture_lazy,
    judge_run,
    label_free_figures,
    load_ground_truth,
    posterior_noisy,
    posterior_noisy_expr,
    score_histogram,
    truth_figures,
)
from storage.schemas import PAIRS_SCHEMA, with_version


def _synthetic(noisy_fraction: float, n: int, kind: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noisy = rng.random(n) < noisy_fraction
    if kind == "gaussian":
        return np.where(noisy, rng.normal(0.25, 0.08, n), rng.normal(0.7, 0.1, n))
    return np.where(noisy, rng.beta(2, 6, n), rng.beta(8, 2, n))


@pytest.mark.parametrize("kind", ["gaussian", "beta"])
@pytest.mark.parametrize("noisy_fraction", [0.15, 0.4])
def test_mixture_recovers_known_proportion(kind, noisy_fraction):
    scores = _synthetic(noisy_fraction, 8000, kind, seed=3)
    fit = fit_mixture(scores, kind=kind)
    assert fit.converged
    assert fit.noisy_weight == pytest.approx(noisy_fraction, abs=0.05)
    assert fit.means[0] < fit.means[1]
    # Mean posterior of the noisy component estimates the same fraction
    assert posterior_noisy(fit, scores).mean() == pytest.approx(noisy_fraction, abs=0.05)
    # Deterministic: the same data gives the same fit
    assert fit_mixture(scores, kind=kind) == fit


def test_binned_lazy_fit_matches_and_polars_posterior_equals_numpy():
    scores = _synthetic(0.3, 20000, "beta", seed=5)
    lf = pl.DataFrame({"reliability": scores}).lazy()
    for kind in ("gaussian", "beta"):
        fit = fit_mixture_lazy(lf, "reliability", kind)
        assert fit.noisy_weight == pytest.approx(0.3, abs=0.05)
        via_polars = lf.select(posterior_noisy_expr(fit, "reliability")).collect().to_series().to_numpy()
        np.testing.assert_allclose(via_polars, posterior_noisy(fit, scores), rtol=1e-9, atol=1e-12)


def test_beta_mixture_refuses_scores_outside_unit_interval():
    with pytest.raises(ValueError, match="beta mixture needs scores in"):
        fit_mixture(np.array([-0.5, 0.2, 0.9]), kind="beta")


def test_histogram_counts_every_value_once():
    lf = pl.DataFrame(
        {"x": [0.0, 0.05, 0.5, 0.99, 1.0, 2.0], "k": [True, False, True, True, False, True]}
    ).lazy()
    h = score_histogram(lf, "x", 10, 0.0, 1.0, by="k")
    assert h["true"].sum() == 4 and h["false"].sum() == 2
    assert h["true"][0] == 1 and h["false"][0] == 1 and h["true"][9] == 2  # 0.99 and 2.0 (clipped)


def test_label_free_figures_equal_hand_values():
    df = pl.DataFrame(
        {
            "reliability": [0.9, 0.6, 0.2, 0.7, 0.1],
            "kept": [True, True, False, True, False],
            "region_label": ["head", "upper", "upper", None, "head"],
            "part_tags": [["head"], [], ["upper", "lower"], ["lower"], []],
            "region_source": ["prior"] * 5,
            "split": ["train", "train", "test", "test", "test"],
            "_shard": pl.Series([0, 0, 1, 1, 1], dtype=pl.Int32),
        }
    )
    fig = label_free_figures(df.lazy(), fit=None, score="reliability")
    assert fig["pairs_total"] == 5 and fig["pairs_kept"] == 3
    assert fig["noise_rate_estimated"] == pytest.approx((0.1 + 0.4 + 0.3) / 3)
    assert fig["noise_rate_mixture"] is None
    by_label = {r["key"]: r for r in fig["breakdowns"]["region_label"]}
    assert by_label["head"]["pairs"] == 2 and by_label["head"]["noise_rate_estimated"] == pytest.approx(0.1)
    assert by_label["(none)"]["noise_rate_estimated"] == pytest.approx(0.3)
    by_tag = {r["key"]: r for r in fig["breakdowns"]["part_tags"]}
    assert by_tag["lower"]["pairs"] == 2 and by_tag["lower"]["kept"] == 1
    assert by_tag["(none)"]["pairs"] == 2 and by_tag["(none)"]["noise_rate_estimated"] == pytest.approx(0.4)
    by_shard = {r["key"]: r for r in fig["breakdowns"]["shard"]}
    assert by_shard["00001"]["kept"] == 1 and by_shard["00000"]["noise_rate_estimated"] == pytest.approx(0.25)


def test_truth_figures_equal_hand_values():
    rel = np.array([0.92, 0.71, 0.42, 0.22, 0.83, 0.64, 0.56, 0.12])
    correct = np.array([1, 0, 1, 0, 1, 1, 0, 0], dtype=bool)
    groundable = np.array([1, 1, 1, 0, 1, 1, 1, 0], dtype=bool)
    kept = rel >= 0.5
    fig = truth_figures(rel, kept, groundable, correct, n_bins=10)
    assert fig["precision_kept"] == pytest.approx(3 / 5)
    assert fig["noise_rate_true"] == pytest.approx(2 / 5)
    assert fig["coverage"] == pytest.approx(3 / 6)
    # One pair per bin: ECE = mean |p - y|
    assert fig["ece"] == pytest.approx(np.abs(rel - correct).mean())
    curve = {c["threshold"]: c for c in fig["curve"]}
    assert curve[0.0]["precision"] == pytest.approx(4 / 8) and curve[0.0]["coverage"] == pytest.approx(4 / 6)
    assert curve[0.5]["precision"] == pytest.approx(3 / 5) and curve[0.5]["kept"] == 5
    assert curve[1.0]["kept"] == 0 and curve[1.0]["precision"] is None


def test_judge_run_streams_shards_against_ground_truth(tmp_path):
    # One image with head/upper regions; caption units: 0 "Red hat." (head), 1 "Blue shirt." (upper)
    regions = [
        {"id": 0, "label": "head", "bbox": [0, 0, 10, 10]},
        {"id": 1, "label": "upper", "bbox": [0, 10, 10, 30]},
    ]
    links = [
        {"span": [0, 8], "region_ids": [0], "phrases": [{"span": [0, 7], "region_id": 0}]},
        {"span": [9, 20], "region_ids": [1], "phrases": [{"span": [9, 19], "region_id": 1}]},
    ]
    manifest = tmp_path / "manifest.parquet"
    pq.write_table(
        pl.DataFrame(
            {
                "sample_id": ["a#0", "b#0"],
                "gt_regions": [json.dumps(regions), None],
                "gt_links": [json.dumps(links), None],
            }
        ).to_arrow(),
        manifest,
    )
    base = {c: None for c in PAIRS_SCHEMA.names}
    rows = []
    for sid, unit, box, rel in [
        ("a#0", 0, [0, 0, 10, 10], 0.9),  # correct
        ("a#0", 1, [0, 0, 10, 10], 0.8),  # shirt on the head region: wrong
        ("b#0", 0, [0, 0, 10, 10], 0.7),  # no ground truth: not judged
    ]:
        rows.append(
            {
                **base,
                "sample_id": sid,
                "image_id": sid[0],
                "person_id": 1,
                "split": "train",
                "caption_index": 0,
                "sentence_index": unit,
                "sentence": "x",
                "char_start": 0 if unit == 0 else 9,
                "char_end": 8 if unit == 0 else 20,
                "part_tags": [],
                "region_id": 0,
                "region_source": "prior",
                "region_label": "head",
                "bbox_xyxy": box,
                "region_quality": 1.0,
                "clip_cosine": 0.1,
                "softmax_prob": 0.5,
                "margin": 0.0,
                "mutual_best": True,
                "part_agreement": 0.5,
                "reliability": rel,
                "kept": True,
                "clip_fingerprint": "c",
                "config_fingerprint": "f",
            }
        )
    path = tmp_path / "pairs-00000.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=with_version("pairs")), path)
    gt = load_ground_truth(manifest)
    assert gt.height == 1
    judged = judge_run([(0, path)], gt, score="clip_cosine")
    np.testing.assert_array_equal(judged.correct, [True, False])
    np.testing.assert_array_equal(judged.groundable, [True, True])
    np.testing.assert_allclose(judged.reliability, [0.9, 0.8], rtol=1e-6)
    assert judged.groups["region_label"]["head"] == [2, 1]
    breakdowns = {"region_label": [{"key": "head"}, {"key": "upper"}]}
    add_true_breakdowns(breakdowns, judged)
    assert breakdowns["region_label"][0]["noise_rate_true"] == pytest.approx(0.5)
    assert breakdowns["region_label"][1]["noise_rate_true"] is None
