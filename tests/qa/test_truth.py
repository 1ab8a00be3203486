"""qa.truth: ground-truth figures equal hand values; judging streams shards against the manifest."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qa.truth import add_true_breakdowns, judge_run, load_ground_truth, truth_figures
from storage.schemas import with_version
from tests.factories import pair_row


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
    rows = []
    for sid, unit, box, rel in [
        ("a#0", 0, [0, 0, 10, 10], 0.9),  # correct
        ("a#0", 1, [0, 0, 10, 10], 0.8),  # shirt on the head region: wrong
        ("b#0", 0, [0, 0, 10, 10], 0.7),  # no ground truth: not judged
    ]:
        sample = {"sample_id": sid, "image_id": sid[0], "person_id": 1, "split": "train", "caption_index": 0}
        rows.append(
            pair_row(
                sample,
                sentence_index=unit,
                sentence="x",
                char_start=0 if unit == 0 else 9,
                char_end=8 if unit == 0 else 20,
                bbox_xyxy=box,
                clip_cosine=0.1,
                reliability=rel,
            )
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
