"""Weights-free body-part regions: the person's extent from colour contrast, split into prior zones.

Consumes an H x W x 3 uint8 pedestrian image; produces the estimated person box (XYXY pixels) and six
body-part zones fitted to it — head, upper, lower, feet, bag-left, bag-right — as `Regions` with
source "prior", no masks, and quality = the zone's prior confidence x the extent estimate's confidence.
The same zones serve as box prompts for "sam-prompted" and as the label vocabulary for "sam-auto".

Zone fractions (of the person box; `ZoneSpec`, defaults in `DEFAULT_ZONES`), top to bottom:
  head 0-20% of the height (central 70% of the width), upper 15-52%, lower 48-85%, feet 83-100%
  (full width), bags = the outer 35% on each side at torso height (25-65%). Neighbouring zones overlap
  by a few percent because garment boundaries move with pose and cut.

Person extent (numpy only): pixels far in RGB from every background colour — the medians of the four
border strips plus each colour common along the border (clutter reaching the edge) — are foreground;
a 3 x 3 majority vote removes speckle; column then row fill profiles give the person's contiguous span. An
estimate that is not person-like (too short, too wide, no contrast) falls back to a centred
full-height box, flagged with lower confidence.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from miners.regions.base import RegionProposer, Regions, check_image_rgb, top_k_by_quality
from storage.schemas import BODY_PARTS


@dataclass(frozen=True)
class ZoneSpec:
    """One body-part zone as fractions of the person box; `confidence` is its prior quality in [0, 1]."""

    name: str
    label: str
    y0_frac: float
    y1_frac: float
    x0_frac: float
    x1_frac: float
    confidence: float


# Standing-body proportions: the head is about the top fifth of a pedestrian box with hair and hat,
# shoes the bottom tenth; the lower zone starts below the hips and is narrowed to the legs so that it is
# mostly trousers, not arms or bags. Checked against the ground truth of the demo's calibration set
# (synthetic seed 1000, never the evaluation seed): the zone depicts its part for head 0.92, upper 0.88,
# lower 0.88, feet 0.94 of 200 images (feet were 0.52 with the earlier 0.83–1.00 zone, which held
# more trouser than shoe).
DEFAULT_ZONES: tuple[ZoneSpec, ...] = (
    ZoneSpec("head", "head", 0.00, 0.20, 0.15, 0.85, 0.5),
    ZoneSpec("upper", "upper", 0.15, 0.52, 0.00, 1.00, 0.5),
    ZoneSpec("lower", "lower", 0.55, 0.90, 0.15, 0.85, 0.5),
    ZoneSpec("feet", "feet", 0.90, 1.00, 0.00, 1.00, 0.5),
    # Most pedestrians carry no bag, so a bag zone is less likely to hold what it names.
    ZoneSpec("bag-left", "bag", 0.25, 0.65, 0.00, 0.35, 0.3),
    ZoneSpec("bag-right", "bag", 0.25, 0.65, 0.65, 1.00, 0.3),
)


@dataclass
class PriorConfig:
    """Zones and the person-extent estimator's knobs (fractions are of the image unless stated)."""

    zones: tuple[ZoneSpec, ...] = DEFAULT_ZONES
    max_regions: int = 8
    analysis_max_side_px: int = 256  # larger images are decimated to about this long side first
    border_frac: float = 0.04  # width of the border band sampled as background, of the short side
    min_color_dist: float = 15.0  # RGB distance under which a pixel is always background
    max_color_dist: float = 120.0  # cap, so a cluttered border cannot hide the person entirely
    palette_bin_rgb: int = 16  # border colours are binned this coarsely (per channel) into a palette
    palette_min_share: float = 0.01  # a palette colour covers at least this share of the border
    border_quantile: float = 0.8  # foreground = further from background than this share of the border
    border_margin: float = 12.0
    col_rel_fill: float = 0.15  # a column belongs to the person if its fill >= this x the peak column's
    min_peak_col_fill: float = 0.2  # the fullest column must be at least this much foreground
    row_min_fill: float = 0.08  # a row belongs to the person if this share of its columns is foreground
    gap_frac: float = 0.05  # gaps in a profile up to this share of the side are closed (neck, legs)
    min_height_frac: float = 0.35  # a plausible person spans at least this share of the image height
    min_aspect_h_over_w: float = 1.0
    max_aspect_h_over_w: float = 8.0
    min_separation: float = 0.15  # fill inside the box minus fill outside, below which we distrust it
    full_separation: float = 0.5  # separation at which the estimate is fully trusted
    fallback_width_over_height: float = 0.45  # the fallback box's width, of the image height
    fallback_confidence: float = 0.5

    def __post_init__(self) -> None:
        for zone in self.zones:
            if zone.label not in BODY_PARTS:
                raise ValueError(f"zone {zone.name!r} has label {zone.label!r}, not one of {BODY_PARTS}")
            if not (0 <= zone.y0_frac < zone.y1_frac <= 1 and 0 <= zone.x0_frac < zone.x1_frac <= 1):
                raise ValueError(f"zone {zone.name!r} fractions must satisfy 0 <= start < end <= 1: {zone}")
            if not 0 <= zone.confidence <= 1:
                raise ValueError(f"zone {zone.name!r} confidence {zone.confidence} is outside [0, 1]")


