"""Judge mined pairs against pvlg / synthetic ground truth.

Consumes a mined region (box, optional mask), a text unit's char span, and the image's ground-truth
regions and the caption's links (the manifest's `gt_regions` / `gt_links` JSON); produces, per unit,
whether it is *groundable* (its span overlaps a linked phrase) and whether its pair is *correct*
(the ground-truth region the mined region depicts — see `GroundTruth.match_region` — is linked to a
phrase inside the unit). Used to fit the calibrator,
by benchmarks, and by QA's true-noise figures.

One rule for every kind of ground truth: the share and cover of annotated pixels. Regions with masks
annotate their mask's pixels; regions with boxes only (the `pvlg` format makes masks optional) annotate
their box's pixels, rasterised the way a mined box is. Box IoU is not used (a zone around a head is
right about the hair, yet its IoU with a tight head box is below 0.5).
"""

from __future__ import annotations

import numpy as np

from storage.rle import decode_mask

MIN_COVER = 0.5


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
        self._box_masks: dict[tuple[int, int], list[np.ndarray]] = {}

    def masks(self) -> list[np.ndarray] | None:
        """Every region's decoded mask, or None unless every region has one."""
        if self._masks is None and self._rles and all(m is not None for m in self._rles):
            self._masks = [decode_mask(m) for m in self._rles]
        return self._masks

    def box_masks(self, height_px: int, width_px: int) -> list[np.ndarray]:
        """Each region's box rasterised as its pixels on an H x W canvas, for ground truth without masks.

        Where boxes overlap, the overlap goes to the smaller box (drawn last): the smaller region is the
        one in front (a bag on the jacket, a head on the collar), as a mask annotation would have it,
        so each annotated pixel belongs to one region as with masks. This tie rule is the project's own.
        Unless every region has a mask, every region is judged by its box (one kind of pixels per image).
        """
        if (height_px, width_px) in self._box_masks:
            return self._box_masks[height_px, width_px]
        label_hw = np.full((height_px, width_px), -1, dtype=np.int32)
        areas = (self.boxes[:, 2] - self.boxes[:, 0]) * (self.boxes[:, 3] - self.boxes[:, 1])
        for k in np.argsort(-areas, kind="stable"):
            label_hw[box_pixels(self.boxes[k], height_px, width_px)] = k
        self._box_masks[height_px, width_px] = [label_hw == k for k in range(len(self.ids))]
        return self._box_masks[height_px, width_px]

    def match_region(
        self, box_xyxy: np.ndarray, mask_hw: np.ndarray | None, min_cover: float = MIN_COVER
    ) -> int | None:
        """Ground-truth region id the mined region depicts, or None.

        The mined region (its mask, or its box where it has none) depicts ground-truth region G when
        G holds the largest share of the annotated pixels inside it, that share is at least half of
        them (the region is *about* G, not a mix of parts), and it covers at least `min_cover` of G.
        Ground truth without masks annotates each region's box pixels (`box_masks`): the same rule.
        """
        if not self.ids:
            return None
        gt_masks = self.masks()
        if gt_masks is None:
            # The canvas holds every box; the mined region's pixels outside all of them count for nothing.
            h, w = int(np.ceil(self.boxes[:, 3].max())), int(np.ceil(self.boxes[:, 2].max()))
            if mask_hw is not None:
                h, w = max(h, mask_hw.shape[0]), max(w, mask_hw.shape[1])
                padded = np.zeros((h, w), dtype=bool)
                padded[: mask_hw.shape[0], : mask_hw.shape[1]] = mask_hw
                mask_hw = padded
            gt_masks = self.box_masks(h, w)
        h, w = gt_masks[0].shape
        if mask_hw is None or mask_hw.shape != (h, w):
            mask_hw = np.zeros((h, w), dtype=bool)
            mask_hw[box_pixels(box_xyxy, h, w)] = True
        inter = np.array([np.logical_and(mask_hw, g).sum() for g in gt_masks], dtype=np.float64)
        k = int(np.argmax(inter))
        if inter[k] == 0:
            return None
        share = inter[k] / inter.sum()
        cover = inter[k] / max(1.0, float(gt_masks[k].sum()))
        return self.ids[k] if share >= 0.5 and cover >= min_cover else None


def box_pixels(box_xyxy, height_px: int, width_px: int) -> tuple[slice, slice]:
    """The (rows, cols) slices of the pixels an XYXY box touches, clipped to the canvas."""
    x0, y0, x1, y1 = np.asarray(box_xyxy, dtype=np.float64)
    return (
        slice(int(max(0, y0)), int(np.ceil(min(height_px, y1)))),
        slice(int(max(0, x0)), int(np.ceil(min(width_px, x1)))),
    )


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


def judge_pairs(pairs, manifest, min_cover: float = MIN_COVER) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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
        gid = images[regions_json].match_region(np.asarray(cols["bbox_xyxy"][i]), mask, min_cover)
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
