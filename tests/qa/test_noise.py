"""qa.noise: histograms and label-free figures equal hand values."""

from __future__ import annotations

import polars as pl
import pytest

from qa.noise import label_free_figures, score_histogram


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