@dataclass
class PersonExtent:
    """Estimated person box (XYXY pixels, exclusive max), its confidence in [0, 1], and how it was found."""

    box_xyxy: np.ndarray
    confidence: float
    fallback: bool
    reason: str = field(default="estimated")


def _runs(active: np.ndarray, max_gap: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) runs of True in a 1-D mask, after closing gaps of <= max_gap False."""
    idx = np.flatnonzero(active)
    if idx.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(idx) > max_gap + 1)
    starts = np.concatenate([[idx[0]], idx[breaks + 1]])
    ends = np.concatenate([idx[breaks], [idx[-1]]]) + 1
    return list(zip(starts.tolist(), ends.tolist(), strict=True))


def _smooth(profile: np.ndarray, window: int) -> np.ndarray:
    if window <= 1:
        return profile
    return np.convolve(profile, np.ones(window) / window, mode="same")


def _border_strips(image: np.ndarray, config: PriorConfig) -> list[np.ndarray]:
    """The top, bottom, left and right bands of the image as K x 3 pixel lists."""
    band = max(1, round(config.border_frac * min(image.shape[:2])))
    strips = [image[:band], image[-band:], image[:, :band], image[:, -band:]]
    return [s.reshape(-1, 3) for s in strips]


def border_palette(image_rgb: np.ndarray, config: PriorConfig) -> np.ndarray:
    """P x 3 float32 background colours: strip medians plus every colour common along the border."""
    strips = _border_strips(image_rgb.astype(np.float32), config)
    border = np.concatenate(strips)
    # Medians catch two-toned backgrounds (wall above, floor below); the coarse colour histogram
    # catches clutter that reaches the border. Rare border colours (a shoe touching the edge) are left out.
    medians = np.stack([np.median(s, axis=0) for s in strips])
    bins = (border // config.palette_bin_rgb).astype(np.int64)
    keys = (bins[:, 0] * 256 + bins[:, 1]) * 256 + bins[:, 2]
    uniq, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    common = np.flatnonzero(counts >= config.palette_min_share * len(border))
    inverse = inverse.reshape(-1)
    sums = np.stack([np.bincount(inverse, weights=border[:, c], minlength=len(uniq)) for c in range(3)], -1)
    means = sums[common] / counts[common, None]
    return np.concatenate([medians, means]).astype(np.float32)


def _palette_distance(pixels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """RGB distance of every pixel (... x 3) to its nearest palette colour.

    One pass per palette colour over channel-major pixels, with a running minimum: the same float32
    arithmetic in the same order as an N x P x 3 difference tensor reduced over its short last axes,
    but contiguous and about 15x faster. No matrix product on purpose: BLAS threads on a product this
    small cost more than they save and fight the CLIP forward's threads for the worker's cores."""
    channels = np.ascontiguousarray(pixels.reshape(-1, 3).T, dtype=np.float32)  # 3 x N
    best = np.full(channels.shape[1], np.inf, np.float32)
    d2 = np.empty_like(best)
    tmp = np.empty_like(best)
    for colour in np.asarray(palette, np.float32):
        np.subtract(channels[0], colour[0], out=d2)
        np.square(d2, out=d2)
        for c in (1, 2):
            np.subtract(channels[c], colour[c], out=tmp)
            np.square(tmp, out=tmp)
            d2 += tmp
        np.minimum(best, d2, out=best)
    return np.sqrt(best).reshape(pixels.shape[:-1])


def foreground_mask(image_rgb: np.ndarray, config: PriorConfig) -> np.ndarray:
    """H x W bool: pixels whose colour is far from every background colour of the border palette."""
    image = image_rgb.astype(np.float32)
    h, w = image.shape[:2]
    palette = border_palette(image_rgb, config)
    # The threshold adapts to the border's own spread (noise, texture), within fixed bounds.
    border_dist = _palette_distance(np.concatenate(_border_strips(image, config)), palette)
    thresh = np.quantile(border_dist, config.border_quantile) + config.border_margin
    thresh = float(np.clip(thresh, config.min_color_dist, config.max_color_dist))
    fg = _palette_distance(image, palette) > thresh
    # 3 x 3 majority vote: removes speckle and thin clutter edges without scipy.
    padded = np.pad(fg, 1).astype(np.uint8)
    votes = sum(padded[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3))
    return votes >= 5


def _column_span(fg: np.ndarray, config: PriorConfig) -> tuple[int, int] | None:
    w = fg.shape[1]
    cols = _smooth(fg.mean(axis=0), max(1, w // 32) | 1)
    peak = int(np.argmax(cols))
    if cols[peak] < config.min_peak_col_fill:
        return None
    active = cols >= config.col_rel_fill * cols[peak]
    for start, end in _runs(active, round(config.gap_frac * w)):
        if start <= peak < end:
            return _trim(fg.mean(axis=0), start, end, config.col_rel_fill * cols[peak])
    return None


def _trim(raw: np.ndarray, start: int, end: int, thresh: float) -> tuple[int, int]:
    """Shrink [start, end) to the raw profile's first/last entries >= thresh (smoothing widens runs)."""
    inside = np.flatnonzero(raw[start:end] >= thresh)
    if inside.size == 0:
        return start, end
    return start + int(inside[0]), start + int(inside[-1]) + 1


