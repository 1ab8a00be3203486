"""`--method park` (seed 001): stripes, the ranking and CMR losses against hand computations, the shared
coarse tokens and the decoder's padding mask, a few training steps on a fixed batch, and the CLI end to end
(with and without ROGLE's local branch)."""

import json
import math

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from miners.clip_scorer import load_clip
from miners.train_rogle import main as rogle_main
from miners.training.data import build_clip_data
from miners.training.evaluate import main as evaluate_main
from miners.training.methods.park import (
    ParkOptions,
    QueryDecoder,
    cmr_loss,
    cmr_margins,
    ranking_loss,
    stripe_bounds,
    stripe_parts,
)
from miners.training.recipes import RecipeError, resolve_config
from miners.training.trainer import Trainer

# --- stripes -------------------------------------------------------------------------------------------


def test_stripe_bounds_split_the_rows_as_evenly_as_possible():
    assert stripe_bounds(24, 6) == [(0, 4), (4, 8), (8, 12), (12, 16), (16, 20), (20, 24)]
    assert stripe_bounds(24, 5) == [(0, 4), (4, 9), (9, 14), (14, 19), (19, 24)]
    assert stripe_bounds(12, 6) == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10), (10, 12)]
    with pytest.raises(ValueError, match="stripes"):
        stripe_bounds(4, 5)


def test_stripe_parts_pool_the_rows_of_each_stripe():
    # a 4 x 2 grid, row-major: row 0 = [0, 1], row 1 = [2, 3], row 2 = [4, 5], row 3 = [6, 7]
    tokens = torch.arange(8.0).reshape(1, 8, 1)
    assert stripe_parts(tokens, (4, 2), 2, "mean").flatten().tolist() == [1.5, 5.5]
    assert stripe_parts(tokens, (4, 2), 2, "max").flatten().tolist() == [3.0, 7.0]
    # 3 stripes over 4 rows: rows {0}, {1}, {2, 3}
    assert stripe_parts(tokens, (4, 2), 3, "mean").flatten().tolist() == [0.5, 2.5, 5.5]
    with pytest.raises(ValueError, match="grid"):
        stripe_parts(tokens, (3, 2), 2)


# --- the ranking loss ------------------------------------------------------------------------------------


