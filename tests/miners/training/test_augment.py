"""Tests for miners/training/augment.py: boxes follow the pixels, erasing, determinism, statistics, text."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from miners.training.augment import (
    IMAGE_AUGMENTS,
    ImageAugment,
    TextAugment,
    augment_batch,
    augment_tokens,
)

H, W = 48, 32  # small images; every coordinate fits in a uint8 channel
FILL = (7, 200, 99)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _coordinate_images(b: int) -> torch.Tensor:
    """Channel 0 = y + 1, channel 1 = x + 1 (0 is left for the black padding), channel 2 = 50 + image."""
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    one = torch.stack([yy + 1, xx + 1, torch.zeros_like(yy)]).to(torch.uint8)
    imgs = one[None].repeat(b, 1, 1, 1)
    imgs[:, 2] = (50 + torch.arange(b) % 100).to(torch.uint8)[:, None, None]
    return imgs


def _infer_geometry(out_img: torch.Tensor, pad: int) -> tuple[bool, int, int]:
    """(flipped, offset_y, offset_x) read from a coordinate image's centre pixels."""
    cy, cx = H // 2, W // 2
    src_y = int(out_img[0, cy, cx]) - 1
    src_x, src_x_right = int(out_img[1, cy, cx]) - 1, int(out_img[1, cy, cx + 1]) - 1
    flipped = src_x_right < src_x
    oy = src_y - cy + pad
    # flipped: src_x = W - 1 - (x + ox - pad)
    ox = (W - 1 - src_x) - cx + pad if flipped else src_x - cx + pad
    return flipped, oy, ox


def _expected_image(src: torch.Tensor, flipped: bool, oy: int, ox: int, pad: int) -> torch.Tensor:
    """Hand reference: flip, zero-pad, crop — by explicit per-pixel indexing."""
    s = src.flip(-1) if flipped else src
    padded = torch.zeros(3, H + 2 * pad, W + 2 * pad, dtype=torch.uint8)
    padded[:, pad : pad + H, pad : pad + W] = s
    return padded[:, oy : oy + H, ox : ox + W]


# ------------------------------------------------------------------------------- the box follows the person


@pytest.mark.parametrize("flip_p", [0.0, 1.0])
def test_flipped_and_cropped_box_covers_the_same_person_pixels(flip_p):
    rng = np.random.default_rng(0)
    img = torch.full((1, 3, H, W), 90, dtype=torch.uint8)
    # A non-symmetric person: noise texture in a box off the centre line, near the left border so the
    # crop cuts it for some offsets.
    x0, y0, x1, y1 = 3, 6, 17, 30
    person = torch.from_numpy(rng.integers(1, 255, size=(3, y1 - y0, x1 - x0), dtype=np.uint8))
    img[0, :, y0:y1, x0:x1] = person
    aug = ImageAugment(flip_p=flip_p, erase_p=0.0, min_box_visible=0.0)
    seen_cut = 0
    for seed in range(60):
        out, boxes, keep = augment_batch(
            img, np.array([0]), np.array([[x0, y0, x1, y1]], float), aug, _gen(seed), FILL
        )
        assert keep[0]
        bx0, by0, bx1, by1 = (int(round(v)) for v in boxes[0])
        assert np.allclose(boxes[0], [bx0, by0, bx1, by1])  # integer shifts keep integer boxes
        expected = person.flip(-1) if flip_p == 1.0 else person
        vis_h, vis_w = by1 - by0, bx1 - bx0
        assert 0 < vis_h <= y1 - y0 and 0 < vis_w <= x1 - x0
        # The crop cut the part of the (transformed) patch beyond the border it touches.
        rows = slice(0, vis_h) if by0 > 0 or vis_h == y1 - y0 else slice(y1 - y0 - vis_h, None)
        cols = slice(0, vis_w) if bx0 > 0 or vis_w == x1 - x0 else slice(x1 - x0 - vis_w, None)
        seen_cut += vis_w < x1 - x0
        assert torch.equal(out[0, :, by0:by1, bx0:bx1], expected[:, rows, cols]), seed
    if flip_p == 0.0:
        assert seen_cut > 0  # the clipping branch was exercised (the patch sits 3 px from the left edge)


