"""miners.training.heads: IRRA's masking rule, the cross-modal MLM head (shape, image conditioning,
padding, initialisation, an overfit run on the tiny CLIP) and the identity classifier."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from miners.clip_scorer import load_clip
from miners.encoders import input_size_hw, pad_token_ids, text_token_features, tokenize, vision_token_features
from miners.training.heads import (
    FAST_LR_NAME_PARTS,
    IGNORE_LABEL,
    CrossModalMLM,
    IdentityClassifier,
    mask_token_id,
    mask_tokens,
    pid_classes,
    special_token_ids,
)
from miners.training.losses import id_loss, mlm_loss

PAD, UNK, BOS, EOS = 0, 1, 2, 3
SPECIAL = {PAD, UNK, BOS, EOS}
VOCAB = 50


def _captions(n: int, seed: int, min_len: int = 0, max_len: int = 38):
    """n rows [BOS, words..., EOS, PAD...] with word ids in 4..VOCAB-1 → (ids, attention_mask)."""
    rng = np.random.default_rng(seed)
    seqs = [
        [BOS, *rng.integers(4, VOCAB, rng.integers(min_len, max_len + 1)).tolist(), EOS] for _ in range(n)
    ]
    return pad_token_ids(seqs, PAD)


def _mask(ids, attn, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    return mask_tokens(ids, attn, mask_id=UNK, vocab_size=VOCAB, special_ids=SPECIAL, generator=g, **kw)


# --- mask_tokens -------------------------------------------------------------------------------------
def test_mask_tokens_selects_only_real_words_and_labels_only_selected_positions():
    ids, attn = _captions(500, seed=0)
    masked, labels = _mask(ids, attn)
    selected = labels != IGNORE_LABEL
    word = (attn == 1) & (ids >= 4)
    assert not (selected & ~word).any()  # never BOS, EOS, padding
    assert torch.equal(labels[selected], ids[selected])  # label = the original id
    assert torch.equal(masked[~selected], ids[~selected])  # nothing else changes
    assert (selected.sum(1)[word.any(1)] >= 1).all()  # every caption with a word contributes


def test_mask_tokens_split_is_80_10_10():
    ids, attn = _captions(2000, seed=1, min_len=20)
    masked, labels = _mask(ids, attn, seed=3)
    selected = labels != IGNORE_LABEL
    word = (attn == 1) & (ids >= 4)
    assert float(selected.sum() / word.sum()) == pytest.approx(0.15, abs=0.01)
    to_mask = selected & (masked == UNK)
    unchanged = selected & (masked == ids)
    randomised = selected & ~to_mask & ~unchanged
    n = float(selected.sum())
    # a random draw equals the original 1 time in 46 (the non-special ids): counted as unchanged
    assert float(to_mask.sum()) / n == pytest.approx(0.8, abs=0.02)
    assert float(randomised.sum()) / n == pytest.approx(0.1 * 45 / 46, abs=0.015)
    assert float(unchanged.sum()) / n == pytest.approx(0.1 + 0.1 / 46, abs=0.015)
    # random replacements come from the non-special range only
    assert masked[randomised].min() >= 4 and masked[randomised].max() < VOCAB


def test_mask_tokens_is_deterministic_given_the_generator():
    ids, attn = _captions(64, seed=2)
    a, b, c = _mask(ids, attn, seed=7), _mask(ids, attn, seed=7), _mask(ids, attn, seed=8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_mask_tokens_forces_the_first_word_when_none_is_selected():
    rng = np.random.default_rng(4)
    words = [rng.integers(4, VOCAB, rng.integers(1, 7)).tolist() for _ in range(30)]
    ids, attn = pad_token_ids([[BOS, *w, EOS] for w in words] + [[BOS, EOS]], PAD)  # last: no word
    masked, labels = _mask(ids, attn, prob=1e-9)
    for row in range(len(ids)):
        real = [k for k in range(ids.shape[1]) if attn[row, k] == 1 and int(ids[row, k]) >= 4]
        chosen = torch.nonzero(labels[row] != IGNORE_LABEL).flatten().tolist()
        assert chosen == real[:1]  # exactly the first word, or nothing in an empty caption
        if real:
            assert int(masked[row, real[0]]) == UNK and int(labels[row, real[0]]) == int(ids[row, real[0]])


def test_mask_tokens_rejects_bad_probabilities():
    ids, attn = _captions(2, seed=5)
    with pytest.raises(ValueError):
        _mask(ids, attn, p_mask=0.9, p_random=0.2)


class _OpenAIClipLike:
    """The bits of OpenAI's CLIP tokenizer `mask_token_id` reads (its vocabulary cannot be downloaded)."""

    mask_token_id = None
    unk_token_id = 49407
    all_special_ids = [49406, 49407]

    def __len__(self):
        return 49408

    def convert_tokens_to_ids(self, token):
        return {"<|startoftext|>": 49406, "<|endoftext|>": 49407}.get(token, 49407)


