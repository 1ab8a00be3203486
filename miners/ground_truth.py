"""Judge mined pairs against pvlg / synthetic ground truth.

Consumes a mined region (box, optional mask), a text unit's char span, and the image's ground-truth
regions and the caption's links (the manifest's `gt_regions` / `gt_links` JSON); produces, per unit,
whether it is *groundable* (its span overlaps a linked phrase) and whether its pair is *correct*
(the mined region's best-overlapping ground-truth region — mask IoU when both masks exist, box IoU
otherwise — reaches `min_iou` and is linked to a phrase inside the unit). Used to fit the calibrator,
by benchmarks, and by QA's true-noise figures.
"""

from __future__ import annotations

import numpy as np

from storage.rle import box_iou_xyxy, decode_mask, mask_iou

MIN_IOU = 0.5


def phrase_in_unit(phrase_span: list[int], unit_span: tuple[int, int]) -> bool:
    """A phrase belongs to a unit when at least half of the phrase lies inside the unit's span."""
    s, e = phrase_span
    overlap = min(e, unit_span[1]) - max(s, unit_span[0])
    return overlap > 0 and overlap * 2 >= (e - s)


class GroundTruth:
    """The ground truth of one image (regions) with helpers to judge its pairs."""

    def __init__(self, gt_regions: list[dict]):
        self.ids = [int(r["id"]) for r in gt_regions]
        self.boxes = np.asarray([r["bbox"] for r in gt_regions], dtype=np.float32).reshape(-1, 4)
        self._rles = [r.get("mask") for r in gt_regions]
        self._masks: list[np.ndarray] | None = None

    def masks(self) -> list[np.ndarray] | None:
        if self._masks is None and self._rles and all(m is not None for m in self._rles):
            self._masks = [decode_mask(m) for m in self._rles]
        return self._masks

    def match_region(
        self, box_xyxy: np.ndarray, mask_hw: np.ndarray | None, min_iou: float = MIN_IOU
    ) -> int | None:
        """Ground-truth region id that the mined region overlaps best, or None below `min_iou`."""
        if not self.ids:
            return None
        gt_masks = self.masks()
        if mask_hw is not None and gt_masks is not None and gt_masks[0].shape == mask_hw.shape:
            ious = mask_iou([mask_hw], gt_masks)[0]
        else:
            ious = box_iou_xyxy(np.asarray(box_xyxy).reshape(1, 4), self.boxes)[0]
        k = int(np.argmax(ious))
        return self.ids[k] if ious[k] >= min_iou else None


def judge_units(
    unit_spans: list[tuple[int, int]], matched_gt_ids: list[int | None], gt_links: list[dict]
) -> tuple[np.ndarray, np.ndarray]:
    """(groundable, correct) booleans per unit, given each unit's mined region's ground-truth id."""
    phrases = [p for link in gt_links for p in link.get("phrases", [])]
    groundable = np.zeros(len(unit_spans), dtype=bool)
    correct = np.zeros(len(unit_spans), dtype=bool)
    for u, span in enumerate(unit_spans):
        inside = [p for p in phrases if phrase_in_unit(p["span"], span)]
        groundable[u] = bool(inside)
        gid = matched_gt_ids[u]
        correct[u] = gid is not None and any(p["region_id"] == gid for p in inside)
    return groundable, correct


def judge_pairs(pairs, manifest, min_iou: float = MIN_IOU) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(has_truth, groundable, correct) per row of a pairs table (PAIRS_SCHEMA), using the manifest's
    `gt_regions` / `gt_links`. Rows whose sample has no ground truth get has_truth False."""
    import json

    gt_of_sample = {}
    for sid, regions_json, links_json in zip(
        manifest["sample_id"].to_pylist(),
        manifest["gt_regions"].to_pylist(),
        manifest["gt_links"].to_pylist(),
        strict=True,
    ):
        if regions_json and links_json is not None:
            gt_of_sample[sid] = (regions_json, links_json)
    cols = pairs.select(["sample_id", "char_start", "char_end", "bbox_xyxy", "mask_rle"]).to_pydict()
    n = pairs.num_rows
    has_truth = np.zeros(n, dtype=bool)
    groundable = np.zeros(n, dtype=bool)
    correct = np.zeros(n, dtype=bool)
    images: dict[str, GroundTruth] = {}
    links_cache: dict[str, list[dict]] = {}
    for i in range(n):
        sid = cols["sample_id"][i]
        if sid not in gt_of_sample:
            continue
        regions_json, links_json = gt_of_sample[sid]
        if regions_json not in images:
            images[regions_json] = GroundTruth(json.loads(regions_json))
        if sid not in links_cache:
            links_cache[sid] = json.loads(links_json)
        rle = cols["mask_rle"][i]
        mask = decode_mask(rle) if rle else None
        gid = images[regions_json].match_region(np.asarray(cols["bbox_xyxy"][i]), mask, min_iou)
        g, c = judge_units([(cols["char_start"][i], cols["char_end"][i])], [gid], links_cache[sid])
        has_truth[i], groundable[i], correct[i] = True, g[0], c[0]
    return has_truth, groundable, correct


def pair_quality(kept: np.ndarray, groundable: np.ndarray, correct: np.ndarray) -> dict[str, float]:
    """Precision of kept pairs and coverage of groundable units (one pair per unit)."""
    kept = np.asarray(kept, dtype=bool)
    n_kept = int(kept.sum())
    n_groundable = int(groundable.sum())
    return {
        "pairs": int(kept.size),
        "pairs_kept": n_kept,
        "groundable_units": n_groundable,
        "precision_kept": float((correct & kept).sum() / n_kept) if n_kept else float("nan"),
        "coverage": float((correct & kept & groundable).sum() / n_groundable)
        if n_groundable
        else float("nan"),
        "accuracy_all": float(correct[groundable].mean()) if n_groundable else float("nan"),
    }
