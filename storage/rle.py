"""Binary masks ⇄ COCO run-length encoding, and box/mask geometry shared by every stage.

Consumes boolean masks (H x W numpy arrays); produces COCO compressed RLE as a JSON-friendly dict
`{"size": [h, w], "counts": str}` (pycocotools' format with `counts` decoded to text), tight XYXY
boxes and IoUs. pycocotools does the encoding so the output reads back in any COCO tool.
"""

from __future__ import annotations

import json

import numpy as np
from pycocotools import mask as mask_utils


def encode_mask(mask_hw: np.ndarray) -> dict:
    """Encode an H x W boolean mask as `{"size": [h, w], "counts": str}`."""
    rle = mask_utils.encode(np.asfortranarray(mask_hw.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def decode_mask(rle: dict | str) -> np.ndarray:
    """Decode an RLE dict (or its JSON text) to an H x W boolean mask."""
    if isinstance(rle, str):
        rle = json.loads(rle)
    coco = {"size": list(rle["size"]), "counts": rle["counts"].encode("ascii")}
    return mask_utils.decode(coco).astype(bool)


def mask_to_box_xyxy(mask_hw: np.ndarray) -> np.ndarray | None:
    """Tight XYXY box (pixels, exclusive max) around a boolean mask; None for an empty mask."""
    rows = np.flatnonzero(mask_hw.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask_hw.any(axis=0))
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=np.float32)


def box_iou_xyxy(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """IoU matrix (N x M) between two sets of XYXY boxes (N x 4 and M x 4)."""
    a = np.asarray(boxes_a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(boxes_b, dtype=np.float64).reshape(-1, 4)
    x0 = np.maximum(a[:, None, 0], b[None, :, 0])
    y0 = np.maximum(a[:, None, 1], b[None, :, 1])
    x1 = np.minimum(a[:, None, 2], b[None, :, 2])
    y1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def mask_iou(masks_a: list[np.ndarray], masks_b: list[np.ndarray]) -> np.ndarray:
    """IoU matrix (N x M) between two lists of same-sized boolean masks."""
    if not masks_a or not masks_b:
        return np.zeros((len(masks_a), len(masks_b)))
    a = np.stack([m.reshape(-1) for m in masks_a]).astype(np.float32)
    b = np.stack([m.reshape(-1) for m in masks_b]).astype(np.float32)
    inter = a @ b.T
    union = a.sum(1)[:, None] + b.sum(1)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)