def test_mask_token_id_rules(tiny_clip_dir):
    _, processor = load_clip(tiny_clip_dir, "cpu")
    tok = processor.tokenizer
    assert mask_token_id(tok) == tok.unk_token_id == UNK  # the tiny word-level CLIP: its unk token
    assert special_token_ids(tok) == SPECIAL
    openai = _OpenAIClipLike()
    assert mask_token_id(openai) == 49405  # IRRA's reuse of the last BPE merge
    assert special_token_ids(openai) == {49405, 49406, 49407}
    openai.mask_token_id = 12  # a tokenizer with its own mask token
    assert mask_token_id(openai) == 12


# --- CrossModalMLM -----------------------------------------------------------------------------------
def test_cross_modal_mlm_shapes_heads_and_names():
    head = CrossModalMLM(width=64, vocab_size=30, depth=2)
    scores = head(torch.randn(3, 7, 64), torch.randn(3, 13, 64), torch.zeros(3, 7, dtype=torch.bool))
    assert scores.shape == (3, 7, 30)
    assert head.heads == 1 and CrossModalMLM(512, 10, depth=1).heads == 8  # IRRA's head width 64
    with pytest.raises(ValueError):
        CrossModalMLM(width=64, vocab_size=30, heads=5)
    # IRRA's ×5 lr rule by name reaches everything but its three pre/post LayerNorms
    slow = {n for n, _ in head.named_parameters() if not any(p in n for p in FAST_LR_NAME_PARTS)}
    assert {n.split(".")[0] for n in slow} == {"ln_pre_t", "ln_pre_i", "ln_post"}


def test_cross_modal_mlm_irra_initialisation():
    width, depth = 256, 4
    head = CrossModalMLM(width=width, vocab_size=500, depth=depth)
    attn_std, proj_std, fc_std = width**-0.5, width**-0.5 * (2 * depth) ** -0.5, (2 * width) ** -0.5
    block = head.cross_modal_transformer.resblocks[0]
    for weight, std in [
        (head.cross_attn.in_proj_weight, attn_std),
        (head.cross_attn.out_proj.weight, proj_std),
        (block.attn.in_proj_weight, attn_std),
        (block.mlp.c_fc.weight, fc_std),
        (block.mlp.c_proj.weight, proj_std),
        (head.mlm_head.dense.weight, fc_std),
        (head.mlm_head.fc.weight, proj_std),
    ]:
        assert float(weight.detach().std()) == pytest.approx(std, rel=0.03)


def test_cross_modal_mlm_reads_the_image_tokens():
    head = CrossModalMLM(width=32, vocab_size=11, depth=1)
    text = torch.randn(2, 5, 32)
    a, b = head(text, torch.randn(2, 9, 32)), head(text, torch.randn(2, 9, 32))
    assert (a - b).abs().max() > 1e-3


