"""IRRA's training-only heads: implicit relation reasoning (MLM through cross-modal fusion) and the
shared identity classifier, plus the token masking and id mapping they need.

Consumes token ids and attention masks (N x T, long; from the CLIP tokenizer), the unnormalised token
projections of a CLIP (`miners.encoders.text_token_features(...)[0]`, N x T x E, and
`miners.encoders.vision_token_features(...)`, N x (1+P) x E) and global features (B x E); produces
masked ids with their labels (`mask_tokens`), vocabulary scores N x T x V (`CrossModalMLM`, for
`losses.mlm_loss`) and identity logits B x C (`IdentityClassifier`, for `losses.id_loss`).

These modules are for training only: the saved checkpoint stays a plain HF CLIP folder, and an integrator
saves their `state_dict()` beside it. No token is ever added to the tokenizer (that would change the saved
CLIP's vocabulary). Parameter names follow IRRA (`cross_attn`, `cross_modal_transformer`, `mlm_head`,
`classifier`) so an optimizer can apply IRRA's ×5 learning rate by name (`FAST_LR_NAME_PARTS`).

Source: /work/shared/METHODS.md §1 "IRR (MLM through cross-modal fusion)" and "ID loss" (IRRA's code).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

# IRRA's optimizer gives lr × 5 to parameters whose name contains one of these (its `--lr_factor 5`)
FAST_LR_NAME_PARTS = ("cross", "classifier", "mlm_head")
# The label of a position the MLM does not score. IRRA uses 0; -100 (PyTorch's default ignore_index) is
# the project's choice because id 0 is a real token in some vocabularies (OpenAI CLIP's "!")
IGNORE_LABEL = -100
# OpenAI CLIP's BPE vocabulary: 49408 entries, <|startoftext|> = 49406, <|endoftext|> = 49407. IRRA drops
# the last BPE merge and reuses its id, 49405, as <|mask|>, so the vocabulary (and embedding) keep size
OPENAI_CLIP_VOCAB_SIZE = 49408
OPENAI_CLIP_MASK_ID = 49405


def mask_token_id(tokenizer) -> int:
    """The id that stands for a masked token, never adding one to the vocabulary:
    - the tokenizer's own mask token when it has one;
    - OpenAI's 49408-entry CLIP vocabulary (recognised by <|startoftext|> at 49406): 49405, as IRRA;
    - otherwise (the project's rule, e.g. the tiny word-level CLIP of miners.training.tiny_clip): the
      unknown-word token, which a vocabulary built from the training captions never emits for them, so
      its embedding is free to learn "a word is hidden here".
    Raises ValueError when none of these exists."""
    own = getattr(tokenizer, "mask_token_id", None)
    if own is not None:
        return int(own)
    if (
        len(tokenizer) == OPENAI_CLIP_VOCAB_SIZE
        and tokenizer.convert_tokens_to_ids("<|startoftext|>") == 49406
    ):
        return OPENAI_CLIP_MASK_ID
    if getattr(tokenizer, "unk_token_id", None) is not None:
        return int(tokenizer.unk_token_id)
    raise ValueError("tokenizer has no mask token, is not OpenAI's CLIP vocabulary and has no unk token")


def special_token_ids(tokenizer) -> set[int]:
    """Ids `mask_tokens` never selects nor draws as a random replacement: the tokenizer's special tokens
    (BOS/EOS/pad/unk...) and the mask id."""
    return {int(i) for i in tokenizer.all_special_ids} | {mask_token_id(tokenizer)}


def mask_tokens(
    ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    mask_id: int,
    vocab_size: int,
    special_ids: Iterable[int] | torch.Tensor,
    generator: torch.Generator,
    prob: float = 0.15,
    p_mask: float = 0.8,
    p_random: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """IRRA's masking rule for the IRR objective → (masked_ids, labels), both N x T long on `ids`' device.

    A position is a candidate when its attention mask is 1 and its id is neither in `special_ids` nor the
    mask id (padding, BOS and EOS are never selected). Each candidate is selected with probability `prob`;
    a selected token becomes `mask_id` with probability `p_mask`, a random id with probability
    `p_random` (uniform over the vocabulary minus special ids and the mask id; IRRA draws from [1, 49405),
    the same set for OpenAI's vocabulary up to id 0) and stays unchanged otherwise. `labels` holds the
    original id at selected positions and -100 elsewhere (IRRA: 0; see IGNORE_LABEL).

    A row with candidates but no selected one gets its first candidate selected and set to the mask (IRRA
    forces position 1, the first token after SOT), so every caption contributes to the loss; a row with no
    candidate at all (an empty caption) stays unmasked with all labels -100.

    Deterministic given `generator`: the random draws have fixed shapes (N x T, three draws), whatever the
    content, and are made on the generator's device."""
    if ids.shape != attention_mask.shape or ids.dim() != 2:
        raise ValueError(
            f"ids {tuple(ids.shape)} and attention_mask {tuple(attention_mask.shape)}: want N x T"
        )
    if not (0.0 < prob <= 1.0 and p_mask >= 0 and p_random >= 0 and p_mask + p_random <= 1.0):
        raise ValueError(
            f"prob={prob}, p_mask={p_mask}, p_random={p_random}: want 0<prob≤1, p_mask+p_random≤1"
        )
    special = torch.as_tensor(sorted({int(i) for i in special_ids} | {int(mask_id)}), dtype=torch.long)
    allowed = torch.ones(vocab_size, dtype=torch.bool)
    allowed[special[(special >= 0) & (special < vocab_size)]] = False
    replacement_ids = torch.nonzero(allowed).squeeze(1)
    if len(replacement_ids) == 0:
        raise ValueError(f"no non-special id in a vocabulary of {vocab_size} for random replacement")

    # Draw every random number up front, in fixed shapes, so the result depends only on the generator
    dev = generator.device
    select_u = torch.rand(ids.shape, generator=generator, device=dev).to(ids.device)
    action_u = torch.rand(ids.shape, generator=generator, device=dev).to(ids.device)
    random_ids = replacement_ids.to(dev)[
        torch.randint(len(replacement_ids), ids.shape, generator=generator, device=dev)
    ].to(ids.device)

    candidate = attention_mask.bool() & ~torch.isin(ids, special.to(ids.device))
    selected = candidate & (select_u < prob)
    # Forced mask: first candidate of every row that has candidates but drew none
    forced = torch.zeros_like(selected)
    needs = candidate.any(1) & ~selected.any(1)
    first = candidate.int().argmax(1)  # argmax returns the first maximum
    forced[needs, first[needs]] = True

    to_mask = (selected & (action_u < p_mask)) | forced
    to_random = selected & (action_u >= p_mask) & (action_u < p_mask + p_random)
    masked = torch.where(to_mask, torch.full_like(ids, mask_id), ids)
    masked = torch.where(to_random, random_ids, masked)
    labels = torch.where(selected | forced, ids, torch.full_like(ids, IGNORE_LABEL))
    return masked, labels


class QuickGELU(nn.Module):
    """x·σ(1.702x): CLIP's and IRRA's activation (kept rather than exact GELU, as IRRA's fusion uses it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def clip_mlp(width: int) -> nn.Sequential:
    """CLIP's transformer MLP: c_fc (4×width) → QuickGELU → c_proj (the names IRRA's initialisation uses)."""
    return nn.Sequential(
        OrderedDict(
            [
                ("c_fc", nn.Linear(width, 4 * width)),
                ("gelu", QuickGELU()),
                ("c_proj", nn.Linear(4 * width, width)),
            ]
        )
    )


class _ResidualBlock(nn.Module):
    """CLIP's pre-norm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x)), MLP 4×width."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = clip_mlp(width)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, key_padding_mask=key_padding_mask, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class _Transformer(nn.Module):
    def __init__(self, width: int, depth: int, heads: int):
        super().__init__()
        self.width, self.depth = width, depth
        self.resblocks = nn.ModuleList(_ResidualBlock(width, heads) for _ in range(depth))

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, key_padding_mask)
        return x