def test_box_in_the_outer_strip_is_dropped_for_some_seed_and_kept_boxes_are_proper():
    img = _coordinate_images(1)
    strip = np.array([[0, 20, 6, 30], [W - 6, 5, W, 15], [10, 0, 20, 4]], float)  # inside the 10 px strip
    aug = ImageAugment(erase_p=0.0)
    dropped = np.zeros(3, bool)
    for seed in range(100):
        _, boxes, keep = augment_batch(img, np.zeros(3, int), strip, aug, _gen(seed), FILL)
        dropped |= ~keep
        assert np.all(boxes[keep, 0] < boxes[keep, 2]) and np.all(boxes[keep, 1] < boxes[keep, 3])
        assert boxes.min() >= 0 and np.all(boxes[:, [0, 2]] <= W) and np.all(boxes[:, [1, 3]] <= H)
    assert dropped.all()


def test_pixels_and_boxes_match_a_hand_reference_of_flip_pad_crop():
    pad = 10
    imgs = _coordinate_images(16)
    before = imgs.clone()
    boxes_in = np.array([[2, 3, 12, 20], [5, 30, 30, 47], [0, 0, W, H], [14, 10, 18, 14]], float)
    rows = np.array([0, 3, 7, 15])
    aug = ImageAugment(erase_p=0.0, pad_px=pad, min_box_visible=0.6)
    for seed in range(5):
        out, boxes, keep = augment_batch(imgs, rows, boxes_in, aug, _gen(seed), FILL)
        assert torch.equal(imgs, before)  # not modified in place
        geo = [_infer_geometry(out[i], pad) for i in range(len(imgs))]
        for i, (flipped, oy, ox) in enumerate(geo):
            assert 0 <= oy <= 2 * pad and 0 <= ox <= 2 * pad
            assert torch.equal(out[i], _expected_image(imgs[i], flipped, oy, ox, pad))
        for r, (row, box) in enumerate(zip(rows, boxes_in, strict=True)):
            flipped, oy, ox = geo[row]
            bx0, by0, bx1, by1 = box
            if flipped:
                bx0, bx1 = W - bx1, W - bx0
            exp = np.array([bx0 + pad - ox, by0 + pad - oy, bx1 + pad - ox, by1 + pad - oy])
            exp = np.clip(exp, 0, [W, H, W, H])
            np.testing.assert_allclose(boxes[r], exp)
            frac = (exp[2] - exp[0]) * (exp[3] - exp[1]) / ((box[2] - box[0]) * (box[3] - box[1]))
            assert keep[r] == (frac >= 0.6)


# ---------------------------------------------------------------------------------------------- erasing


def _erased_rect(out_img: torch.Tensor, src_img: torch.Tensor) -> tuple[int, int, int, int] | None:
    changed = (out_img != src_img).any(0)
    if not changed.any():
        return None
    ys, xs = torch.nonzero(changed, as_tuple=True)
    top, left, bottom, right = int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1
    return top, left, bottom - top, right - left


def test_erased_pixels_are_fill_and_follow_torchvision_sampling_rule():
    imgs = _coordinate_images(64)
    aug = ImageAugment(flip_p=0.0, pad_px=0, erase_p=1.0)
    n_erased = 0
    for seed in range(4):
        out, _, _ = augment_batch(imgs, np.zeros(0, int), np.zeros((0, 4)), aug, _gen(seed), FILL)
        for i in range(len(imgs)):
            rect = _erased_rect(out[i], imgs[i])
            if rect is None:
                continue
            n_erased += 1
            top, left, eh, ew = rect
            region = out[i, :, top : top + eh, left : left + ew]
            assert torch.equal(region, torch.tensor(FILL, dtype=torch.uint8)[:, None, None].expand_as(region))
            assert eh < H and ew < W  # torchvision: strictly inside
            # Rounded sqrt(area·r), sqrt(area/r): area and ratio within the ranges up to rounding.
            assert 0.02 * H * W * 0.5 <= eh * ew <= 0.4 * H * W * 1.5
            assert 0.3 / 2 <= eh / ew <= 3.3 * 2
    assert n_erased >= 0.9 * 4 * 64  # ten attempts almost always find a fitting rectangle


