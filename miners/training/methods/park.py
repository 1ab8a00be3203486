"""`--method park`: Park, Jeong, Kim & Kwak (seed 001), "Improving Text-based Person Search via Part-level
Cross-modal Correspondence": global, coarse and fine embeddings of both modalities; ID + ranking losses on
the global and coarse ones, ID + the commonality-based margin ranking (CMR) loss on the fine ones.

What follows the seed (its abstract, TL;DR and Figure 1 caption; ../shared/METHODS.md section 5):
- three levels of embeddings per modality: global (g_v, g_t), coarse (c_v, c_t) and fine (f_v, f_t);
- coarse embeddings come from a decoder whose input is a set of learnable tokens **shared by both
  modalities**, decoded over each modality's features;
- fine image embeddings come from **horizontal stripes** of the feature map; fine text embeddings come from
  "the decoder with another set of tokens, namely text tokens" (learnable part queries over the words);
- losses: identity classification (ID) + ranking on global and coarse embeddings; ID + CMR on fine ones,
  where CMR's margin reflects "the degree of commonality of each body part" (parts that different people
  have in common are not pushed apart as hard).

What is the project's own (the seed is silent; every item is an option of `ParkOptions`):
- the CLIP port: the global embeddings are CLIP's CLS / EOT projections (the seed's ResNet/BERT use global
  max pooling), because every method here is evaluated on the CLIP's global embeddings alone; the seed's
  "encoder" is the CLIP towers themselves (no extra encoder layers); the decoder reads the *projected*
  tokens (image patches without CLS, all real text tokens, padding masked);
- the decoder: pre-norm layers of self-attention among the queries, cross-attention to the tokens and an
  MLP, then LayerNorm and a linear projection; one decoder shared by both modalities by default (the seed
  says "the decoder"); depth, heads, number of coarse tokens and of stripes;
- coarse: the M decoded tokens are mean-pooled into one coarse embedding per side;
- the ID heads: one linear classifier per level shared by both modalities (IRRA's style), and one per part;
- the ranking loss: bidirectional triplet on cosine similarities, the row's own pair as positive, the
  hardest (largest-hinge) negative of another identity (or a random semi-hard one), the two directions
  summed, averaged over anchors;
- the CMR formula (METHODS.md's engineering proxy, NOT the authors' formula): commonality of part k between
  rows i and j is the stop-gradient intra-modal cosine of their part-k embeddings clipped to [0, 1], and the
  margin is max(m_min, m0 · (1 − commonality));
- every weight.

Consumes a `Batch` (methods.base): view 0's vision forward, the truncated captions' token features, person
ids and classifier classes; produces the scalar loss and its parts. Heads (training-only, saved in heads.pt):
the queries and decoder(s) (names hold "cross": head_lr_factor) and the ID classifiers ("classifier").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from miners.encoders import patch_grid_hw
from miners.training.heads import IdentityClassifier, clip_mlp
from miners.training.losses import id_loss
from miners.training.methods.base import Batch, Method

MINING_NAMES = ("hardest", "semihard")
COMMONALITY_NAMES = ("image", "text", "both")
POOL_NAMES = ("mean", "max")


@dataclass
class ParkOptions:
    """`--method-option KEY=VALUE` for `park`. Seed 001 gives the structure (three levels, shared coarse
    tokens, stripes, text part tokens, ID + ranking + CMR) and none of these numbers: all project's own."""

    stripes: int = (
        6  # project's own: K horizontal stripes = K fine parts per modality (24 rows / 6 at 384 px)
    )
    stripe_pool: str = "mean"  # project's own: "mean" or "max" of the projected patch tokens in a stripe
    coarse_tokens: int = 4  # project's own: M learnable tokens shared by both modalities (seed: shared)
    coarse_pool: str = "mean"  # project's own: "mean" or "max" over the M decoded tokens → one embedding
    decoder_layers: int = 1  # project's own: depth of the query decoder
    decoder_heads: int = 0  # project's own: attention heads; 0 = width // 64 (at least 1)
    shared_decoder: bool = True  # project's reading of the seed's "the decoder": one for both modalities
    ranking_margin: float = 0.2  # project's own: margin of the global and coarse ranking loss (cosines)
    cmr_margin: float = 0.2  # project's own (METHODS.md proxy m0): CMR margin of a part nobody shares
    cmr_margin_min: float = 0.05  # project's own (proxy m_min; the floor in PLOT's helper): shared part
    commonality: str = "image"  # project's own: part cosine between the rows' "image" parts, "text" parts,
    # or "both" (their mean), detached and clipped to [0, 1]
    mining: str = "hardest"  # project's own: "hardest" (largest hinge) or "semihard" (random violating
    # negative less similar than the positive; PLOT's helper samples those), per anchor
    id_weight: float = 1.0  # project's own: weight of the ID term inside each level
    ranking_weight: float = 1.0  # project's own: weight of the ranking (global, coarse) and CMR (fine) terms
    global_weight: float = 1.0  # project's own: weight of the global level
    coarse_weight: float = 1.0  # project's own: weight of the coarse level (0: off)
    fine_weight: float = 1.0  # project's own: weight of the fine level (0: off)

    def __post_init__(self):
        for name in ("stripes", "coarse_tokens", "decoder_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"park option {name}={getattr(self, name)}: want ≥ 1")
        if self.decoder_heads < 0:
            raise ValueError(f"park option decoder_heads={self.decoder_heads}: want ≥ 0 (0: width // 64)")
        for name, allowed in (
            ("stripe_pool", POOL_NAMES),
            ("coarse_pool", POOL_NAMES),
            ("commonality", COMMONALITY_NAMES),
            ("mining", MINING_NAMES),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"park option {name}={getattr(self, name)!r}: choose one of {allowed}")
        for name in (
            "ranking_margin",
            "cmr_margin",
            "cmr_margin_min",
            "id_weight",
            "ranking_weight",
            "global_weight",
            "coarse_weight",
            "fine_weight",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"park option {name}={getattr(self, name)}: want ≥ 0")


# --- pure functions: parts and losses -------------------------------------------------------------------
def stripe_bounds(grid_h: int, stripes: int) -> list[tuple[int, int]]:
    """[start, end) patch rows of each of `stripes` horizontal stripes, top first, as even as possible:
    stripe k = rows ⌊k·H/K⌋ .. ⌊(k+1)·H/K⌋ − 1 (24 rows, K = 6: 4 each; 24 rows, K = 5: 4, 5, 5, 5, 5)."""
    if not 1 <= stripes <= grid_h:
        raise ValueError(f"{stripes} stripes over a grid of {grid_h} patch rows: want 1 ≤ stripes ≤ rows")
    return [(k * grid_h // stripes, (k + 1) * grid_h // stripes) for k in range(stripes)]


def stripe_parts(
    patch_tokens: torch.Tensor, grid_hw: tuple[int, int], stripes: int, pool: str = "mean"
) -> torch.Tensor:
    """Fine image parts: patch_tokens B x P x E (row-major over the grid, CLS excluded) → B x K x E, part k
    the mean (or max) of the tokens of stripe k's rows (`stripe_bounds`)."""
    gh, gw = grid_hw
    if patch_tokens.shape[1] != gh * gw:
        raise ValueError(f"{patch_tokens.shape[1]} patch tokens for a {gh} x {gw} grid")
    grid = patch_tokens.reshape(len(patch_tokens), gh, gw, -1)
    parts = []
    for start, end in stripe_bounds(gh, stripes):
        rows = grid[:, start:end].flatten(1, 2)  # B x (rows·gw) x E
        parts.append(rows.mean(1) if pool == "mean" else rows.amax(1))
    return torch.stack(parts, 1)


def ranking_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    pids: torch.Tensor,
    margin: float | torch.Tensor,
    mining: str = "hardest",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Bidirectional triplet ranking loss on cosine similarities (project's own form; the seed names "ranking
    loss" only). With S_ij = cos(v_i, t_j) (image row i, text row j), negatives N_i = {j : pid_j ≠ pid_i}
    and a margin m_ij (a float, or B x B for the pair of rows i, j),

        h^{i2t}_ij = [m_ij − S_ii + S_ij]_+   (image i, its own text i, another person's text j)
        h^{t2i}_ij = [m_ij − S_ii + S_ji]_+   (text i, its own image i, another person's image j)
        L = mean_{i : N_i ≠ ∅} ( h^{i2t}_{i,j*} + h^{t2i}_{i,j'*} ),

    j* the negative of the largest hinge ("hardest"; with a constant margin the most similar one), or with
    "semihard" a uniform random pick (from `generator`) among the negatives with S_ii − m_ij < S_ij < S_ii
    (violating, yet less similar than the positive), the hardest where there is none. A batch where no
    row has a negative gives 0, attached to the graph."""
    dtype = torch.promote_types(image.dtype, torch.float32)  # bf16 under autocast: compare in fp32
    v, t = F.normalize(image.to(dtype), dim=-1), F.normalize(text.to(dtype), dim=-1)
    sim = v @ t.T  # B x B, image i against text j
    neg = pids[:, None] != pids[None, :]
    if not isinstance(margin, torch.Tensor):
        margin = torch.full_like(sim, float(margin))
    pos = sim.diagonal()[:, None]
    has_neg = neg.any(1)
    total = sim.new_zeros(())
    for s in (sim, sim.T):  # i2t: row i's negatives are texts j; t2i: images j (S_ji)
        hinge = (margin - pos + s).clamp_min(0)
        chosen = _mined(hinge, s, pos, neg, mining, generator)
        total = total + chosen[has_neg].sum()
    return total / has_neg.sum().clamp_min(1)


def _mined(
    hinge: torch.Tensor,
    sim: torch.Tensor,
    pos: torch.Tensor,
    neg: torch.Tensor,
    mining: str,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Per anchor (row), the hinge of its mined negative (rows without a negative: 0)."""
    hardest = hinge.masked_fill(~neg, 0).amax(1)  # hinges are ≥ 0, so masking with 0 keeps the max
    if mining == "hardest":
        return hardest
    if mining != "semihard":
        raise ValueError(f"mining {mining!r}: choose one of {MINING_NAMES}")
    if generator is None:
        raise ValueError("semihard mining draws its negatives from a generator: pass one")
    eligible = neg & (hinge > 0) & (sim < pos)
    # Fixed-shape draws on the generator's device: the choice depends only on the generator's state
    score = torch.rand(sim.shape, generator=generator, device=generator.device).to(sim.device)
    pick = score.masked_fill(~eligible, -1.0).argmax(1, keepdim=True)
    semi = hinge.gather(1, pick).squeeze(1)
    return torch.where(eligible.any(1), semi, hardest)


def cmr_margins(
    image_parts: torch.Tensor,
    text_parts: torch.Tensor,
    margin: float,
    margin_min: float,
    commonality: str = "image",
) -> torch.Tensor:
    """CMR's per-part margins (METHODS.md's engineering proxy, not the authors' formula) → K x B x B:

        c^k_ij = sg[ clip(cos(f^k_i, f^k_j), 0, 1) ],   m^k_ij = max(m_min, m0 · (1 − c^k_ij)),

    f^k the part-k embeddings of `commonality`'s modality ("image": f^{v,k}; "text": f^{t,k}; "both": the
    mean of the two cosines). A part rows i and j have in common (c → 1) gets the floor m_min; a part they
    do not share (c ≤ 0) the full m0. Detached: the margin is a constant of the loss."""
    with torch.no_grad():

        def part_cos(parts: torch.Tensor) -> torch.Tensor:
            p = F.normalize(parts.to(torch.promote_types(parts.dtype, torch.float32)), dim=-1)
            p = p.transpose(0, 1)  # K x B x E
            return p @ p.transpose(1, 2)

        if commonality == "image":
            cos = part_cos(image_parts)
        elif commonality == "text":
            cos = part_cos(text_parts)
        elif commonality == "both":
            cos = (part_cos(image_parts) + part_cos(text_parts)) / 2
        else:
            raise ValueError(f"commonality {commonality!r}: choose one of {COMMONALITY_NAMES}")
        common = cos.clamp(0.0, 1.0)
        return (margin * (1 - common)).clamp_min(margin_min)


def cmr_loss(
    image_parts: torch.Tensor,
    text_parts: torch.Tensor,
    pids: torch.Tensor,
    margin: float = 0.2,
    margin_min: float = 0.05,
    commonality: str = "image",
    mining: str = "hardest",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Commonality-based margin ranking loss (structure from the seed; formula METHODS.md's proxy): for
    B x K x E image and text parts,

        L_CMR = (1/K) Σ_k ranking_loss(f^{v,k}, f^{t,k}, pids, margin = m^k)   (m^k from `cmr_margins`),

    i.e. per part k and anchor i, [m^k_ij − s^k_ii + s^k_ij]_+ in both directions with s^k_ij =
    cos(f^{v,k}_i, f^{t,k}_j), the negative mined per part; averaged over parts (the proxy's Σ_k is a mean
    here, so the scale does not grow with K: project's own). Semi-hard draws take the parts in order."""
    if image_parts.shape != text_parts.shape or image_parts.dim() != 3:
        raise ValueError(f"parts {tuple(image_parts.shape)} and {tuple(text_parts.shape)}: want B x K x E")
    margins = cmr_margins(image_parts, text_parts, margin, margin_min, commonality)
    parts = image_parts.shape[1]
    total = sum(
        ranking_loss(image_parts[:, k], text_parts[:, k], pids, margins[k], mining, generator)
        for k in range(parts)
    )
    return total / parts


# --- heads ----------------------------------------------------------------------------------------------
class _DecoderLayer(nn.Module):
    """Pre-norm: q + SelfAttn(ln_q(q)), then + CrossAttn(ln_c(q), memory), then + MLP(ln_m(q)) (4×width,
    QuickGELU). Memory arrives normalised by the decoder."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_q = nn.LayerNorm(width)
        self.self_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_c = nn.LayerNorm(width)
        self.cross_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_m = nn.LayerNorm(width)
        self.mlp = clip_mlp(width)

    def forward(
        self, x: torch.Tensor, memory: torch.Tensor, memory_padding: torch.Tensor | None
    ) -> torch.Tensor:
        h = self.ln_q(x)
        x = x + self.self_attn(h, h, h, need_weights=False)[0]
        x = (
            x
            + self.cross_attn(
                self.ln_c(x), memory, memory, key_padding_mask=memory_padding, need_weights=False
            )[0]
        )
        return x + self.mlp(self.ln_m(x))


class QueryDecoder(nn.Module):
    """Learnable queries read a modality's tokens (project's own architecture; the seed: "an encoder-decoder
    taking the visual and textual features, and a set of learnable tokens"):

        x = queries;  x ← layer(x, ln_mem(tokens))  × depth;  out = proj(ln_post(x))

    queries Q x E (broadcast over the batch), tokens N x T x E, padding N x T bool (True = ignore) →
    N x Q x E. A row of padding only attends to all its tokens (never NaN)."""

    def __init__(self, width: int, depth: int = 1, heads: int = 0):
        super().__init__()
        heads = heads or max(1, width // 64)
        if width % heads:
            raise ValueError(f"decoder heads={heads} must divide width={width}")
        self.width, self.depth, self.heads = width, depth, heads
        self.ln_mem = nn.LayerNorm(width)
        self.layers = nn.ModuleList(_DecoderLayer(width, heads) for _ in range(depth))
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Linear(width, width)

    def forward(
        self, queries: torch.Tensor, tokens: torch.Tensor, padding: torch.Tensor | None = None
    ) -> torch.Tensor:
        if padding is not None:
            padding = padding.bool() & ~padding.bool().all(1, keepdim=True)
        memory = self.ln_mem(tokens)
        x = queries.to(tokens.dtype).unsqueeze(0).expand(len(tokens), -1, -1)
        for layer in self.layers:
            x = layer(x, memory, padding)
        return self.proj(self.ln_post(x))


class ParkQueries(nn.Module):
    """The learnable tokens: `coarse` (M x E, ONE set for both modalities, as the seed) and `text_parts`
    (K x E, the fine text part tokens), N(0, 0.02²) (project's own)."""

    def __init__(self, width: int, coarse_tokens: int, parts: int):
        super().__init__()
        self.coarse = nn.Parameter(torch.randn(coarse_tokens, width) * 0.02)
        self.text_parts = nn.Parameter(torch.randn(parts, width) * 0.02)


class PartClassifiers(nn.Module):
    """One IdentityClassifier per fine part (PCB-style; project's own), each shared by both modalities."""

    def __init__(self, width: int, num_ids: int, parts: int):
        super().__init__()
        self.parts = nn.ModuleList(IdentityClassifier(width, num_ids) for _ in range(parts))

    def forward(self, parts: torch.Tensor) -> torch.Tensor:
        """B x K x E → B x K x C logits."""
        return torch.stack([head(parts[:, k]) for k, head in enumerate(self.parts)], 1)


# --- the method -----------------------------------------------------------------------------------------
class ParkMethod(Method):
    name = "park"
    options = ParkOptions
    # The text decoder reads every caption token: only the truncate mode has them
    defaults = {"local": "none", "text_mode": "truncate"}

    def build_heads(self, trainer, train) -> dict[str, nn.Module]:
        opts, cfg = self.opts, trainer.cfg
        if cfg.text_mode != "truncate":
            raise ValueError(
                f"--method park decodes the caption's tokens, which text_mode {cfg.text_mode!r} does not "
                "give: use --text-mode truncate (the method's default)"
            )
        grid_h, _ = patch_grid_hw(trainer.model, tuple(train.images_u8.shape[2:]))
        stripe_bounds(grid_h, opts.stripes)  # refuses more stripes than patch rows before training
        width = int(trainer.model.config.projection_dim)
        num_ids = len(trainer.class_of_pid)
        heads: dict[str, nn.Module] = {
            "cross_queries": ParkQueries(width, opts.coarse_tokens, opts.stripes),
        }
        if opts.shared_decoder:
            heads["cross_decoder"] = QueryDecoder(width, opts.decoder_layers, opts.decoder_heads)
        else:
            heads["cross_decoder_image"] = QueryDecoder(width, opts.decoder_layers, opts.decoder_heads)
            heads["cross_decoder_text"] = QueryDecoder(width, opts.decoder_layers, opts.decoder_heads)
        if opts.id_weight > 0:
            heads["id_global"] = IdentityClassifier(width, num_ids)
            heads["id_coarse"] = IdentityClassifier(width, num_ids)
            heads["id_fine"] = PartClassifiers(width, num_ids, opts.stripes)
        return heads

    def loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        opts, heads = self.opts, batch.trainer.heads
        vision, text = batch.vision(0), batch.text()
        pids, classes = batch.gather(batch.pids), batch.gather(batch.classes)
        decode_image = heads["cross_decoder" if opts.shared_decoder else "cross_decoder_image"]
        decode_text = heads["cross_decoder" if opts.shared_decoder else "cross_decoder_text"]
        text_padding = text.mask == 0
        patches = vision.tokens[:, 1:]
        logs: dict[str, float] = {}
        loss = vision.image.new_zeros((), dtype=torch.float32)

        def level(name: str, weight: float, image, txt, classifier, rank_fn) -> torch.Tensor:
            """weight · (id_weight · ID + ranking_weight · ranking) of one level, logged by part."""
            image, txt = batch.gather(image.float()), batch.gather(txt.float())
            rank = rank_fn(image, txt)
            logs[f"loss_{name}_rank"] = float(rank.detach())
            term = opts.ranking_weight * rank
            if opts.id_weight > 0:
                ident = _level_id_loss(heads[classifier], image, txt, classes)
                logs[f"loss_{name}_id"] = float(ident.detach())
                term = term + opts.id_weight * ident
            return weight * term

        def rank_const(image, txt):
            return ranking_loss(image, txt, pids, opts.ranking_margin, opts.mining, batch.generator)

        if opts.global_weight > 0:
            loss = loss + level(
                "global", opts.global_weight, vision.image, text.pooled, "id_global", rank_const
            )
        if opts.coarse_weight > 0:
            queries = heads["cross_queries"].coarse  # one set of tokens for both modalities
            coarse_v = _pool(decode_image(queries, patches), opts.coarse_pool)
            coarse_t = _pool(decode_text(queries, text.tokens, text_padding), opts.coarse_pool)
            loss = loss + level("coarse", opts.coarse_weight, coarse_v, coarse_t, "id_coarse", rank_const)
        if opts.fine_weight > 0:
            grid_hw = patch_grid_hw(batch.model, tuple(batch.pixels(0).shape[-2:]))
            fine_v = stripe_parts(patches, grid_hw, opts.stripes, opts.stripe_pool)
            fine_t = decode_text(heads["cross_queries"].text_parts, text.tokens, text_padding)

            def rank_cmr(image, txt):
                return cmr_loss(
                    image,
                    txt,
                    pids,
                    opts.cmr_margin,
                    opts.cmr_margin_min,
                    opts.commonality,
                    opts.mining,
                    batch.generator,
                )

            loss = loss + level("fine", opts.fine_weight, fine_v, fine_t, "id_fine", rank_cmr)
            logs["loss_cmr"] = logs.pop("loss_fine_rank")
        return loss, logs


def _pool(tokens: torch.Tensor, pool: str) -> torch.Tensor:
    """B x M x E decoded tokens → B x E."""
    return tokens.mean(1) if pool == "mean" else tokens.amax(1)


def _level_id_loss(
    classifier: nn.Module, image: torch.Tensor, text: torch.Tensor, classes: torch.Tensor
) -> torch.Tensor:
    """IRRA's ½[CE(W v, y) + CE(W t, y)] with the level's shared classifier; for parts (B x K x E) one
    classifier per part and the mean over parts."""
    if image.dim() == 2:
        return id_loss(classifier(image), classifier(text), classes)
    logits_v, logits_t = classifier(image), classifier(text)  # B x K x C
    parts = image.shape[1]
    return sum(id_loss(logits_v[:, k], logits_t[:, k], classes) for k in range(parts)) / parts
