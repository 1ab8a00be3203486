"""Training-time augmentation: images with their mined boxes, and caption tokens.

Consumes a batch of model-input images (`ClipData.images_u8`, B x 3 x H x W uint8), the mined boxes of
that batch (R x 4, XYXY, model-input pixels, with the batch row of each box) and a `torch.Generator`;
produces the augmented images, the boxes carried through the same geometry (so a region embedding still
pools the patches of the same person part) and a keep mask for the boxes still visible enough to train
on. For text: token id lists in, augmented token id lists out. Every random number comes from the
generator passed in, in a fixed amount per call, so a run resumed at a step (generator seeded from
(seed, step)) sees the same augmentations.

Following IRRA's published pipeline (`--img_aug`, datasets/build.py):
  RandomHorizontalFlip(0.5) → Pad(10, fill 0 = black) → RandomCrop(H, W) → RandomErasing(scale=(0.02,
  0.4), value=mean), with torchvision's defaults p=0.5 and ratio=(0.3, 3.3) and torchvision's rule for
  the erased rectangle (area fraction uniform in `erase_scale`, aspect ratio h/w log-uniform in
  `erase_ratio`, up to 10 attempts, no erasing when no attempt fits strictly inside the image).
  IRRA erases after normalisation with value=mean, i.e. 0 in normalised space; here erasing happens on
  uint8 pixels with `fill_u8` = round(255 · mean), which normalises to (almost exactly) 0.
Following RDE's published `txt_aug`: each real token is picked with p=0.2; a picked token becomes the
  mask id (0.6), a random id (0.2) or is deleted (0.2). BOS/EOS and special ids are never picked.

The project's own (the papers have no boxes):
  - boxes are mirrored with the flip, shifted by the crop and clipped to the output image;
  - `min_box_visible`: a box keeping less than this fraction of its original area (the box clipped to the
    input image) inside the crop and outside the erased rectangle is dropped from that step's local loss;
    a box of zero original area is never kept;
  - erasing is decided per image with p=`erase_p` (torchvision's per-call default p=0.5; IRRA applies the
    transform per image, so this matches it, but it is stated here because it is a parameter);
  - random replacement ids are drawn uniformly from [0, vocab_size) minus the special ids and the mask id
    (RDE draws from [1, 49405), which excludes the same ids for CLIP's vocabulary);
  - the random numbers are drawn as whole-batch tensors (not image by image as torchvision does), so a
    given seed gives different (equally distributed) draws than torchvision would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from miners.training.config import IMAGE_AUGMENT_NAMES

ERASE_ATTEMPTS = 10  # torchvision RandomErasing.get_params


@dataclass
class ImageAugment:
    flip_p: float = 0.5
    pad_px: int = 10
    erase_p: float = 0.5
    erase_scale: tuple[float, float] = (0.02, 0.4)  # erased area / image area
    erase_ratio: tuple[float, float] = (0.3, 3.3)  # erased height / width, sampled log-uniformly
    min_box_visible: float = 0.5  # the project's own (see the module docstring)

    def __post_init__(self) -> None:
        for name in ("flip_p", "erase_p", "min_box_visible"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if self.pad_px < 0:
            raise ValueError(f"pad_px must be >= 0, got {self.pad_px}")
        lo, hi = self.erase_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"erase_scale must satisfy 0 < lo <= hi <= 1, got {self.erase_scale}")
        lo, hi = self.erase_ratio
        if not 0.0 < lo <= hi:
            raise ValueError(f"erase_ratio must satisfy 0 < lo <= hi, got {self.erase_ratio}")

    @classmethod
    def irra(cls) -> ImageAugment:
        return cls()

    @classmethod
    def none(cls) -> ImageAugment:
        """Identity geometry (no flip, crop or erasing); boxes only get clipped and filtered."""
        return cls(flip_p=0.0, pad_px=0, erase_p=0.0)


# `--augment NAME` → the augmentation (None: images as decoded); the names are config.IMAGE_AUGMENT_NAMES
IMAGE_AUGMENTS: dict[str, ImageAugment | None] = {"none": None, "irra": ImageAugment.irra()}
assert tuple(IMAGE_AUGMENTS) == IMAGE_AUGMENT_NAMES, "miners.training.config lists the augmentations"


@dataclass
class TextAugment:
    pick_p: float = 0.2
    mask: float = 0.6  # of the picked tokens: become mask_id
    replace: float = 0.2  # of the picked tokens: become a random id
    delete: float = 0.2  # of the picked tokens: removed

    def __post_init__(self) -> None:
        for name in ("pick_p", "mask", "replace", "delete"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if abs(self.mask + self.replace + self.delete - 1.0) > 1e-6:
            raise ValueError("mask + replace + delete must sum to 1")


# ------------------------------------------------------------------------------------------------ images


def _sample_erase_rects(n: int, h: int, w: int, aug: ImageAugment, generator: torch.Generator) -> np.ndarray:
    """n x 4 int rectangles (top, left, height, width); height 0 means no erasing for that image.

    torchvision's rule, vectorised: all 10 attempts are drawn for every image (a fixed amount of random
    numbers), the first attempt with h < H and w < W wins, then its position is uniform."""
    do_erase = torch.rand(n, generator=generator, dtype=torch.float64) < aug.erase_p
    u_area = torch.rand(n, ERASE_ATTEMPTS, generator=generator, dtype=torch.float64)
    u_ratio = torch.rand(n, ERASE_ATTEMPTS, generator=generator, dtype=torch.float64)
    u_pos = torch.rand(n, 2, generator=generator, dtype=torch.float64)

    area = h * w * (aug.erase_scale[0] + (aug.erase_scale[1] - aug.erase_scale[0]) * u_area.numpy())
    log_lo, log_hi = math.log(aug.erase_ratio[0]), math.log(aug.erase_ratio[1])
    ratio = np.exp(log_lo + (log_hi - log_lo) * u_ratio.numpy())
    # Python's round (half to even) as torchvision; np.rint rounds the same way.
    eh = np.rint(np.sqrt(area * ratio)).astype(np.int64)
    ew = np.rint(np.sqrt(area / ratio)).astype(np.int64)
    fits = (eh < h) & (ew < w)
    first = fits.argmax(axis=1)
    rows = np.arange(n)
    ok = fits[rows, first] & do_erase.numpy()
    eh, ew = np.where(ok, eh[rows, first], 0), np.where(ok, ew[rows, first], 0)
    # Uniform integer positions in [0, H - eh] and [0, W - ew] (torch.randint's range, inclusive).
    pos = u_pos.numpy()
    top = np.minimum((pos[:, 0] * (h - eh + 1)).astype(np.int64), h - eh)
    left = np.minimum((pos[:, 1] * (w - ew + 1)).astype(np.int64), w - ew)
    return np.stack([top, left, eh, ew], axis=1)


def _overlap_area(a_xyxy: np.ndarray, b_xyxy: np.ndarray) -> np.ndarray:
    iw = np.clip(np.minimum(a_xyxy[:, 2], b_xyxy[:, 2]) - np.maximum(a_xyxy[:, 0], b_xyxy[:, 0]), 0, None)
    ih = np.clip(np.minimum(a_xyxy[:, 3], b_xyxy[:, 3]) - np.maximum(a_xyxy[:, 1], b_xyxy[:, 1]), 0, None)
    return iw * ih


def augment_batch(
    images_u8: torch.Tensor,
    box_rows: np.ndarray,
    boxes_xyxy: np.ndarray,
    aug: ImageAugment,
    generator: torch.Generator,
    fill_u8: tuple[int, int, int],
) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Flip, pad-and-crop and erase each image independently, carrying its boxes along.

    images_u8: B x 3 x H x W uint8 (not modified). box_rows: R ints in [0, B), the image of each box.
    boxes_xyxy: R x 4, XYXY, model-input pixels. fill_u8: the erased colour (round(255 · mean)).
    Returns (B x 3 x H x W uint8, R x 4 float32 boxes in output pixels clipped to the image, R bool keep):
    keep[r] says box r keeps at least `aug.min_box_visible` of its original area visible (and some area:
    a fully hidden box is dropped even with min_box_visible=0); a kept box has x0 < x1 and y0 < y1.
    generator: a CPU generator; the random stream does not depend on the boxes. Dropped boxes are returned clipped too (possibly empty); do not train on them.
    """
    if images_u8.dtype != torch.uint8 or images_u8.ndim != 4 or images_u8.shape[1] != 3:
        raise ValueError(f"images_u8 must be B x 3 x H x W uint8, got {images_u8.dtype} {images_u8.shape}")
    b, _, h, w = images_u8.shape
    box_rows = np.asarray(box_rows, dtype=np.int64).reshape(-1)
    boxes = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    if len(box_rows) != len(boxes):
        raise ValueError(f"{len(box_rows)} box rows for {len(boxes)} boxes")
    if len(box_rows) and (box_rows.min() < 0 or box_rows.max() >= b):
        raise ValueError(f"box_rows must index the {b} images")
    if len(fill_u8) != 3 or not all(0 <= int(v) <= 255 for v in fill_u8):
        raise ValueError(f"fill_u8 must be three values in [0, 255], got {fill_u8}")

    # Draw every random number up front, in fixed amounts: the stream does not depend on the outcomes.
    pad = int(aug.pad_px)
    flip = (torch.rand(b, generator=generator, dtype=torch.float64) < aug.flip_p).numpy()
    offset_yx = torch.randint(0, 2 * pad + 1, (b, 2), generator=generator).numpy()
    rects = _sample_erase_rects(b, h, w, aug, generator)

    # Images: out(y, x) = flipped(y + oy - pad, x + ox - pad), black outside; then the erased rectangle.
    out = torch.zeros_like(images_u8)
    fill = torch.tensor([int(v) for v in fill_u8], dtype=torch.uint8)[:, None, None]
    for i in range(b):
        src = images_u8[i].flip(-1) if flip[i] else images_u8[i]
        dy, dx = int(offset_yx[i, 0]) - pad, int(offset_yx[i, 1]) - pad  # source = output + (dy, dx)
        oy0, oy1 = max(0, -dy), min(h, h - dy)
        ox0, ox1 = max(0, -dx), min(w, w - dx)
        if oy0 < oy1 and ox0 < ox1:
            out[i, :, oy0:oy1, ox0:ox1] = src[:, oy0 + dy : oy1 + dy, ox0 + dx : ox1 + dx]
        top, left, eh, ew = (int(v) for v in rects[i])
        if eh > 0:
            out[i, :, top : top + eh, left : left + ew] = fill

    # Boxes: the same geometry in continuous pixel coordinates (pixel k spans [k, k+1)).
    limits = np.array([w, h, w, h], dtype=np.float64)
    original = np.clip(boxes, 0.0, limits)
    original_area = np.clip(original[:, 2] - original[:, 0], 0, None) * np.clip(
        original[:, 3] - original[:, 1], 0, None
    )
    moved = original.copy()
    flipped = flip[box_rows]
    moved[flipped, 0], moved[flipped, 2] = w - original[flipped, 2], w - original[flipped, 0]
    shift_x = (pad - offset_yx[box_rows, 1]).astype(np.float64)
    shift_y = (pad - offset_yx[box_rows, 0]).astype(np.float64)
    moved += np.stack([shift_x, shift_y, shift_x, shift_y], axis=1)
    clipped = np.clip(moved, 0.0, limits)
    visible = np.clip(clipped[:, 2] - clipped[:, 0], 0, None) * np.clip(
        clipped[:, 3] - clipped[:, 1], 0, None
    )
    r = rects[box_rows].astype(np.float64)  # top, left, height, width
    erased_xyxy = np.stack([r[:, 1], r[:, 0], r[:, 1] + r[:, 3], r[:, 0] + r[:, 2]], axis=1)
    visible = visible - _overlap_area(clipped, erased_xyxy)  # the rectangle lies inside the image
    with np.errstate(divide="ignore", invalid="ignore"):
        fraction = np.where(original_area > 0, visible / np.where(original_area > 0, original_area, 1), 0)
    keep = (original_area > 0) & (fraction >= aug.min_box_visible) & (visible > 0)
    return out, clipped.astype(np.float32), keep