class CrossModalMLM(nn.Module):
    """IRRA's implicit relation reasoning head: masked caption tokens query the image tokens, a small
    transformer fuses them, and an MLM head predicts the vocabulary at every text position.

        x = ln_post(Transformer_depth(CrossAttn(q = ln_pre_t(T), k = v = ln_pre_i(V))))
        scores = mlm_head(x):  Linear(E,E) → QuickGELU → LayerNorm → Linear(E, vocab)

    As IRRA: no residual around the cross-attention (every text position is rebuilt from the image), a
    pre-norm CLIP transformer with QuickGELU and MLP 4×width, IRRA's initialisation (attention in-proj std
    E^-0.5; out-proj and fc2 std E^-0.5·(2·depth)^-0.5; fc1 std (2E)^-0.5; mlm_head dense as fc1, its
    output layer as out-proj; biases and LayerNorms at PyTorch's defaults).

    `heads=None` uses IRRA's rule, head width 64 (`width // 64`, 8 for 512), at least 1 head (so 1 for the
    tiny CLIP's 64); `heads` must divide `width`.

    Project's own: the fusion transformer takes `text_padding_mask` as a key padding mask (IRRA pads every
    caption to 77 tokens and masks nothing). Padding then changes no real position's scores, so a caption's
    scores do not depend on how long the batch's longest caption is; scores *at* padding positions are
    computed but meaningless (their labels are -100)."""

    def __init__(self, width: int, vocab_size: int, heads: int | None = None, depth: int = 4):
        super().__init__()
        heads = max(1, width // 64) if heads is None else heads
        if heads < 1 or width % heads:
            raise ValueError(f"heads={heads} must divide width={width}")
        self.width, self.vocab_size, self.heads, self.depth = width, vocab_size, heads, depth
        self.ln_pre_t = nn.LayerNorm(width)
        self.ln_pre_i = nn.LayerNorm(width)
        self.cross_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.cross_modal_transformer = _Transformer(width, depth, heads)
        self.ln_post = nn.LayerNorm(width)
        self.mlm_head = nn.Sequential(
            OrderedDict(
                [
                    ("dense", nn.Linear(width, width)),
                    ("gelu", QuickGELU()),
                    ("ln", nn.LayerNorm(width)),
                    ("fc", nn.Linear(width, vocab_size)),
                ]
            )
        )
        self._init_irra()

    def _init_irra(self) -> None:
        attn_std = self.width**-0.5
        proj_std = attn_std * (2 * max(self.depth, 1)) ** -0.5
        fc_std = (2 * self.width) ** -0.5
        for block in self.cross_modal_transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.cross_attn.in_proj_weight, std=attn_std)
        nn.init.normal_(self.cross_attn.out_proj.weight, std=proj_std)
        nn.init.normal_(self.mlm_head.dense.weight, std=fc_std)
        nn.init.normal_(self.mlm_head.fc.weight, std=proj_std)

    def forward(
        self,
        text_tokens: torch.Tensor,
        image_tokens: torch.Tensor,
        text_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """text_tokens N x T x E (of the *masked* caption), image_tokens N x P x E (all vision tokens, CLS
        included), text_padding_mask N x T bool (True = padding; e.g. `attention_mask == 0`) → scores
        N x T x vocab (logits)."""
        if text_padding_mask is not None:
            # A row of padding only would leave its softmax nothing to attend to (NaN): let it see itself
            text_padding_mask = text_padding_mask.bool() & ~text_padding_mask.bool().all(1, keepdim=True)
        image = self.ln_pre_i(image_tokens)
        x = self.cross_attn(self.ln_pre_t(text_tokens), image, image, need_weights=False)[0]
        x = self.ln_post(self.cross_modal_transformer(x, text_padding_mask))
        return self.mlm_head(x)


class IdentityClassifier(nn.Module):
    """IRRA's ID head: one Linear(width, num_ids) shared by image and text global features (unnormalised),
    weight ~ N(0, 0.001²), bias 0. The attribute is named `classifier` for IRRA's ×5 lr rule."""

    def __init__(self, width: int, num_ids: int):
        super().__init__()
        if num_ids < 1:
            raise ValueError(f"num_ids={num_ids}: want ≥ 1")
        self.classifier = nn.Linear(width, num_ids)
        nn.init.normal_(self.classifier.weight, std=0.001)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """B x width → B x num_ids logits."""
        return self.classifier(features)


def pid_classes(pids: np.ndarray | Iterable[int]) -> tuple[dict[int, int], int]:
    """Arbitrary person ids → (class index of each distinct pid, number of classes): the sorted distinct
    ids take 0..C−1 in order, so the mapping depends only on the set of ids (not on their order)."""
    distinct = np.unique(np.fromiter(pids, dtype=np.int64))
    return {int(p): k for k, p in enumerate(distinct)}, len(distinct)