def _one_hot_and_texts(sim: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Images e_0..e_{B-1} and unit texts with cos(image i, text j) = sim[i][j] exactly: text j holds
    column j of `sim`, plus one extra coordinate that completes its norm to 1."""
    s = torch.tensor(sim, dtype=torch.float64)
    b = len(s)
    extra = (1 - (s**2).sum(0)).sqrt()
    texts = torch.cat([s.T, extra[:, None]], 1)
    images = torch.cat([torch.eye(b, dtype=torch.float64), torch.zeros(b, 1, dtype=torch.float64)], 1)
    return images, texts


def test_ranking_loss_hardest_negative_by_hand():
    # S_ij = cos(image i, text j); rows 0 and 1 show the same person (no negatives of each other)
    images, texts = _one_hot_and_texts([[0.6, 0.0, 0.8], [0.8, 0.6, 0.0], [0.0, 0.8, 0.6]])
    pids = torch.tensor([0, 0, 1])
    # margin 0.2, positive S_ii = 0.6 everywhere:
    #   row 0: i2t neg text 2: [0.2 − 0.6 + 0.8] = 0.4;  t2i neg image 2 (S_20 = 0): 0
    #   row 1: i2t neg text 2 (S_12 = 0): 0;             t2i neg image 2 (S_21 = 0.8): 0.4
    #   row 2: i2t negs S_20 = 0, S_21 = 0.8: 0.4;       t2i negs S_02 = 0.8, S_12 = 0: 0.4
    expected = (0.4 + 0.4 + 0.8) / 3
    got = ranking_loss(images, texts, pids, 0.2)
    assert got.item() == pytest.approx(expected, abs=1e-6)
    # all rows one person: no negative anywhere → 0, still a tensor
    assert ranking_loss(images, texts, torch.zeros(3, dtype=torch.long), 0.2).item() == 0.0


def test_ranking_loss_semihard_picks_the_violating_negative_below_the_positive():
    images, texts = _one_hot_and_texts([[0.6, 0.5, 0.7], [0.0, 0.6, 0.0], [0.0, 0.0, 0.6]])
    pids = torch.tensor([0, 1, 2])
    # margin 0.3:
    #   row 0 i2t: S_01 = 0.5 → hinge 0.2, semi-hard (0.5 < 0.6); S_02 = 0.7 → 0.4, harder than the positive
    #   row 1 t2i: S_01 = 0.5 → 0.2 (semi-hard and hardest);  S_21 = 0 → 0
    #   row 2 t2i: S_02 = 0.7 → 0.4, not semi-hard, and nothing else violates: falls back to the hardest
    #   every other direction: no violation → 0
    hardest = ranking_loss(images, texts, pids, 0.3, "hardest")
    assert hardest.item() == pytest.approx((0.4 + 0.2 + 0.4) / 3, abs=1e-6)
    for seed in range(3):  # exactly one semi-hard candidate per anchor: the draw cannot change the answer
        gen = torch.Generator().manual_seed(seed)
        semi = ranking_loss(images, texts, pids, 0.3, "semihard", gen)
        assert semi.item() == pytest.approx((0.2 + 0.2 + 0.4) / 3, abs=1e-6)
    with pytest.raises(ValueError, match="generator"):
        ranking_loss(images, texts, pids, 0.3, "semihard")


# --- CMR ---------------------------------------------------------------------------------------------------


def test_cmr_margin_shrinks_for_a_part_two_identities_share():
    # B = 3 rows, K = 2 parts, image parts in 2-D
    image_parts = torch.tensor(
        [
            [[1.0, 0.0], [1.0, 0.0]],
            [[2.0, 0.0], [0.0, 1.0]],  # part 0 the same direction as row 0's (shared), part 1 orthogonal
            [[0.6, 0.8], [-1.0, 0.0]],  # part 0 at cos 0.6 with row 0's, part 1 opposite
        ]
    )
    text_parts = torch.randn(3, 2, 4)  # unused by the "image" commonality
    m = cmr_margins(image_parts, text_parts, margin=0.2, margin_min=0.05, commonality="image")
    assert m.shape == (2, 3, 3)
    assert m[0, 0, 1].item() == pytest.approx(0.05)  # c = 1: max(0.05, 0.2·0) = the floor
    assert m[1, 0, 1].item() == pytest.approx(0.2)  # c = 0: the full margin
    assert m[0, 0, 2].item() == pytest.approx(0.2 * (1 - 0.6))  # c = 0.6: 0.08
    assert m[1, 0, 2].item() == pytest.approx(0.2)  # cos −1 clipped to c = 0
    assert torch.equal(m, m.transpose(1, 2))
    # the property CMR is for: the part two identities have in common gets the smaller margin
    assert m[0, 0, 1] < m[1, 0, 1]
    assert not m.requires_grad


def test_cmr_margin_commonality_of_text_and_both():
    image_parts = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # image parts orthogonal: c_v = 0
    text_parts = torch.tensor([[[1.0, 0.0]], [[0.8, 0.6]]])  # text parts at cos 0.8: c_t = 0.8
    kw = {"margin": 0.2, "margin_min": 0.01}
    assert cmr_margins(image_parts, text_parts, commonality="image", **kw)[0, 0, 1].item() == pytest.approx(
        0.2
    )
    assert cmr_margins(image_parts, text_parts, commonality="text", **kw)[0, 0, 1].item() == pytest.approx(
        0.2 * 0.2
    )
    # "both": c = (0 + 0.8) / 2 = 0.4 → 0.2 · 0.6
    assert cmr_margins(image_parts, text_parts, commonality="both", **kw)[0, 0, 1].item() == pytest.approx(
        0.12
    )


def test_cmr_loss_by_hand_on_one_part():
    # image parts at cos 0.6 (commonality 0.6 → margin 0.2 · 0.4 = 0.08); S_ij = cos(v_i, t_j):
    # S_00 = 0.8, S_01 = 0, S_10 = 0.6·0.8 + 0.8·0.6 = 0.96, S_11 = 0.8
    image_parts = torch.tensor([[[1.0, 0.0]], [[0.6, 0.8]]])
    text_parts = torch.tensor([[[0.8, 0.6]], [[0.0, 1.0]]])
    pids = torch.tensor([3, 7])
    # row 0: i2t [0.08 − 0.8 + 0]_+ = 0,     t2i [0.08 − 0.8 + S_10]_+ = 0.24
    # row 1: i2t [0.08 − 0.8 + S_10]_+ = 0.24, t2i [0.08 − 0.8 + S_01]_+ = 0
    got = cmr_loss(image_parts, text_parts, pids, margin=0.2, margin_min=0.05)
    assert got.item() == pytest.approx(0.48 / 2, abs=1e-6)
    # with the plain constant margin 0.2 (no commonality) the same pairs cost more: (0.36 + 0.36) / 2
    assert ranking_loss(image_parts[:, 0], text_parts[:, 0], pids, 0.2).item() == pytest.approx(
        0.36, abs=1e-6
    )


def _cmr_reference(image_parts, text_parts, pids, m0, m_min):
    """CMR written out with loops (hardest negative, "image" commonality), margins as Python floats."""
    b, k_parts, _ = image_parts.shape
    total = 0.0
    for k in range(k_parts):
        v = [F.normalize(image_parts[i, k], dim=0) for i in range(b)]
        t = [F.normalize(text_parts[i, k], dim=0) for i in range(b)]
        anchors, part_sum = 0, 0.0
        for i in range(b):
            negs = [j for j in range(b) if int(pids[j]) != int(pids[i])]
            if not negs:
                continue
            anchors += 1
            pos = torch.dot(v[i], t[i])
            i2t, t2i = [], []
            for j in negs:
                common = min(1.0, max(0.0, torch.dot(v[i], v[j]).item()))
                m = max(m_min, m0 * (1 - common))
                i2t.append(torch.clamp(m - pos + torch.dot(v[i], t[j]), min=0))
                t2i.append(torch.clamp(m - pos + torch.dot(v[j], t[i]), min=0))
            best_i2t, best_t2i = torch.stack(i2t).max(), torch.stack(t2i).max()
            part_sum = part_sum + best_i2t + best_t2i
        total = total + part_sum / max(anchors, 1)
    return total / k_parts


def test_cmr_loss_matches_a_loop_reference_in_value_and_gradient():
    gen = torch.Generator().manual_seed(5)
    image_parts = torch.randn(6, 3, 5, generator=gen, dtype=torch.float64)
    text_parts = torch.randn(6, 3, 5, generator=gen, dtype=torch.float64)
    pids = torch.tensor([0, 0, 1, 2, 2, 3])
    a_v, a_t = image_parts.clone().requires_grad_(), text_parts.clone().requires_grad_()
    b_v, b_t = image_parts.clone().requires_grad_(), text_parts.clone().requires_grad_()
    got = cmr_loss(a_v, a_t, pids, margin=0.5, margin_min=0.05)
    want = _cmr_reference(b_v, b_t, pids, 0.5, 0.05)
    assert got.item() == pytest.approx(want.item(), abs=1e-9) and got.item() > 0
    got.backward()
    want.backward()
    # the commonality is a constant (stop-gradient): the gradients are those of fixed margins
    torch.testing.assert_close(a_v.grad, b_v.grad)
    torch.testing.assert_close(a_t.grad, b_t.grad)


def test_park_options_refuse_bad_values():
    with pytest.raises(ValueError, match="stripes"):
        ParkOptions(stripes=0)
    with pytest.raises(ValueError, match="mining"):
        ParkOptions(mining="random")
    with pytest.raises(RecipeError, match="commonality"):
        resolve_config(None, None, {"method": "park", "method_options": {"commonality": "pose"}})


# --- the decoder ---------------------------------------------------------------------------------------


def test_decoder_ignores_padding_and_broadcasts_shared_queries():
    torch.manual_seed(0)
    decoder = QueryDecoder(8, depth=2, heads=2).eval()
    queries = torch.randn(3, 8)
    tokens = torch.randn(2, 4, 8)
    out = decoder(queries, tokens, torch.zeros(2, 4, dtype=torch.bool))
    assert out.shape == (2, 3, 8)
    # the same rows with 3 padding tokens of garbage appended, masked: the same output
    padded = torch.cat([tokens, 100 * torch.randn(2, 3, 8)], 1)
    mask = torch.tensor([[False] * 4 + [True] * 3] * 2)
    torch.testing.assert_close(decoder(queries, padded, mask), out)
    # unmasked, the garbage changes it (the mask is what kept it out)
    assert not torch.allclose(decoder(queries, padded, torch.zeros_like(mask)), out)


# --- training --------------------------------------------------------------------------------------------


def _train_data(tiny_dataset, processor):
    table = pq.read_table(tiny_dataset / "manifest.parquet")
    return build_clip_data(table.filter(pc.equal(table["split"], "train")), processor)


def test_park_trains_on_a_fixed_batch_and_its_heads_are_named_for_the_head_lr(
    tiny_dataset, tiny_clip_dir, tmp_path
):
    model, processor = load_clip(tiny_clip_dir, "cpu")
    flags = {"method": "park", "device": "cpu", "lr": 1e-3, "head_lr_factor": 5.0, "max_grad_norm": 0.0}
    cfg = resolve_config(None, None, flags)[0]
    assert cfg.text_mode == "truncate" and cfg.local == "none"  # the method's defaults
    assert cfg.method_options["stripes"] == 6 and cfg.method_options["cmr_margin_min"] == 0.05
    train = _train_data(tiny_dataset, processor)
    trainer = Trainer(model, processor, cfg, tmp_path)
    trainer.prepare(train, total_steps=40)
    heads = dict(trainer.heads.named_parameters())
    # ONE set of coarse tokens for both modalities; the stripes set the number of text part tokens
    assert heads["cross_queries.coarse"].shape == (4, 64)
    assert heads["cross_queries.text_parts"].shape == (6, 64)
    assert all("cross" in n or "classifier" in n for n in heads if not n.endswith("bias"))
    fast = {id(p) for g in trainer.optimizer.param_groups if g["lr_factor"] == 5.0 for p in g["params"]}
    assert {id(heads[n]) for n in ("cross_queries.coarse", "id_fine.parts.5.classifier.weight")} <= fast

    idx = np.arange(8)
    params, losses, cmr = trainer.trainable_parameters(), [], []
    for step in range(6):
        logs, _ = trainer.train_step(train, idx, params, math.inf, False)
        losses.append(logs["loss"])
        cmr.append(logs["loss_cmr"])
        if step == 0:
            parts = ("global_rank", "global_id", "coarse_rank", "coarse_id", "cmr", "fine_id")
            assert {f"loss_{p}" for p in parts} <= set(logs)
            assert all(math.isfinite(v) for v in logs.values())
            # the shared coarse tokens learn from both modalities' losses
            assert heads["cross_queries.coarse"].grad.abs().sum() > 0
    assert losses[-1] < 0.7 * losses[0] and cmr[-1] < cmr[0], (losses, cmr)


def test_park_refuses_the_sentence_pool_text_mode(tiny_dataset, tiny_clip_dir, tmp_path):
    model, processor = load_clip(tiny_clip_dir, "cpu")
    cfg = resolve_config(None, None, {"method": "park", "device": "cpu", "text_mode": "sentence-pool"})[0]
    trainer = Trainer(model, processor, cfg, tmp_path)
    with pytest.raises(ValueError, match="truncate"):
        trainer.prepare(_train_data(tiny_dataset, processor), total_steps=1)


def test_park_through_the_cli_then_evaluate(tiny_dataset, tiny_clip_dir, tmp_path):
    run = tmp_path / "run"
    argv = ["--method", "park", "--manifest", str(tiny_dataset / "manifest.parquet")]
    argv += ["--init", str(tiny_clip_dir), "--out", str(run), "--epochs", "1", "--batch-size", "8"]
    assert rogle_main([*argv, "--method-option", "stripes=4", "--method-option", "mining=semihard"]) == 0
    saved = json.loads((run / "config.json").read_text())
    assert saved["method"] == "park" and saved["method_options"]["stripes"] == 4
    assert saved["method_options"]["mining"] == "semihard"
    record = json.loads((run / "history.jsonl").read_text().splitlines()[0])
    assert math.isfinite(record["loss_cmr"]) and math.isfinite(record["loss_coarse_rank"])
    load_clip(run / "checkpoint", "cpu")  # a plain CLIP folder: the heads are in heads.pt beside it
    assert (run / "checkpoint" / "heads.pt").is_file()
    assert evaluate_main(["--run", str(run)]) == 0


def test_park_with_the_local_branch_through_the_cli(tiny_run, tmp_path):
    run = tmp_path / "local"
    argv = [
        "--method",
        "park",
        "--pairs",
        str(tiny_run),
        "--local",
        "rsm",
        "--method-option",
        "shared_decoder=false",
    ]
    assert rogle_main([*argv, "--out", str(run), "--epochs", "1", "--batch-size", "8"]) == 0
    record = json.loads((run / "history.jsonl").read_text().splitlines()[0])
    assert math.isfinite(record["loss_local"]) and math.isfinite(record["loss_cmr"])