def test_erasing_box_visibility_against_hand_computation():
    img = _coordinate_images(1)
    aug = ImageAugment(flip_p=0.0, pad_px=0, erase_p=1.0, min_box_visible=0.5)
    none = (np.zeros(0, int), np.zeros((0, 4)))
    checked = 0
    for seed in range(40):
        out, _, _ = augment_batch(img, *none, aug, _gen(seed), FILL)
        rect = _erased_rect(out[0], img[0])
        if rect is None or rect[2] < 4 or rect[3] < 4:
            continue
        top, left, eh, ew = rect
        inside = [left + 1, top + 1, left + ew - 1, top + eh - 1]
        # Half of this box's area (its left or top half) is under the rectangle.
        straddle = (
            [left - ew, top, left + ew, top + eh] if left >= ew else [left, top - eh, left + ew, top + eh]
        )
        if min(straddle) < 0 or straddle[3] > H:
            continue
        boxes = np.array([inside, straddle], float)
        # The same seed gives the same rectangle: the boxes do not change the random stream.
        out2, got, keep = augment_batch(img, np.zeros(2, int), boxes, aug, _gen(seed), FILL)
        assert torch.equal(out2, out)
        np.testing.assert_allclose(got, boxes)
        assert not keep[0]  # fully erased
        assert keep[1]  # exactly half visible: 0.5 >= 0.5
        _, _, keep_strict = augment_batch(
            img, np.zeros(2, int), boxes, ImageAugment(0.0, 0, 1.0, min_box_visible=0.51), _gen(seed), FILL
        )
        assert not keep_strict[1]
        checked += 1
    assert checked >= 5


def test_no_erasing_when_erase_p_is_zero_and_erase_rate_follows_erase_p():
    pad = 10
    imgs = _coordinate_images(128)
    out, _, _ = augment_batch(
        imgs, np.zeros(0, int), np.zeros((0, 4)), ImageAugment(erase_p=0.0), _gen(3), FILL
    )
    for i in range(len(imgs)):
        assert torch.equal(out[i], _expected_image(imgs[i], *_infer_geometry(out[i], pad), pad))
    aug = ImageAugment(flip_p=0.0, pad_px=0, erase_p=0.5)
    erased = 0
    for seed in range(8):
        out, _, _ = augment_batch(imgs, np.zeros(0, int), np.zeros((0, 4)), aug, _gen(seed), FILL)
        erased += sum(_erased_rect(out[i], imgs[i]) is not None for i in range(len(imgs)))
    assert abs(erased / (8 * 128) - 0.5) < 0.06


# ----------------------------------------------------------------------------------- determinism, statistics


def test_same_seed_same_output_different_seed_different():
    imgs = _coordinate_images(8)
    rows, boxes = np.arange(8), np.tile([[4.0, 4.0, 20.0, 40.0]], (8, 1))
    aug = ImageAugment()
    a = augment_batch(imgs, rows, boxes, aug, _gen(11), FILL)
    b = augment_batch(imgs, rows, boxes, aug, _gen(11), FILL)
    c = augment_batch(imgs, rows, boxes, aug, _gen(12), FILL)
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and np.array_equal(a[2], b[2])
    assert not torch.equal(a[0], c[0]) and not np.array_equal(a[1], c[1])


def test_flip_rate_and_crop_offsets_cover_the_full_range():
    pad = 10
    imgs = _coordinate_images(128)
    flips, oys, oxs = [], [], []
    for seed in range(8):
        out, _, _ = augment_batch(
            imgs, np.zeros(0, int), np.zeros((0, 4)), ImageAugment(erase_p=0.0), _gen(seed), FILL
        )
        for i in range(len(imgs)):
            f, oy, ox = _infer_geometry(out[i], pad)
            flips.append(f)
            oys.append(oy)
            oxs.append(ox)
    assert abs(np.mean(flips) - 0.5) < 0.05  # 1024 images: sd ≈ 0.016
    assert set(oys) == set(range(2 * pad + 1)) and set(oxs) == set(range(2 * pad + 1))
    out, _, _ = augment_batch(
        imgs, np.zeros(0, int), np.zeros((0, 4)), ImageAugment(flip_p=0.2, erase_p=0.0), _gen(0), FILL
    )
    rate = np.mean([_infer_geometry(out[i], pad)[0] for i in range(len(imgs))])
    assert abs(rate - 0.2) < 0.1


def test_presets_and_none_is_identity():
    assert IMAGE_AUGMENTS["none"] is None and IMAGE_AUGMENTS["irra"] == ImageAugment.irra() == ImageAugment()
    imgs = _coordinate_images(4)
    boxes = np.array([[-3.0, 2.0, 10.0, 60.0]])
    out, got, keep = augment_batch(imgs, np.array([1]), boxes, ImageAugment.none(), _gen(0), FILL)
    assert torch.equal(out, imgs)
    np.testing.assert_allclose(got, [[0, 2, 10, H]])  # clipped to the image
    assert keep[0]
    empty = augment_batch(imgs[:0], np.zeros(0, int), np.zeros((0, 4)), ImageAugment(), _gen(0), FILL)
    assert empty[0].shape == (0, 3, H, W) and empty[1].shape == (0, 4) and empty[2].shape == (0,)
    with pytest.raises(ValueError):
        ImageAugment(flip_p=1.5)
    with pytest.raises(ValueError):
        augment_batch(imgs, np.array([4]), boxes, ImageAugment(), _gen(0), FILL)


