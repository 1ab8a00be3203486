"""The region batch every proposer returns, and the proposer interface.

Consumes nothing but numpy; produces `Regions`, a columnar, row-aligned batch (one row per region, like
segment-anything's `MaskData`): N x 4 XYXY pixel boxes in the image's frame (exclusive max), optional
H x W boolean masks, body-part labels from `storage.schemas.BODY_PARTS` (or None), qualities in [0, 1],
and the name of the proposer that made them. `RegionProposer` is the protocol the mining worker calls:
`propose(image_rgb)` for one H x W x 3 uint8 image, `propose_batch(images)` for several.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from storage.rle import encode_mask
from storage.schemas import BODY_PARTS

REGION_SOURCES: tuple[str, ...] = ("prior", "sam-prompted", "sam-auto")


@dataclass
class Regions:
    """N regions of one image, column by column.

    boxes_xyxy: N x 4 float32, XYXY pixels (exclusive max), in the image's frame.
    masks: N boolean H x W masks, or None for a region the proposer gives as a box only.
    labels: N body-part labels (one of BODY_PARTS) or None where unknown.
    quality: N float32 in [0, 1].
    source: the proposer that made every row ("prior" | "sam-prompted" | "sam-auto").
    """

    boxes_xyxy: np.ndarray
    masks: list[np.ndarray | None]
    labels: list[str | None]
    quality: np.ndarray
    source: str

    def __post_init__(self) -> None:
        self.boxes_xyxy = np.asarray(self.boxes_xyxy, dtype=np.float32).reshape(-1, 4)
        self.quality = np.asarray(self.quality, dtype=np.float32).reshape(-1)
        self.masks = list(self.masks)
        self.labels = list(self.labels)
        n = len(self.boxes_xyxy)
        if not (len(self.masks) == len(self.labels) == len(self.quality) == n):
            raise ValueError(
                f"Regions columns are not row-aligned: {n} boxes, {len(self.masks)} masks, "
                f"{len(self.labels)} labels, {len(self.quality)} qualities"
            )
        if self.source not in REGION_SOURCES:
            raise ValueError(f"unknown region source {self.source!r}; expected one of {REGION_SOURCES}")
        bad = [label for label in self.labels if label is not None and label not in BODY_PARTS]
        if bad:
            raise ValueError(f"region labels {bad} are not body parts; expected one of {BODY_PARTS} or None")
        if n and not (
            np.isfinite(self.quality).all() and 0.0 <= self.quality.min() <= self.quality.max() <= 1.0
        ):
            raise ValueError(f"region quality must lie in [0, 1], got {self.quality.tolist()}")

    @classmethod
    def empty(cls, source: str) -> Regions:
        return cls(np.zeros((0, 4), np.float32), [], [], np.zeros(0, np.float32), source)

    def __len__(self) -> int:
        return len(self.boxes_xyxy)

    def filter(self, keep: np.ndarray) -> Regions:
        """The rows selected by `keep`: a boolean mask of length N, or integer indices (order kept)."""
        keep = np.asarray(keep)
        if keep.dtype == bool:
            if keep.shape != (len(self),):
                raise ValueError(f"boolean keep mask has shape {keep.shape}, expected ({len(self)},)")
            idx = np.flatnonzero(keep)
        else:
            idx = keep.astype(np.int64).reshape(-1)
        return Regions(
            boxes_xyxy=self.boxes_xyxy[idx],
            masks=[self.masks[i] for i in idx],
            labels=[self.labels[i] for i in idx],
            quality=self.quality[idx],
            source=self.source,
        )

    def cat(self, other: Regions) -> Regions:
        """This batch's rows followed by `other`'s; both must come from the same proposer."""
        if other.source != self.source:
            raise ValueError(f"cannot concatenate regions from {self.source!r} and {other.source!r}")
        return Regions(
            boxes_xyxy=np.concatenate([self.boxes_xyxy, other.boxes_xyxy]),
            masks=self.masks + other.masks,
            labels=self.labels + other.labels,
            quality=np.concatenate([self.quality, other.quality]),
            source=self.source,
        )

    def masks_rle(self) -> list[dict | None]:
        """Masks as COCO RLE dicts (storage.rle.encode_mask); None where the row has no mask."""
        return [None if m is None else encode_mask(m) for m in self.masks]


def top_k_by_quality(regions: Regions, k: int, keep_order: bool) -> Regions:
    """At most `k` rows, the highest quality first; ties keep their input order.

    keep_order=True returns the survivors in their original order (zones stay head→bag);
    False returns them sorted by quality, best first.
    """
    if k < 0:
        raise ValueError(f"max_regions must be >= 0, got {k}")
    order = np.argsort(-regions.quality, kind="stable")[:k]
    return regions.filter(np.sort(order) if keep_order else order)


def check_image_rgb(image_rgb: np.ndarray) -> None:
    """Raise ValueError unless `image_rgb` is an H x W x 3 uint8 array with both sides >= 1."""
    if not isinstance(image_rgb, np.ndarray):
        raise ValueError(f"expected an H x W x 3 uint8 numpy array, got {type(image_rgb).__name__}")
    if image_rgb.ndim != 3 or image_rgb.shape[2] != 3 or image_rgb.dtype != np.uint8:
        raise ValueError(f"expected an H x W x 3 uint8 image, got shape {image_rgb.shape} {image_rgb.dtype}")
    if min(image_rgb.shape[:2]) < 1:
        raise ValueError(f"empty image of shape {image_rgb.shape}")


@runtime_checkable
class RegionProposer(Protocol):
    """Anything that turns an RGB image into `Regions`. Subclass it to inherit the batch loop."""

    name: str

    def propose(self, image_rgb: np.ndarray) -> Regions:
        """Regions of one H x W x 3 uint8 image, boxes in its pixel frame."""
        ...

    def propose_batch(self, images: list[np.ndarray]) -> list[Regions]:
        """One `Regions` per image; proposers that can share work across images override this."""
        return [self.propose(image) for image in images]