# -------------------------------------------------------------------------------------------------- text


def augment_tokens(
    token_ids: list[list[int]],
    aug: TextAugment,
    *,
    mask_id: int,
    vocab_size: int,
    special_ids: set[int],
    generator: torch.Generator,
) -> list[list[int]]:
    """RDE's token augmentation on unpadded id lists (each starting with BOS and ending with EOS).

    The first and last token of each list and every id in `special_ids` are never picked, so BOS and EOS
    always remain. Output length = input length − deleted tokens. Deterministic for a generator state:
    three draws per token position of the whole batch, whatever the outcomes.
    """
    allowed = np.setdiff1d(np.arange(vocab_size, dtype=np.int64), np.array([*special_ids, mask_id]))
    if len(allowed) == 0:
        raise ValueError("no id left to draw replacements from")
    lengths = np.array([len(t) for t in token_ids], dtype=np.int64)
    n = int(lengths.sum())
    u_pick = torch.rand(n, generator=generator, dtype=torch.float64).numpy()
    u_action = torch.rand(n, generator=generator, dtype=torch.float64).numpy()
    replacement = allowed[torch.randint(0, len(allowed), (n,), generator=generator).numpy()]

    flat = np.fromiter((t for ids in token_ids for t in ids), dtype=np.int64, count=n)
    pickable = ~np.isin(flat, np.fromiter(special_ids, dtype=np.int64, count=len(special_ids)))
    ends = np.cumsum(lengths)
    starts = ends - lengths
    pickable[starts[lengths > 0]] = False  # BOS
    pickable[ends[lengths > 0] - 1] = False  # EOS
    picked = pickable & (u_pick < aug.pick_p)
    to_mask = picked & (u_action < aug.mask)
    to_replace = picked & (u_action >= aug.mask) & (u_action < aug.mask + aug.replace)
    to_delete = picked & ~to_mask & ~to_replace

    new = np.where(to_mask, mask_id, np.where(to_replace, replacement, flat))
    return [new[s:e][~to_delete[s:e]].tolist() for s, e in zip(starts, ends, strict=True)]