def estimate_person_extent(image_rgb: np.ndarray, config: PriorConfig | None = None) -> PersonExtent:
    """The person's box in `image_rgb`, or a centred full-height fallback when no plausible one is found."""
    config = config or PriorConfig()
    check_image_rgb(image_rgb)
    h, w = image_rgb.shape[:2]
    # Large images are analysed decimated: the extent needs a few pixels' precision, not full resolution.
    step = max(1, -(-max(h, w) // config.analysis_max_side_px))
    fg = foreground_mask(image_rgb[::step, ::step], config)
    hs = fg.shape[0]

    def fallback(reason: str) -> PersonExtent:
        width = min(float(w), config.fallback_width_over_height * h)
        x0 = (w - width) / 2
        box = np.array([x0, 0.0, x0 + width, float(h)], dtype=np.float32)
        return PersonExtent(box, config.fallback_confidence, fallback=True, reason=reason)

    # Columns first (a standing person is the tallest foreground column block), then its rows.
    span = _column_span(fg, config)
    if span is None:
        return fallback("no foreground column block")
    x0, x1 = span
    raw_rows = fg[:, x0:x1].mean(axis=1)
    rows = _smooth(raw_rows, max(1, hs // 64) | 1)
    runs = _runs(rows >= config.row_min_fill, round(config.gap_frac * hs))
    if not runs:
        return fallback("no foreground rows")
    y0, y1 = max(runs, key=lambda r: rows[r[0] : r[1]].sum())
    y0, y1 = _trim(raw_rows, y0, y1, config.row_min_fill)
    # Re-fit the columns on the person's rows only, so clutter above or below cannot widen the box.
    span = _column_span(fg[y0:y1], config)
    if span is not None:
        x0, x1 = span

    # Plausibility: tall enough, person-shaped, and standing out from its surroundings.
    box_h, box_w = y1 - y0, x1 - x0
    if box_h < config.min_height_frac * hs:
        return fallback(f"too short ({box_h * step} of {h} px)")
    aspect = box_h / max(box_w, 1)
    if not config.min_aspect_h_over_w <= aspect <= config.max_aspect_h_over_w:
        return fallback(f"aspect h/w {aspect:.2f} not person-like")
    inside = fg[y0:y1, x0:x1]
    n_out = fg.size - inside.size
    fill_out = (fg.sum() - inside.sum()) / n_out if n_out else 0.0
    separation = float(inside.mean() - fill_out)
    if separation < config.min_separation:
        return fallback(f"weak separation {separation:.2f}")
    trust = min(1.0, separation / config.full_separation)
    confidence = config.fallback_confidence + (1.0 - config.fallback_confidence) * trust
    box = np.minimum(np.array([x0, y0, x1, y1], dtype=np.float32) * step, [w, h, w, h]).astype(np.float32)
    return PersonExtent(box, float(confidence), fallback=False)


def person_extent_xyxy(image_rgb: np.ndarray, config: PriorConfig | None = None) -> np.ndarray:
    """Estimated person box (4 float32, XYXY pixels, exclusive max); see `estimate_person_extent`."""
    return estimate_person_extent(image_rgb, config).box_xyxy


def prior_zones(
    extent_xyxy: np.ndarray, image_hw: tuple[int, int], zones: tuple[ZoneSpec, ...] = DEFAULT_ZONES
) -> tuple[np.ndarray, list[str]]:
    """Zone boxes (N x 4 float32, XYXY pixels, clipped to the image) and their body-part labels."""
    x0, y0, x1, y1 = (float(v) for v in np.asarray(extent_xyxy).reshape(4))
    h, w = image_hw
    boxes = np.array(
        [
            [
                x0 + z.x0_frac * (x1 - x0),
                y0 + z.y0_frac * (y1 - y0),
                x0 + z.x1_frac * (x1 - x0),
                y0 + z.y1_frac * (y1 - y0),
            ]
            for z in zones
        ],
        dtype=np.float32,
    ).reshape(-1, 4)
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, h)
    return boxes, [z.label for z in zones]


def label_masks_by_zones(
    masks: list[np.ndarray], zone_boxes_xyxy: np.ndarray, zone_labels: list[str], min_fraction: float
) -> list[str | None]:
    """Per mask, the label of the zone whose box holds the largest share of its pixels (None if < min)."""
    labels: list[str | None] = []
    int_boxes = np.round(np.asarray(zone_boxes_xyxy)).astype(np.int64).reshape(-1, 4)
    for mask in masks:
        area = mask.sum()
        if area == 0 or len(int_boxes) == 0:
            labels.append(None)
            continue
        fractions = np.array([mask[y0:y1, x0:x1].sum() / area for x0, y0, x1, y1 in int_boxes])
        best = int(np.argmax(fractions))
        labels.append(zone_labels[best] if fractions[best] >= min_fraction else None)
    return labels


class PriorProposer(RegionProposer):
    """Body-part zones fitted to the estimated person; boxes only (masks None)."""

    name = "prior"

    def __init__(self, config: PriorConfig | None = None):
        self.config = config or PriorConfig()

    def propose(self, image_rgb: np.ndarray) -> Regions:
        extent = estimate_person_extent(image_rgb, self.config)
        boxes, labels = prior_zones(extent.box_xyxy, image_rgb.shape[:2], self.config.zones)
        quality = np.array([z.confidence for z in self.config.zones], np.float32) * extent.confidence
        regions = Regions(boxes, [None] * len(boxes), list(labels), quality, source="prior")
        return top_k_by_quality(regions, self.config.max_regions, keep_order=True)
