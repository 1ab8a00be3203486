"""Judging mined pairs against ground truth, on hand-made regions and links."""

import numpy as np

from storage.rle import encode_mask
from storage.truth import GroundTruth, judge_units, pair_quality, phrase_in_unit


def _gt():
    head = np.zeros((40, 20), bool)
    head[2:10, 6:14] = True
    upper = np.zeros((40, 20), bool)
    upper[10:24, 3:17] = True
    return GroundTruth(
        [
            {"id": 0, "label": "head", "bbox": [6, 2, 14, 10], "mask": encode_mask(head)},
            {"id": 1, "label": "upper", "bbox": [3, 10, 17, 24], "mask": encode_mask(upper)},
        ]
    )


def test_zone_around_head_depicts_head_even_with_low_iou():
    gt = _gt()
    # A generous zone: IoU with the head box is 64/200 = 0.32, but it holds the whole head and only head.
    assert gt.match_region(np.array([0, 0, 20, 10]), None) == 0
    # A box over head and body: the body dominates the annotated pixels inside it.
    assert gt.match_region(np.array([0, 0, 20, 24]), None) == 1
    # A box covering a sliver of the body (less than half of it) depicts nothing.
    assert gt.match_region(np.array([3, 20, 17, 24]), None) is None
    # Background only.
    assert gt.match_region(np.array([0, 30, 20, 40]), None) is None


def test_mask_regions_use_their_mask():
    gt = _gt()
    mask = np.zeros((40, 20), bool)
    mask[11:23, 4:16] = True
    assert gt.match_region(np.array([0, 0, 20, 40]), mask) == 1


def test_box_only_ground_truth_falls_back_to_iou():
    gt = GroundTruth([{"id": 5, "label": "bag", "bbox": [0, 0, 10, 10]}])
    assert gt.match_region(np.array([0, 0, 10, 12]), None) == 5
    assert gt.match_region(np.array([0, 0, 30, 30]), None) is None


def test_judge_units_groundable_and_correct():
    links = [
        {"span": [0, 20], "region_ids": [0], "phrases": [{"span": [8, 19], "region_id": 0}]},
        {
            "span": [21, 60],
            "region_ids": [1, 2],
            "phrases": [{"span": [30, 40], "region_id": 1}, {"span": [45, 59], "region_id": 2}],
        },
        {"span": [61, 80], "region_ids": [], "phrases": []},
    ]
    units = [(0, 19), (21, 40), (41, 59), (61, 79)]
    groundable, correct = judge_units(units, [0, 2, 2, 1], links)
    assert groundable.tolist() == [True, True, True, False]
    assert correct.tolist() == [True, False, True, False]
    assert phrase_in_unit([30, 40], (35, 60)) and not phrase_in_unit([30, 40], (36, 60))
    q = pair_quality(np.array([True, True, False, True]), groundable, correct)
    assert q["precision_kept"] == 1 / 3 and q["coverage"] == 1 / 3 and q["pairs_kept"] == 3