def test_cross_modal_mlm_padding_changes_no_real_position():
    torch.manual_seed(0)
    head = CrossModalMLM(width=32, vocab_size=11, depth=2)
    text, image = torch.randn(1, 5, 32), torch.randn(1, 9, 32)
    alone = head(text, image, torch.zeros(1, 5, dtype=torch.bool))
    padded = torch.cat([text, torch.randn(1, 4, 32)], 1)
    pad_mask = torch.tensor([[False] * 5 + [True] * 4])
    torch.testing.assert_close(head(padded, image, pad_mask)[:, :5], alone)
    # an all-padding row still gives finite scores
    assert torch.isfinite(head(text, image, torch.ones(1, 5, dtype=torch.bool))).all()


def test_cross_modal_mlm_learns_a_word_only_the_image_shows():
    # Every caption is the same masked token; the answer (one of 4 words) is written only in the image
    # tokens. Without the image the best loss is log 4 ≈ 1.39.
    g = torch.Generator().manual_seed(0)
    n, width, words = 16, 32, 4
    codes = torch.randn(words, width, generator=g)
    answer = torch.arange(n) % words
    image = codes[answer][:, None, :] + 0.1 * torch.randn(n, 6, width, generator=g)
    text = torch.randn(1, 1, width, generator=g).expand(n, 3, width)
    labels = torch.full((n, 3), IGNORE_LABEL)
    labels[:, 1] = answer
    torch.manual_seed(0)
    head = CrossModalMLM(width=width, vocab_size=words, depth=1)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(60):
        loss = mlm_loss(head(text, image), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.2


def test_mlm_overfits_a_fixed_batch_on_the_tiny_clip(tiny_clip_dir, tiny_dataset):
    model, processor = load_clip(tiny_clip_dir, "cpu")
    model.train()
    tok = processor.tokenizer
    captions = pq.read_table(tiny_dataset / "manifest.parquet")["caption"].to_pylist()[:8]
    ids, attn = pad_token_ids(tokenize(processor, captions, max_tokens=24), tok.pad_token_id)
    masked, labels = mask_tokens(
        ids,
        attn,
        mask_id=mask_token_id(tok),
        vocab_size=len(tok),
        special_ids=special_token_ids(tok),
        generator=torch.Generator().manual_seed(0),
    )
    h, w = input_size_hw(processor)
    pixels = torch.randn(8, 3, h, w, generator=torch.Generator().manual_seed(1))
    width = model.config.projection_dim
    torch.manual_seed(0)
    head = CrossModalMLM(width=width, vocab_size=len(tok), depth=1)
    opt = torch.optim.Adam([*model.parameters(), *head.parameters()], lr=1e-3)
    losses = []
    for _ in range(25):
        text_tokens = text_token_features(model, masked, attn)[0]
        scores = head(text_tokens, vision_token_features(model, pixels), attn == 0)
        loss = mlm_loss(scores, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.3 * losses[0]


# --- identity classifier -----------------------------------------------------------------------------
def test_identity_classifier_init_and_id_loss():
    clf = IdentityClassifier(width=512, num_ids=1000)
    assert float(clf.classifier.weight.detach().std()) == pytest.approx(0.001, rel=0.02)
    assert abs(float(clf.classifier.weight.detach().mean())) < 1e-5
    assert torch.equal(clf.classifier.bias, torch.zeros(1000))
    feats = torch.randn(16, 512)
    logits = clf(feats)
    assert logits.shape == (16, 1000)
    # near-zero logits at init: the loss starts at log(C)
    pids = torch.randint(0, 1000, (16,))
    assert float(id_loss(logits, clf(torch.randn(16, 512)), pids)) == pytest.approx(np.log(1000), rel=0.01)


def test_pid_classes_are_sorted_and_order_free():
    mapping, n = pid_classes(np.array([907, 12, 907, 44]))
    assert mapping == {12: 0, 44: 1, 907: 2} and n == 3
    assert pid_classes([44, 12, 907]) == (mapping, n)
