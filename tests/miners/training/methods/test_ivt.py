"""`--method ivt`: MLA's one loss over the stacked levels, the level candidates, BMM's token dropping through
the HF CLIP towers, the single shared network (tie, train, save, load), training on a fixed batch, the CLI."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from miners.clip_scorer import load_clip
from miners.encoders import text_token_features, tokenize
from miners.train_rogle import main as rogle_main
from miners.training.data import build_clip_data
from miners.training.evaluate import main as evaluate_main
from miners.training.methods import build_method
from miners.training.methods.ivt import (
    IvtMethod,
    LevelCandidates,
    bmm_keep_positions,
    bmm_text_keep,
    ivt_phrase_candidates,
    ivt_word_candidates,
    mla_loss,
    pooled_positions,
    shared_network_problem,
    shared_pairs,
    text_forward,
    tie_towers,
    towers_tied,
    vision_forward,
)
from miners.training.recipes import resolve_config
from miners.training.tiny_clip import TinyClipConfig, build_model
from miners.training.trainer import Trainer

SMALL = TinyClipConfig(
    image_height_px=64, image_width_px=32, vision_layers=2, text_layers=2, vision_width=32, text_width=32,
    heads=2, embed_dim=16,
)  # fmt: skip


def _small_model(cfg: TinyClipConfig = SMALL, vocab: int = 40):
    return build_model(vocab, cfg, seed=3).eval()


# --- (a) the loss against a hand computation ----------------------------------------------------------------
def _kl_rows(logits: list[list[float]], pids: list[int]) -> float:
    """mean_i Σ_j p_ij (log p_ij − log(q_ij + 1e-8)), p = softmax of each row, q = uniform over same pid."""
    total = 0.0
    for i, row in enumerate(logits):
        z = sum(math.exp(x) for x in row)
        n_pos = sum(1 for p in pids if p == pids[i])
        for j, x in enumerate(row):
            p = math.exp(x) / z
            q = (1.0 / n_pos) if pids[j] == pids[i] else 0.0
            total += p * (math.log(p) - math.log(q + 1e-8))
    return total / len(logits)


def test_mla_cmpm_is_one_loss_over_all_levels_by_hand():
    # B = 2 captions (persons 7 and 9) x 3 levels = 6 rows; 2-d features written out
    text = [[1.0, 0.0], [0.0, 2.0], [0.6, 0.8], [0.0, 1.0], [3.0, 4.0], [-1.0, 1.0]]
    image = [[2.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.5, 0.0], [1.0, 0.0], [0.0, -3.0]]
    pids = [7, 9, 7, 9, 7, 9]

    def unit(v):
        n = math.hypot(*v)
        return [x / n for x in v]

    def dot(a, b):
        return a[0] * b[0] + a[1] * b[1]

    # CMPM: the unnormalised image on the normalised texts, and the text on the normalised images, summed
    i2t = [[dot(v, unit(t)) for t in text] for v in image]
    t2i = [[dot(t, unit(v)) for v in image] for t in text]
    expected = _kl_rows(i2t, pids) + _kl_rows(t2i, pids)
    got = mla_loss(torch.tensor(text), torch.tensor(image), torch.tensor(pids), 50.0, "cmpm")
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # one loss over the 3B rows is not the mean of per-level losses: cross-level rows are positives too
    per_level = [
        mla_loss(torch.tensor(text[k::3]), torch.tensor(image[k::3]), torch.tensor(pids[k::3]), 50.0, "cmpm")
        for k in range(3)
    ]
    assert abs(got.item() - sum(x.item() for x in per_level) / 3) > 1e-3


def test_mla_sdm_uses_the_runs_temperature_and_infonce_the_logit_scale():
    t, v = (
        torch.tensor([[1.0, 0.2], [0.1, 1.0], [1.0, 0.0]]),
        torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1]]),
    )
    pids = torch.tensor([1, 2, 1])
    cos = [[float(a @ b / a.norm() / b.norm()) for b in t] for a in v]  # image i vs text j
    tau = 0.5
    expected = _kl_rows([[c / tau for c in row] for row in cos], pids.tolist()) + _kl_rows(
        [[cos[i][j] / tau for i in range(3)] for j in range(3)], pids.tolist()
    )
    assert mla_loss(t, v, pids, 99.0, "sdm", sdm_temperature=tau).item() == pytest.approx(expected, rel=1e-5)
    a = mla_loss(t, v, pids, 5.0, "identity-infonce")
    assert a.item() != pytest.approx(mla_loss(t, v, pids, 20.0, "identity-infonce").item())


# --- (a) the levels ------------------------------------------------------------------------------------------
def test_ivt_phrase_and_word_rules():
    cap = "a man in a red shirt, black pants and white shoes. he carries a bag."
    # sentence 1: the longest comma chunk and the rest; sentence 2: one chunk, its empty rest dropped
    assert ivt_phrase_candidates(cap) == [
        "black pants and white shoes",
        "a man in a red shirt",
        "he carries a bag",
    ]
    # equal lengths: the first is the longest; chunks of <= 5 characters are dropped
    assert ivt_phrase_candidates("[abcdefg,hijklmn,op]") == ["abcdefg", "hijklmn,op"]
    assert ivt_phrase_candidates("a, b. c") == []
    assert ivt_word_candidates("a man, in red. he has a bag") == ["in red", "he has a bag"]
    assert ivt_word_candidates("tiny") == []


def _fake_data(captions, processor):
    from miners.captions import CaptionSplitter

    units = CaptionSplitter(split_clauses=False).split_many(captions)
    texts = [[u.text for u in us] or [c] for us, c in zip(units, captions, strict=True)]
    return SimpleNamespace(
        captions=captions,
        cap_tokens=tokenize(processor, captions),
        cap_sentence_tokens=[tokenize(processor, ts) for ts in texts],
        cap_n_sentences=np.asarray([len(us) for us in units]),
    )


def test_level_candidates_from_the_splitter_with_ivt_fallbacks(tiny_clip_dir):
    _, processor = load_clip(tiny_clip_dir, "cpu")
    captions = [
        "She wears a red shirt and black trousers. She carries a bag.",
        "...",  # nothing the splitter keeps: IVT's rules find nothing either, the whole caption is used
    ]
    data = _fake_data(captions, processor)
    levels = LevelCandidates.build(data, processor, "splitter")
    tok = processor.tokenizer

    def words(ids):
        return " ".join(t for t in tok.convert_ids_to_tokens(ids) if t not in tok.all_special_tokens)

    decode = [words(ids) for ids in levels.word[0]]
    assert decode == [
        "she wears a red shirt",
        "black trousers",
        "she carries a bag",
    ]  # words of the vocabulary
    assert levels.phrase[0] == data.cap_sentence_tokens[0]  # the two sentences, tokenised once by the data
    assert levels.word[1] == levels.phrase[1] == [tokenize(processor, ["..."])[0]]
    ivt = LevelCandidates.build(data, processor, "ivt-rule")
    want = ["she wears a red shirt and black trousers", "she carries a bag"]
    assert [words(ids) for ids in ivt.phrase[0]] == want
    assert [words(ids) for ids in ivt.word[0]] == want
    # draws: one candidate per caption, uniform, reproducible from the generator
    idx = np.zeros(3000, dtype=np.int64)
    drawn = levels.draw(idx, "word", torch.Generator().manual_seed(1))
    counts = [sum(d == c for d in drawn) for c in levels.word[0]]
    assert sum(counts) == 3000 and min(counts) > 900
    assert drawn == levels.draw(idx, "word", torch.Generator().manual_seed(1))


# --- (a) BMM --------------------------------------------------------------------------------------------------
def test_bmm_keep_positions_draws_ivts_rule():
    n_tokens, ratio = 11, 0.2  # at most floor(2.2) = 2 dropped, never position 0
    gen = torch.Generator().manual_seed(0)
    dropped_counts = set()
    for _ in range(300):
        keep = bmm_keep_positions(n_tokens, ratio, gen)
        assert keep[0] == 0 and torch.equal(keep, keep.sort().values) and len(set(keep.tolist())) == len(keep)
        assert set(keep.tolist()) <= set(range(n_tokens))
        dropped_counts.add(n_tokens - len(keep))
    assert dropped_counts == {0, 1, 2}
    assert torch.equal(bmm_keep_positions(n_tokens, 0.0, gen), torch.arange(n_tokens))
    assert torch.equal(
        bmm_keep_positions(50, 0.2, torch.Generator().manual_seed(4)),
        bmm_keep_positions(50, 0.2, torch.Generator().manual_seed(4)),
    )


def test_vision_forward_equals_hf_and_dropping_changes_it():
    model = _small_model()
    pix = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        hidden_hf = model.vision_model(pixel_values=pix, interpolate_pos_encoding=True).last_hidden_state
        image_hf = model.visual_projection(model.vision_model.post_layernorm(hidden_hf[:, 0]))
        image, tokens, hidden = vision_forward(model, pix, None)
        n_tokens = hidden_hf.shape[1]  # 1 + (64/16)*(32/16) = 9
        image_all, _, _ = vision_forward(model, pix, bmm_keep_positions(n_tokens, 0.0, torch.Generator()))
        keep = torch.tensor([0, 1, 2, 5, 8])
        image_drop, tokens_drop, hidden_drop = vision_forward(model, pix, keep)
    torch.testing.assert_close(hidden, hidden_hf, atol=1e-5, rtol=0)
    torch.testing.assert_close(image, image_hf, atol=1e-5, rtol=0)
    torch.testing.assert_close(image_all, image_hf, atol=1e-5, rtol=0)
    assert (
        tokens.shape == (2, n_tokens, 16)
        and tokens_drop.shape == (2, 5, 16)
        and hidden_drop.shape == (2, 5, 32)
    )
    assert image_drop.shape == image.shape and (image_drop - image).abs().max() > 1e-3


def test_text_dropping_equals_removing_the_tokens_and_keeps_eos():
    model = _small_model()
    eos = model.text_model.eos_token_id  # 3 (the tiny vocabulary's)
    ids = torch.tensor([[2, 10, 11, 12, 13, eos, 0], [2, 20, eos, 0, 0, 0, 0]])
    mask = (ids != 0).long()
    assert pooled_positions(model.text_model, ids).tolist() == [5, 2]
    with torch.no_grad():
        full = text_forward(model, ids, mask)
        torch.testing.assert_close(full, text_token_features(model, ids, mask)[1], atol=1e-5, rtol=0)
        # drop positions 2 and 4 of row 0: its pooled feature is that of the sequence without them, the kept
        # tokens at their original positions
        keep = torch.ones_like(ids)
        keep[0, [2, 4]] = 0
        dropped = text_forward(model, ids, mask * keep)
        short = torch.tensor([[2, 10, 12, eos]])
        ref = model.text_projection(
            model.text_model(
                input_ids=short,
                attention_mask=torch.ones_like(short),
                position_ids=torch.tensor([[0, 1, 3, 5]]),
            ).pooler_output
        )
    torch.testing.assert_close(dropped[0], ref[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(dropped[1], full[1], atol=1e-5, rtol=0)  # row 1 lost nothing
    assert (dropped[0] - full[0]).abs().max() > 1e-3
    # the keep mask: the batch's positions, except each row's EOS; SOT always kept
    gen = torch.Generator().manual_seed(0)
    seen_drop_of_col2 = False
    for _ in range(200):
        k = bmm_text_keep(ids, mask, model.text_model, 0.5, gen)
        assert k.shape == ids.shape and k[:, 0].tolist() == [1, 1] and k[0, 5] == 1 and k[1, 2] == 1
        assert torch.equal(k[0, [1, 3, 4, 6]], k[1, [1, 3, 4, 6]])  # same positions for the whole batch
        assert (ids.shape[1] - k[0].sum()) <= 3  # at most floor(0.5 * 7) = 3 dropped
        seen_drop_of_col2 |= bool(k[0, 2] == 0)
    assert seen_drop_of_col2  # row 0's token at position 2 can be dropped, row 1's EOS there never
    assert torch.equal(bmm_text_keep(ids, mask, model.text_model, 0.0, gen), torch.ones_like(ids))


# --- (a) the shared network -------------------------------------------------------------------------------------
def test_shared_network_ties_trains_and_survives_save_and_load(tmp_path):
    from transformers import CLIPModel

    model = _small_model()
    tie_towers(model)
    tie_towers(model)  # idempotent
    assert towers_tied(model)
    layer = model.text_model.encoder.layers[1]
    assert layer.self_attn.q_proj.weight is model.vision_model.encoder.layers[1].self_attn.q_proj.weight
    assert model.text_model.final_layer_norm.weight is model.vision_model.post_layernorm.weight
    assert (
        layer.mlp.fc1.weight is not model.vision_model.encoder.layers[1].mlp.fc1.weight
    )  # MLPs per modality
    # one step of both modalities moves the one shared tensor; the text MLP stays its own
    ids = torch.tensor([[2, 10, 11, 3]])
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    before = layer.self_attn.q_proj.weight.detach().clone()
    (
        text_forward(model, ids, torch.ones_like(ids)).sum()
        + vision_forward(model, torch.randn(1, 3, 64, 32))[0].sum()
    ).backward()
    opt.step()
    assert not torch.equal(before, layer.self_attn.q_proj.weight) and towers_tied(model)
    # save: a plain CLIP folder with both towers complete; reload: equal weights and outputs
    model.save_pretrained(tmp_path)
    loaded = CLIPModel.from_pretrained(tmp_path).eval()
    saved, back = model.state_dict(), loaded.state_dict()
    assert saved.keys() == back.keys() and all(torch.equal(saved[k], back[k]) for k in saved)
    for text_name, vision_name in shared_pairs(loaded):
        assert torch.equal(back[text_name], back[vision_name])
    with torch.no_grad():
        torch.testing.assert_close(
            text_forward(loaded, ids, torch.ones_like(ids)), text_forward(model, ids, torch.ones_like(ids))
        )
    assert shared_network_problem(loaded) is None  # a resumed shared run ties again


def test_shared_network_refuses_towers_it_cannot_tie():
    wide = _small_model(TinyClipConfig(image_height_px=64, image_width_px=32, vision_width=64, text_width=32, heads=2,
                                       vision_layers=1, text_layers=1, embed_dim=16))  # fmt: skip
    with pytest.raises(ValueError, match="hidden_size"):
        tie_towers(wide)
    pretrained_like = _small_model()
    del pretrained_like.config.tiny_clip  # not built from scratch, towers trained apart
    with pytest.raises(ValueError, match="not built from scratch"):
        tie_towers(pretrained_like)
    assert not towers_tied(pretrained_like)


# --- (b) training on a fixed batch ---------------------------------------------------------------------------------
def _train_data(tiny_dataset, processor):
    table = pq.read_table(tiny_dataset / "manifest.parquet")
    return build_clip_data(table.filter(pc.equal(table["split"], "train")), processor)


@pytest.mark.parametrize("options", [{}, {"shared_network": True, "levels": "ivt-rule"}])
def test_ivt_loss_falls_on_a_fixed_batch(tiny_dataset, tiny_clip_dir, tmp_path, options):
    model, processor = load_clip(tiny_clip_dir, "cpu")
    train = _train_data(tiny_dataset, processor)
    flags = {"method": "ivt", "device": "cpu", "batch_size": 8, "lr": 2e-3, "method_options": options}
    cfg = resolve_config(None, None, flags)[0]
    assert (cfg.global_loss, cfg.augment, cfg.text_mode, cfg.local) == ("cmpm", "irra", "truncate", "none")
    trainer = Trainer(model, processor, cfg, tmp_path)
    trainer.prepare(train, total_steps=100)
    assert towers_tied(model) == bool(options)
    idx = np.arange(8)
    params = trainer.trainable_parameters()
    losses, dropped = [], []
    for _ in range(8):
        logs, _ = trainer.train_step(train, idx, params, 5.0, False)
        losses.append(logs["loss"])
        dropped.append((logs["bmm_image_dropped_frac"], logs["bmm_text_dropped_frac"]))
        assert 0.0 <= logs["bmm_image_dropped_frac"] <= 0.2 + 1e-6 and "mla_word_only" in logs
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
    assert max(d[0] for d in dropped) > 0 and max(d[1] for d in dropped) > 0  # BMM drew drops in training
    assert towers_tied(model) == bool(options)


def test_ivt_refuses_itc_and_bad_options(tiny_dataset, tiny_clip_dir, tmp_path):
    with pytest.raises(ValueError, match="mask_ratio"):
        build_method("ivt", {"mask_ratio": 1.5})
    with pytest.raises(ValueError, match="levels"):
        build_method("ivt", {"levels": "words"})
    assert isinstance(build_method("ivt", {"shared_network": "true"}), IvtMethod)
    model, processor = load_clip(tiny_clip_dir, "cpu")
    cfg = resolve_config(None, None, {"method": "ivt", "device": "cpu", "global_loss": "itc"})[0]
    with pytest.raises(ValueError, match="identity-aware"):
        Trainer(model, processor, cfg, tmp_path).prepare(_train_data(tiny_dataset, processor), 10)


# --- (c) through the command line ------------------------------------------------------------------------------------
def _cli(tiny_dataset, tiny_clip_dir, run, *extra):
    argv = [
        "--method",
        "ivt",
        "--manifest",
        str(tiny_dataset / "manifest.parquet"),
        "--init",
        str(tiny_clip_dir),
    ]
    argv += ["--out", str(run), "--epochs", "1", "--batch-size", "8", "--device", "cpu", *extra]
    assert rogle_main(argv) == 0
    load_clip(run / "checkpoint", "cpu")
    assert evaluate_main(["--run", str(run)]) == 0
    return [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]


def test_cli_shared_network_run_saves_a_loadable_clip(tiny_dataset, tiny_clip_dir, tmp_path):
    history = _cli(tiny_dataset, tiny_clip_dir, tmp_path / "run", "--method-option", "shared_network=true")
    assert "loss_mla" in history[-1]
    model, _ = load_clip(tmp_path / "run" / "checkpoint", "cpu")
    sd = model.state_dict()
    assert all(torch.equal(sd[t], sd[v]) for t, v in shared_pairs(model))  # the tie as saved


def test_cli_with_pairs_adds_the_local_branch(tiny_dataset, tiny_clip_dir, tiny_run, tmp_path):
    history = _cli(tiny_dataset, tiny_clip_dir, tmp_path / "run", "--pairs", str(tiny_run), "--local", "rsm")
    assert "loss_local" in history[-1] and "loss_mla" in history[-1]
