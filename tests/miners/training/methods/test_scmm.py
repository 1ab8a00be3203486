"""`--method scmm`: the sew proxy's hinge and compression against hand computations, the density measure
and its margins, the options, a few steps on a fixed tiny batch, and the CLI (manifest alone; mined pairs
with --local rsm)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from miners.clip_scorer import load_clip
from miners.train_rogle import main as rogle_main
from miners.training import evaluate
from miners.training.data import build_clip_data
from miners.training.methods import build_method, method_options
from miners.training.methods.base import Batch
from miners.training.methods.scmm import (
    adaptive_margins,
    caption_density_counts,
    sew_compress,
    sew_hinge,
)
from miners.training.recipes import RecipeError, resolve_config
from miners.training.trainer import Trainer

# Unit vectors with easy cosines: S_ij = cos(text i, image j)
#          image 0 (.8,.6)  image 1 (0,1)  image 2 (1,0)
# text 0 (1,0):      .80        .00          1.00
# text 1 (0,1):      .60       1.00           .00
# text 2 (.6,.8):    .96        .80           .60
TEXT = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
IMAGE = torch.tensor([[0.8, 0.6], [0.0, 1.0], [1.0, 0.0]])
PIDS = torch.tensor([1, 1, 2])
# Unnormalised inputs: the losses normalise (cosines must not depend on these norms)
TEXT_RAW = TEXT * torch.tensor([[2.0], [0.5], [3.0]])
IMAGE_RAW = IMAGE * torch.tensor([[4.0], [1.5], [0.2]])


def test_sew_hinge_by_hand():
    margins = torch.tensor([0.10, 0.25, 0.30])
    # Negatives: rows 0 and 1 (person 1) have only row 2; row 2 (person 2) has rows 0 and 1.
    # text anchors, m_i - S_ii + max_neg S_ij:  row 0: .1 - .8 + 1 = .3;  row 1: .25 - 1 + 0 < 0 → 0;
    #                                           row 2: .3 - .6 + max(.96, .8) = .66
    # image anchors, m_i - S_ii + max_neg S_ji: row 0: .1 - .8 + .96 = .26;  row 1: .25 - 1 + .8 = .05;
    #                                           row 2: .3 - .6 + max(1, 0) = .7
    expected = (0.3 + 0.0 + 0.66 + 0.26 + 0.05 + 0.7) / 3
    got = sew_hinge(TEXT_RAW, IMAGE_RAW, PIDS, margins)
    assert got.item() == pytest.approx(expected, abs=1e-6)
    # A larger margin on a row whose hinge is active raises the loss by exactly the margin's increase x 2
    # (both directions of row 0 are active): the margin is really per caption
    bumped = sew_hinge(TEXT_RAW, IMAGE_RAW, PIDS, torch.tensor([0.20, 0.25, 0.30]))
    assert bumped.item() == pytest.approx(expected + 2 * 0.1 / 3, abs=1e-6)


def test_sew_hinge_is_zero_when_every_negative_is_beaten_by_the_margin():
    feats = torch.eye(3)
    assert sew_hinge(feats, feats, torch.tensor([0, 1, 2]), torch.full((3,), 0.3)).item() == 0.0
    # ... and not with a margin beyond the gap (1 - 0): every row and direction pays m - 1
    m = torch.full((3,), 1.25)
    assert sew_hinge(feats, feats, torch.tensor([0, 1, 2]), m).item() == pytest.approx(2 * 0.25)


def test_sew_compress_by_hand():
    # Same-person ordered pairs with i != j: (0, 1) and (1, 0): (1 - S_01) = 1 - 0, (1 - S_10) = 1 - .6
    assert sew_compress(TEXT_RAW, IMAGE_RAW, PIDS).item() == pytest.approx((1.0 + 0.4) / 2, abs=1e-6)
    # Every person once in the batch: nothing to compress, 0
    assert sew_compress(TEXT, IMAGE, torch.tensor([1, 2, 3])).item() == 0.0


def test_a_batch_of_one_person_has_no_negative_the_hinge_gives_zero_and_finite_gradients():
    text = TEXT_RAW.clone().requires_grad_(True)
    image = IMAGE_RAW.clone().requires_grad_(True)
    pids = torch.tensor([7, 7, 7])
    hinge = sew_hinge(text, image, pids, torch.full((3,), 0.2))
    assert hinge.item() == 0.0 and hinge.requires_grad
    compress = sew_compress(text, image, pids)
    # all 6 off-diagonal pairs: 1 - (0, 1, .6, 0, .96, .8)
    assert compress.item() == pytest.approx(sum(1 - s for s in (0.0, 1.0, 0.6, 0.0, 0.96, 0.8)) / 6, abs=1e-6)
    (hinge + compress).backward()
    assert torch.isfinite(text.grad).all() and torch.isfinite(image.grad).all()
    assert text.grad.abs().sum() > 0  # the compression still pulls them together


def test_content_word_density_by_hand():
    captions = [
        "A man in a red shirt.",  # man, red, shirt (a, in: stop words)
        "The woman wears a white top, blue jeans and black shoes.",  # 8: the, a, and dropped; top kept
        "She is with him.",  # every word a stop word
        "A T-shirt",  # "t" is too short to count: shirt
    ]
    assert caption_density_counts(captions, "content_words", ("top",)).tolist() == [3, 8, 0, 1]
    # without keeping "top" (spaCy lists it as a stop word)
    assert caption_density_counts(captions, "content_words").tolist() == [3, 7, 0, 1]
    assert caption_density_counts(captions, "words").tolist() == [6, 11, 4, 3]
    assert caption_density_counts(captions, "none").tolist() == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="density"):
        caption_density_counts(captions, "length")


def test_a_denser_caption_gets_a_larger_margin():
    captions = ["a man", "a man in a red shirt", "a tall man in a red shirt with black shoes and a bag"]
    margins = adaptive_margins(torch.tensor(caption_density_counts(captions)), 0.1, 0.3)
    # counts 1, 3, 7 → d = 0, 1/3, 1
    torch.testing.assert_close(margins, torch.tensor([0.1, 0.1 + 0.2 / 3, 0.3]))
    assert margins[0] < margins[1] < margins[2]
    # equally dense captions: all at the mid margin; the margins carry no gradient
    counts = torch.tensor([4.0, 4.0], requires_grad=True)
    flat = adaptive_margins(counts, 0.1, 0.3)
    torch.testing.assert_close(flat, torch.tensor([0.2, 0.2]))
    assert not flat.requires_grad


def test_options_are_validated_and_typed_from_the_command_line():
    opts = method_options("scmm", {"mcm_depth": "2", "margin_high": "0.5", "keep_words": '["top"]'})
    assert opts.mcm_depth == 2 and opts.margin_high == 0.5 and opts.keep_words == ("top",)
    for bad in ({"margin_low": "0.4"}, {"density": "length"}, {"mcm_mask_prob": "0"}, {"sew_weight": "-1"}):
        with pytest.raises(ValueError, match="scmm options"):
            method_options("scmm", bad)
    with pytest.raises(RecipeError, match="no option"):
        resolve_config(None, None, {"method": "scmm", "method_options": {"margin": 0.2}})
    cfg = resolve_config(None, None, {"method": "scmm"})[0]
    assert cfg.local == "none" and cfg.text_mode == "truncate" and cfg.method_options["margin_low"] == 0.1


def _train_data(tiny_dataset, processor):
    table = pq.read_table(tiny_dataset / "manifest.parquet")
    return build_clip_data(table.filter(pc.equal(table["split"], "train")), processor)


def _trainer(tiny_dataset, tiny_clip_dir, tmp_path, options: dict, total_steps: int = 1000):
    flags = {"method": "scmm", "device": "cpu", "batch_size": 8, "lr": 1e-3, "epochs": 1}
    cfg = resolve_config(None, None, {**flags, "method_options": options})[0]
    model, proc = load_clip(tiny_clip_dir, "cpu")
    train = _train_data(tiny_dataset, proc)
    trainer = Trainer(model, proc, cfg, tmp_path)
    trainer.prepare(train, total_steps)  # a long schedule: the lr stays near its peak in these steps
    return trainer, train


def _two_captions_of_four_people(train) -> np.ndarray:
    by_pid: dict[int, list[int]] = {}
    for i, p in enumerate(train.cap_pids):
        by_pid.setdefault(int(p), []).append(i)
    idx = np.array([i for rows in list(by_pid.values())[:4] for i in rows[:2]])
    assert len(idx) == 8
    return idx


def test_scmm_trains_on_a_fixed_batch(tiny_dataset, tiny_clip_dir, tmp_path):
    trainer, train = _trainer(tiny_dataset, tiny_clip_dir, tmp_path, {"mcm_depth": 1})
    assert set(trainer.heads) == {"mcm"} and len(trainer.heads["mcm"].cross_modal_transformer.resblocks) == 1
    idx = _two_captions_of_four_people(train)  # both the hinge and the compression have work
    history = []
    for _ in range(12):
        logs, grad_norm = trainer.train_step(train, idx, trainer.trainable_parameters(), 5.0, False)
        assert np.isfinite(grad_norm)
        history.append(logs)
    first, last = history[0], history[-1]
    for key in ("loss_sew", "loss_sew_hinge", "loss_sew_compress", "loss_mcm", "sew_margin_mean"):
        assert key in first, key
    # the total is the sew loss (hinge + 0.1 compress) plus MCM, both weighted 1 by default
    assert first["loss_sew"] == pytest.approx(first["loss_sew_hinge"] + 0.1 * first["loss_sew_compress"])
    assert first["loss"] == pytest.approx(first["loss_sew"] + first["loss_mcm"], rel=1e-5)
    assert 0.1 <= first["sew_margin_mean"] <= 0.3
    # measured: sew 0.507 → 0.427 and MCM 5.37 → 4.88 in these 12 steps (lr 1e-3, the tiny CLIP)
    assert last["loss_sew"] < 0.9 * first["loss_sew"], [h["loss_sew"] for h in history]
    assert last["loss_mcm"] < 0.95 * first["loss_mcm"], [h["loss_mcm"] for h in history]
    assert last["loss"] < 0.95 * first["loss"], [h["loss"] for h in history]


@pytest.mark.parametrize("prob", [1.0, 1e-6])
def test_the_mask_ratio_option_decides_how_many_words_the_decoder_predicts(
    tiny_dataset, tiny_clip_dir, tmp_path, monkeypatch, prob
):
    trainer, train = _trainer(tiny_dataset, tiny_clip_dir, tmp_path, {"mcm_depth": 0, "mcm_mask_prob": prob})
    idx = np.arange(8)
    # Words = caption tokens that are not special (BOS, EOS, pad, unk/mask): the candidates for masking
    words = sum(sum(t not in trainer.special_ids for t in train.cap_tokens[i]) for i in idx)
    masked_counts = []
    real = Batch.encode_text

    def spy(self, ids, mask):  # MCM's only path into the text tower with masked ids
        masked_counts.append(int(((ids == trainer.mask_id) & mask.bool()).sum()))
        return real(self, ids, mask)

    monkeypatch.setattr(Batch, "encode_text", spy)
    trainer.train_step(train, idx, trainer.trainable_parameters(), 5.0, False)
    assert len(masked_counts) == 1
    if prob == 1.0:  # every word selected, 80% of them replaced by the mask id (10% random, 10% kept)
        assert 0.6 * words < masked_counts[0] <= words, (masked_counts, words)
    else:  # (almost) none selected: each caption gets exactly its first word masked
        assert masked_counts[0] == len(idx)


def test_without_mcm_no_decoder_is_built_and_the_loss_is_the_sew_loss(tiny_dataset, tiny_clip_dir, tmp_path):
    flags = {"method": "scmm", "device": "cpu", "batch_size": 8, "method_options": {"mcm_weight": 0.0}}
    cfg = resolve_config(None, None, flags)[0]
    model, proc = load_clip(tiny_clip_dir, "cpu")
    train = _train_data(tiny_dataset, proc)
    trainer = Trainer(model, proc, cfg, tmp_path)
    trainer.prepare(train, total_steps=10)
    assert len(trainer.heads) == 0
    logs, _ = trainer.train_step(train, np.arange(8), trainer.trainable_parameters(), 5.0, False)
    assert "loss_mcm" not in logs and logs["loss"] == pytest.approx(logs["loss_sew"])
    assert build_method("scmm", {"sew_weight": 0.0}).opts.mcm_weight == 1.0


def test_scmm_cli_from_a_manifest_writes_a_loadable_clip_that_evaluates(
    tiny_dataset, tiny_clip_dir, tmp_path
):
    run = tmp_path / "run"
    argv = [
        "--method",
        "scmm",
        "--manifest",
        str(tiny_dataset / "manifest.parquet"),
        "--init",
        str(tiny_clip_dir),
    ]
    argv += ["--out", str(run), "--epochs", "1", "--batch-size", "8", "--method-option", "mcm_depth=1"]
    assert rogle_main(argv) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["method"] == "scmm" and config["method_options"]["mcm_depth"] == 1
    model, _ = load_clip(run / "checkpoint", "cpu")
    assert not any("cross" in name or "mlm_head" in name for name in model.state_dict())  # heads stay out
    heads = torch.load(run / "checkpoint" / "heads.pt", weights_only=False)["heads"]
    assert any(k.startswith("mcm.cross_attn") for k in heads) and "mcm.mlm_head.fc.weight" in heads
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert "loss_sew" in history[0] and "loss_mcm" in history[0] and "loss_local" not in history[0]
    assert evaluate.main(["--run", str(run)]) == 0


def test_scmm_cli_with_mined_pairs_adds_the_local_branch(tiny_run, tmp_path):
    run = tmp_path / "run"
    argv = ["--method", "scmm", "--pairs", str(tiny_run), "--local", "rsm", "--out", str(run)]
    argv += ["--epochs", "1", "--batch-size", "8", "--reliability-threshold", "0.0"]
    argv += ["--method-option", "mcm_depth=1"]
    assert rogle_main(argv) == 0
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert "loss_local" in history[0] and "loss_sew" in history[0]
