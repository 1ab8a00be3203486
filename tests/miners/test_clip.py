"""Tiny CLIP build/save/load through the real from_pretrained path, and the scorer on it."""

import numpy as np
import pytest
import torch

from miners.clip_scorer import ClipScorer, ScorerConfig, load_clip
from miners.encoders import box_patch_weights
from miners.regions import Regions
from miners.training.tiny_clip import EOS_ID, TinyClipConfig, build_model, build_processor, build_tokenizer


def test_tiny_clip_round_trips_through_from_pretrained(tmp_path):
    cfg = TinyClipConfig(
        vision_layers=1, text_layers=1, vision_width=32, text_width=32, embed_dim=32, heads=2
    )
    tok = build_tokenizer(["a man in a red jacket", "black trousers"], cfg)
    proc = build_processor(tok, cfg)
    build_model(len(tok), cfg).save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    model, processor = load_clip(tmp_path, "cpu")
    ids = processor.tokenizer(["a man in a red jacket", "unknown words"])["input_ids"]
    # Every sequence ends with the EOS id CLIP pools on (never 2: the legacy argmax rule).
    assert all(seq[-1] == EOS_ID for seq in ids) and model.config.text_config.eos_token_id == EOS_ID
    assert processor.tokenizer.unk_token_id in ids[1]
    pix = processor(images=[np.zeros((256, 128, 3), np.uint8)], return_tensors="pt")["pixel_values"]
    assert tuple(pix.shape) == (1, 3, 192, 64)
    out = model.vision_model(pixel_values=pix, interpolate_pos_encoding=True)
    assert out.last_hidden_state.shape[1] == 1 + (192 // 16) * (64 // 16)


def _regions():
    mask = np.zeros((64, 32), bool)
    mask[10:30, 5:25] = True
    return Regions(
        boxes_xyxy=np.array([[0, 0, 32, 20], [5, 10, 25, 30], [0, 40, 32, 64]], np.float32),
        masks=[None, mask, None],
        labels=["head", "upper", "feet"],
        quality=np.array([0.5, 0.9, 0.5], np.float32),
        source="prior",
    )


@pytest.mark.parametrize("mode", ["box", "mask", "blur"])
def test_crops_have_model_input_size(tiny_clip_dir, mode):
    scorer = ClipScorer(tiny_clip_dir, ScorerConfig(crop_mode=mode, crop_padding_frac=0.0))
    image = np.full((64, 32, 3), 200, np.uint8)
    image[10:30, 5:25] = (255, 0, 0)
    crop = scorer.crop(image, np.array([0, 0, 32, 64]), _regions().masks[1])
    assert crop.shape == (3, 192, 64) and crop.dtype == np.uint8
    centre, corner = crop[:, 60, 32], crop[:, 2, 2]  # original pixels (20, 16) and (0, 0)
    assert tuple(centre) == (255, 0, 0)
    if mode == "mask":  # background outside the mask blanked to the processor's mean colour
        assert tuple(corner) == scorer._fill_rgb
    elif mode == "box":
        assert tuple(corner) == (200, 200, 200)
    else:  # blurred background: smoothed towards its neighbours, not blanked
        assert tuple(corner) != scorer._fill_rgb and np.abs(corner.astype(int) - 200).max() <= 60


def test_score_batches_all_crops_in_one_forward_and_dedups_texts(tiny_clip_dir):
    scorer = ClipScorer(tiny_clip_dir)
    calls = []
    hook = scorer.model.vision_model.register_forward_hook(lambda m, i, o: calls.append(1))
    images = [np.random.default_rng(k).integers(0, 255, (64, 32, 3), dtype=np.uint8) for k in range(2)]
    texts = [["red jacket", "black shoes"], ["red jacket"], ["a hat", "red jacket", "black shoes"]]
    out = scorer.score(images, [_regions(), _regions()], texts, [0, 0, 1])
    hook.remove()
    assert len(calls) == 1  # 6 crops of 2 images: one batched vision forward
    assert [o.shape for o in out] == [(2, 3), (1, 3), (3, 3)]
    # Same text, same image → identical scores; same text, other image → its own crops.
    np.testing.assert_allclose(out[0][0], out[1][0], rtol=1e-6)
    assert np.all(np.abs(out[0]) <= 1.0 + 1e-5)
    emb = scorer.embed_texts(["x y", "red jacket", "x y"])
    torch.testing.assert_close(emb[0], emb[2])


def test_box_patch_weights_select_patches_inside():
    w = box_patch_weights(np.array([[0, 0, 32, 32], [0, 0, 1, 1]]), (4, 2), (64, 32))
    assert w.shape == (2, 8)
    np.testing.assert_allclose(w[0], [0.25, 0.25, 0.25, 0.25, 0, 0, 0, 0])
    np.testing.assert_allclose(w[1], [1, 0, 0, 0, 0, 0, 0, 0])  # too small for a centre: nearest patch


def test_missing_model_folder_is_a_clear_error(tmp_path):
    # A folder that is not there says so (before: "not a CLIP model folder (no config.json)" for it too)
    with pytest.raises(FileNotFoundError, match="CLIP model folder .*nope does not exist; build one"):
        load_clip(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="not a CLIP model folder \\(no config.json\\)"):
        load_clip(tmp_path)


def test_fingerprint_ignores_what_we_write_beside_the_model(tiny_clip_dir, tmp_path):
    import shutil

    from miners.clip_scorer import model_fingerprint

    copy = tmp_path / "clip"
    shutil.copytree(tiny_clip_dir, copy)
    before = model_fingerprint(copy)
    (copy / "rsm-calibrator.json").write_text("{}")
    (copy / "bootstrap.json").write_text("{}")
    assert model_fingerprint(copy) == before
    (copy / "config.json").write_text((copy / "config.json").read_text().replace("}", ' , "x": 1}', 1))
    assert model_fingerprint(copy) != before


def test_score_with_nothing_to_score_runs_no_model(tiny_clip_dir):
    scorer = ClipScorer(tiny_clip_dir)
    calls = []
    hooks = [
        scorer.model.vision_model.register_forward_hook(lambda m, i, o: calls.append("vision")),
        scorer.model.text_model.register_forward_hook(lambda m, i, o: calls.append("text")),
    ]
    image = np.full((64, 32, 3), 100, np.uint8)
    dim = scorer.model.config.projection_dim
    assert scorer.score([], [], [], []) == []  # a batch where every image failed
    assert scorer.score([image], [_regions()], [], []) == []  # images, but no sentences
    assert tuple(scorer.embed_texts([]).shape) == (0, dim)
    assert tuple(scorer.embed_crops([]).shape) == (0, dim)
    assert calls == []
    # A sample without texts, next to a real one: a 0 x R matrix; an image without regions: N x 0.
    out = scorer.score(
        [image, image], [_regions(), Regions.empty("prior")], [[], ["red jacket"], ["a hat"]], [0, 0, 1]
    )
    for hook in hooks:
        hook.remove()
    assert [o.shape for o in out] == [(0, 3), (1, 3), (1, 0)]
    assert calls == ["vision", "text"]  # the crops of the first image, the two distinct texts


def test_score_crops_matches_score(tiny_clip_dir):
    scorer = ClipScorer(tiny_clip_dir)
    images = [np.random.default_rng(k).integers(0, 255, (64, 32, 3), dtype=np.uint8) for k in range(2)]
    texts, owners = [["red jacket", "black shoes"], ["a hat"]], [1, 0]
    direct = scorer.score(images, [_regions(), _regions()], texts, owners)
    crops = [scorer.region_crops(image, _regions()) for image in images]
    assert [len(c) for c in crops] == [3, 3]
    for a, b in zip(direct, scorer.score_crops(crops, texts, owners), strict=True):
        np.testing.assert_array_equal(a, b)


def test_texts_embed_alike_alone_in_a_sorted_batch_and_from_the_cache(tiny_clip_dir):
    # encode_texts batches by token count and un-permutes; the cache returns what was computed before
    texts = ["a man", "a woman in a long red coat with a black bag over her left shoulder", "blue jeans"]
    plain = ClipScorer(tiny_clip_dir)
    alone = torch.cat([plain.embed_texts([t]) for t in texts])
    together = plain.embed_texts(texts)
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)

    cached = ClipScorer(tiny_clip_dir, ScorerConfig(text_cache_entries=2))
    forwards = []
    cached.model.text_model.register_forward_hook(lambda m, i, o: forwards.append(i))
    first = cached.embed_texts(texts[:2])
    again = cached.embed_texts(texts[:2][::-1])  # both cached: no forward
    assert len(forwards) == 1
    torch.testing.assert_close(again, first.flip(0), atol=0, rtol=0)
    cached.embed_texts([texts[2]])  # a third text: the least recently used one ("a woman ...") goes
    assert list(cached._text_cache) == ["a man", "blue jeans"]
    torch.testing.assert_close(cached.embed_texts(texts), together, atol=1e-5, rtol=0)
    assert len(forwards) == 3  # only the evicted text ran again