# ------------------------------------------------------------------------------------------------- text

BOS, EOS, PAD, MASK = 49406, 49407, 0, 49405
SPECIAL = {BOS, EOS, PAD}


def _aug_text(tokens, seed, aug=None, vocab_size=49408, mask_id=MASK, special=SPECIAL):
    return augment_tokens(
        tokens,
        aug or TextAugment(),
        mask_id=mask_id,
        vocab_size=vocab_size,
        special_ids=special,
        generator=_gen(seed),
    )


def test_text_rates_match_rde_on_a_large_sample():
    real = 5  # every real token is 5: a masked one reads MASK, a replaced one anything else (p≈1e-5 of 5)
    n_caps, n_real = 2000, 28
    tokens = [[BOS] + [real] * n_real + [EOS] for _ in range(n_caps)]
    out = _aug_text(tokens, 0, vocab_size=100_000)
    deleted = masked = replaced = 0
    for t in out:
        assert t[0] == BOS and t[-1] == EOS
        deleted += n_real + 2 - len(t)
        masked += sum(v == MASK for v in t[1:-1])
        replaced += sum(v not in (real, MASK) for v in t[1:-1])
    total = n_caps * n_real
    picked = deleted + masked + replaced
    assert abs(picked / total - 0.2) < 0.01  # sd ≈ 0.0017
    assert abs(masked / picked - 0.6) < 0.025
    assert abs(replaced / picked - 0.2) < 0.02
    assert abs(deleted / picked - 0.2) < 0.02


def test_text_special_tokens_never_picked_and_replacements_avoid_them():
    tokens = [[BOS, 3, PAD, 4, 5, EOS], [BOS, EOS], [BOS], []]
    everything = TextAugment(pick_p=1.0, mask=0.0, replace=0.0, delete=1.0)
    assert _aug_text(tokens, 0, everything) == [[BOS, PAD, EOS], [BOS, EOS], [BOS], []]
    masks = TextAugment(pick_p=1.0, mask=1.0, replace=0.0, delete=0.0)
    assert _aug_text(tokens, 0, masks) == [[BOS, MASK, PAD, MASK, MASK, EOS], [BOS, EOS], [BOS], []]
    assert _aug_text(tokens, 0, TextAugment(pick_p=0.0)) == tokens
    assert _aug_text([], 0) == []
    # The first and last positions are never picked even when their ids are not declared special.
    assert _aug_text([[1, 2, 3, 4]], 0, everything, special=set()) == [[1, 4]]
    assert _aug_text([[1, 2, 3, 4]], 0, masks, special=set()) == [[1, MASK, MASK, 4]]
    # Replacements: uniform over [0, vocab) minus special ids and the mask id.
    replace = TextAugment(pick_p=1.0, mask=0.0, replace=1.0, delete=0.0)
    small = [[8] + [3] * 500 + [9]]
    out = _aug_text(small, 1, replace, vocab_size=10, mask_id=7, special={0, 8, 9})[0]
    assert out[0] == 8 and out[-1] == 9 and len(out) == 502
    values, counts = np.unique(out[1:-1], return_counts=True)
    assert values.tolist() == [1, 2, 3, 4, 5, 6]
    assert counts.min() > 50


def test_text_is_deterministic_and_lengths_drop_by_the_deleted():
    rng = np.random.default_rng(0)
    tokens = [[BOS, *rng.integers(1, 40000, size=int(n)).tolist(), EOS] for n in rng.integers(0, 30, 200)]
    a, b, c = _aug_text(tokens, 5), _aug_text(tokens, 5), _aug_text(tokens, 6)
    assert a == b and a != c
    delete_only = TextAugment(pick_p=0.3, mask=0.0, replace=0.0, delete=1.0)
    out = _aug_text(tokens, 2, delete_only)
    for src, got in zip(tokens, out, strict=True):
        # Without mask/replace the output is the input with some interior tokens removed, in order.
        it = iter(src)
        assert all(any(v == s for s in it) for v in got)
        assert got[0] == BOS and got[-1] == EOS and len(got) <= len(src)
    assert sum(len(s) - len(g) for s, g in zip(tokens, out, strict=True)) > 0
