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


def test_box_only_ground_truth_uses_the_share_and_cover_of_box_pixels():
    gt = GroundTruth([{"id": 5, "label": "bag", "bbox": [0, 0, 10, 10]}])
    assert gt.match_region(np.array([0, 0, 10, 12]), None) == 5
    # IoU 100/900 = 0.11, but the box holds the whole bag and nothing else annotated (IoU said None).
    assert gt.match_region(np.array([0, 0, 30, 30]), None) == 5
    # Covers 40% of the bag: too little.
    assert gt.match_region(np.array([0, 0, 4, 10]), None) is None


def test_box_only_zone_around_a_head_depicts_the_head():
    boxes_only = GroundTruth(
        [{"id": r["id"], "label": r["label"], "bbox": r["bbox"]} for r in _regions_of(_gt())]
    )
    # The generous zone of the first test: box IoU 0.32 with the head box, yet all of the head.
    assert boxes_only.match_region(np.array([0, 0, 20, 10]), None) == 0
    assert boxes_only.match_region(np.array([0, 0, 20, 24]), None) == 1


def test_overlapping_boxes_give_the_overlap_to_the_smaller_box():
    gt = GroundTruth(
        [
            {"id": 1, "label": "upper", "bbox": [0, 0, 20, 20]},
            {"id": 4, "label": "bag", "bbox": [10, 10, 16, 16]},
        ]
    )
    masks = gt.box_masks(20, 20)
    assert masks[1].sum() == 36 and masks[0].sum() == 400 - 36 and not (masks[0] & masks[1]).any()
    # A tight box on the bag is about the bag alone, though it lies inside the jacket's box.
    assert gt.match_region(np.array([10, 10, 16, 16]), None) == 4
    # A mined mask given with box-only ground truth is judged by its pixels (here: the jacket minus the bag).
    jacket = np.ones((20, 20), bool)
    jacket[10:16, 10:16] = False
    assert gt.match_region(np.array([0, 0, 20, 20]), jacket) == 1


def _regions_of(gt: GroundTruth) -> list[dict]:
    return [{"id": i, "label": "", "bbox": b.tolist()} for i, b in zip(gt.ids, gt.boxes, strict=True)]


def test_masks_and_boxes_only_agree_where_boxes_do_not_overlap(tmp_path):
    """The synthetic benchmark judged twice: with its masks, and with its boxes only. Mined regions: the
    prior proposer's zones and jittered ground-truth boxes. Where a mined region touches no pixel shared by
    two ground-truth boxes, both judge alike but for mixes of parts near the share-of-half threshold (a
    mask is smaller than its box, so the share moves a little): measured 246 of 247 on 24 images, while
    the box-IoU rule agreed on 214."""
    import json

    from PIL import Image

    from miners.regions.prior import PriorProposer
    from storage.rle import box_iou_xyxy
    from storage.synth import generate
    from storage.truth import box_pixels

    generate(tmp_path, identities=4, images_per_id=2, seed=5, workers=1)
    proposer, rng = PriorProposer(), np.random.default_rng(0)
    agree, agree_iou, judged = 0, 0, 0
    for rec in json.loads((tmp_path / "pvlg.json").read_text()):
        image = np.asarray(Image.open(tmp_path / "imgs" / rec["file_path"]).convert("RGB"))
        h, w = image.shape[:2]
        with_masks = GroundTruth(rec["regions"])
        boxes_only = GroundTruth([{k: v for k, v in r.items() if k != "mask"} for r in rec["regions"]])
        assert with_masks.masks() is not None and boxes_only.masks() is None
        boxes_per_pixel = np.zeros((h, w), int)
        for box in boxes_only.boxes:
            boxes_per_pixel[box_pixels(box, h, w)] += 1
        mined = list(proposer.propose(image).boxes_xyxy)
        mined += [box + rng.normal(0, 4, 4) for box in boxes_only.boxes for _ in range(4)]
        for box in mined:
            if (boxes_per_pixel[box_pixels(box, h, w)] >= 2).any():
                continue
            judged += 1
            by_mask = with_masks.match_region(box, None)
            agree += by_mask == boxes_only.match_region(box, None)
            ious = box_iou_xyxy(np.asarray(box).reshape(1, 4), boxes_only.boxes)[0]
            agree_iou += by_mask == (boxes_only.ids[int(np.argmax(ious))] if ious.max() >= 0.5 else None)
    assert judged >= 40
    assert agree >= 0.95 * judged
    assert agree > agree_iou  # the test tells the rule from the rejected IoU fallback


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
