"""`--method scmm`: SCMM (seed 002; Liu, Wei et al., arXiv 2304.02278) — the sew calibration loss (a
bidirectional image↔text hinge with margins that adapt to each caption's textual information density, plus
a term that compresses same-identity features) and masked caption modelling (MCM) through a cross-modal
decoder used in training only.

What the seed says (its abstract and figure captions; no official code was found, ../shared/METHODS.md §6):
a dual encoder whose CLS features alone are used at inference; a sew calibration loss with "quality-guided
adaptive margins based on textual information density" and "bidirectional constraints to compress
same-identity features in the shared embedding space"; masked caption prediction through a transformer
cross-modal decoder that is discarded at inference. Everything else is the project's own (METHODS.md §6's
engineering proxy), an option of `ScmmOptions`:

- density: the number of content words of a caption (spaCy's English stop words removed), min-max
  normalised over the (gathered) batch;
- margin: m_i = margin_low + (margin_high − margin_low)·d_i (a denser caption demands a larger gap);
- the sew proxy's formula (`sew_hinge`, `sew_compress`), its weight λ and what a row without a negative
  does;
- MCM: IRRA's implicit relation reasoning head (heads.CrossModalMLM: cross-attention, `mcm_depth` fusion
  blocks, an MLM head) with IRRA's 80/10/10 masking at `mcm_mask_prob` of the caption's words.

Consumes a `Batch` (view 0's vision forward, the captions' text features, the captions' strings for their
density, the batch's person ids); produces the loss and its logged parts. The decoder is a training-only
head (checkpoint/heads.pt): the saved CLIP folder and its inference are those of every other method.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from miners.training.heads import CrossModalMLM
from miners.training.methods.base import Batch, Method
from miners.training.methods.rogle import irra_mlm_loss

DENSITY_MEASURES = ("content_words", "words", "none")
# A word: a maximal run of ASCII letters in the lower-cased caption ("t-shirt" → "t", "shirt")
_WORD_RE = re.compile(r"[a-z]+")


@dataclass
class ScmmOptions:
    # weight of the sew calibration loss (hinge + λ·compress) in the total: project's own (seed gives none)
    sew_weight: float = 1.0
    # the margin of the least dense caption of the batch: project's own (METHODS.md §6 proxy)
    margin_low: float = 0.1
    # the margin of the densest caption of the batch: project's own (METHODS.md §6 proxy)
    margin_high: float = 0.3
    # λ, the weight of the same-identity compression term inside the sew loss: project's own (METHODS.md §6)
    compress_weight: float = 0.1
    # the textual information density ("content_words": words not in spaCy's English stop words, less
    # `keep_words`; "words": every word; "none": every caption the mid margin, i.e. a fixed margin — the
    # seed's Fig. 5 ablates fixed margins): project's own (the seed names density, not its measure)
    density: str = "content_words"
    # words counted as content although spaCy lists them as stop words: in person descriptions they name
    # garments or body parts ("a white top", "a bag on her back"): project's own
    keep_words: tuple = ("top", "bottom", "front", "back", "side")
    # weight of masked caption modelling in the total: project's own (seed gives none; IRRA's IRR uses 1)
    mcm_weight: float = 1.0
    # fusion transformer blocks of the cross-modal decoder after its cross-attention: project's own (IRRA's 4)
    mcm_depth: int = 4
    # probability that a caption word is selected for prediction (80% mask, 10% random, 10% kept; a row
    # with none selected gets its first word masked): project's own (IRRA's 0.15)
    mcm_mask_prob: float = 0.15

    def __post_init__(self):
        problems = []
        if not 0.0 <= self.margin_low <= self.margin_high:
            problems.append(
                f"margin_low={self.margin_low}, margin_high={self.margin_high}: want 0 ≤ low ≤ high"
            )
        if self.density not in DENSITY_MEASURES:
            problems.append(f"density={self.density!r}: choose one of {', '.join(DENSITY_MEASURES)}")
        if not 0.0 < self.mcm_mask_prob <= 1.0:
            problems.append(f"mcm_mask_prob={self.mcm_mask_prob}: want 0 < p ≤ 1")
        if self.mcm_depth < 0:
            problems.append(f"mcm_depth={self.mcm_depth}: want ≥ 0")
        for name in ("sew_weight", "compress_weight", "mcm_weight"):
            if getattr(self, name) < 0:
                problems.append(f"{name}={getattr(self, name)}: want ≥ 0")
        if self.sew_weight == 0 and self.mcm_weight == 0:
            problems.append("sew_weight and mcm_weight are both 0: nothing to train")
        if problems:
            raise ValueError("scmm options: " + "; ".join(problems))


class ScmmMethod(Method):
    name = "scmm"
    options = ScmmOptions
    # No local branch by default (SCMM has none; `--local rsm` adds ROGLE's); captions truncated to the
    # text context as IRRA's pipeline, which also gives MCM and the global feature one tokenisation
    defaults = {"local": "none", "text_mode": "truncate"}

    def build_heads(self, trainer, train) -> dict[str, torch.nn.Module]:
        if self.opts.mcm_weight == 0:
            return {}
        width = int(trainer.model.config.projection_dim)
        # parameter names cross_attn / cross_modal_transformer / mlm_head: the run's head_lr_factor applies
        return {"mcm": CrossModalMLM(width, trainer.vocab_size, depth=self.opts.mcm_depth)}

    def loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        opts, logs = self.opts, {}
        vision = batch.vision(0)
        loss = vision.image.new_zeros(())
        if opts.sew_weight > 0:
            text = batch.text()
            counts = torch.as_tensor(
                caption_density_counts(
                    [batch.data.captions[i] for i in batch.idx], opts.density, opts.keep_words
                ),
                dtype=torch.float32,
                device=batch.device,
            )
            margins = adaptive_margins(batch.gather(counts), opts.margin_low, opts.margin_high)
            t, v, pids = batch.gather(text.pooled), batch.gather(vision.image), batch.gather(batch.pids)
            hinge = sew_hinge(t, v, pids, margins)
            compress = sew_compress(t, v, pids)
            loss_sew = hinge + opts.compress_weight * compress
            loss = loss + opts.sew_weight * loss_sew
            logs["loss_sew"] = float(loss_sew.detach())
            logs["loss_sew_hinge"] = float(hinge.detach())
            logs["loss_sew_compress"] = float(compress.detach())
            logs["sew_margin_mean"] = float(margins.mean())
        if opts.mcm_weight > 0:
            # IRRA's IRR computation with this method's decoder and selection probability (masks drawn
            # over the global batch, the mean over its masked tokens: methods.rogle.irra_mlm_loss)
            loss_mcm = irra_mlm_loss(batch, vision.tokens, head="mcm", prob=opts.mcm_mask_prob)
            loss = loss + opts.mcm_weight * loss_mcm
            logs["loss_mcm"] = float(loss_mcm.detach())
        return loss, logs


# --------------------------------------------------------------------------------------- density, margins
@functools.lru_cache(maxsize=8)
def _stop_words(keep_words: tuple[str, ...]) -> frozenset[str]:
    from spacy.lang.en.stop_words import STOP_WORDS  # imported once, when a run first needs it

    return frozenset(STOP_WORDS) - {w.lower() for w in keep_words}


def caption_density_counts(
    captions: Sequence[str], measure: str = "content_words", keep_words: Iterable[str] = ()
) -> np.ndarray:
    """N float64 raw densities of `captions` (project's own measures):
    - "content_words": words (maximal runs of letters, lower-cased) of ≥ 2 letters that are not spaCy's
      English stop words, `keep_words` excepted (they count);
    - "words": every word;
    - "none": 0 for every caption (`adaptive_margins` then gives every caption the mid margin)."""
    if measure not in DENSITY_MEASURES:
        raise ValueError(f"density {measure!r}: choose one of {', '.join(DENSITY_MEASURES)}")
    if measure == "none":
        return np.zeros(len(captions))
    words = [_WORD_RE.findall(c.lower()) for c in captions]
    if measure == "words":
        return np.array([len(w) for w in words], dtype=np.float64)
    stop = _stop_words(tuple(sorted(keep_words)))
    return np.array([sum(len(x) >= 2 and x not in stop for x in w) for w in words], dtype=np.float64)


def adaptive_margins(counts: torch.Tensor, margin_low: float, margin_high: float) -> torch.Tensor:
    """B margins m_i = margin_low + (margin_high − margin_low)·d_i, with d_i = (c_i − min c)/(max c − min c)
    the batch's min-max normalised density (project's own, METHODS.md §6). A batch whose captions are all
    equally dense has no "denser" caption: every d_i is then ½ (the mid margin), the project's choice.
    No gradient flows through the margins (they are a function of the captions' words only)."""
    c = counts.detach().float()
    span = c.max() - c.min()
    d = torch.where(span > 0, (c - c.min()) / span.clamp_min(1e-12), torch.full_like(c, 0.5))
    return margin_low + (margin_high - margin_low) * d


# ------------------------------------------------------------------------------------------------ losses
def _cosine_text_image(text_feat: torch.Tensor, image_feat: torch.Tensor) -> torch.Tensor:
    """S (B x B, float32): S_ij = cos(text i, image j); rows are texts, columns images."""
    return F.normalize(text_feat.float(), dim=-1) @ F.normalize(image_feat.float(), dim=-1).T


def sew_hinge(
    text_feat: torch.Tensor, image_feat: torch.Tensor, pids: torch.Tensor, margins: torch.Tensor
) -> torch.Tensor:
    """The sew proxy's bidirectional hinge (project's own formula after the seed's "bidirectional
    constraints" with "adaptive margins"; METHODS.md §6). With S_ij = cos(text i, image j) (row i of
    `text_feat` and of `image_feat` is a matching pair) and N(i) = {j : pid_j ≠ pid_i}:

        ℓ_i = [m_i − S_ii + max_{j∈N(i)} S_ij]_+      (text i as anchor: its hardest negative image)
            + [m_i − S_ii + max_{j∈N(i)} S_ji]_+      (image i as anchor: its hardest negative text)
        L = mean over the rows i with N(i) ≠ ∅ of ℓ_i

    N(i) is empty only when the whole (gathered) batch shows one person: a row without a negative has no
    constraint to satisfy and is left out of the mean (project's choice), so such a batch gives 0,
    attached to the graph (backward runs and gives zero gradients, never NaN); `sew_compress` still pulls
    its rows together. (The trainer's batches are random draws of captions, not P x K identity sampling,
    so a one-person batch is rare but possible on small or skewed data.)

    text_feat, image_feat: B x E unnormalised; pids: B; margins: B (caption i's margin serves both
    directions of row i)."""
    s = _cosine_text_image(text_feat, image_feat)
    negative = pids[:, None] != pids[None, :]
    has_negative = negative.any(1)
    # -inf where j is no negative; a row without negatives gets 0 instead (then masked out of the mean)
    hardest_image = s.masked_fill(~negative, float("-inf")).amax(1)
    hardest_text = s.T.masked_fill(~negative, float("-inf")).amax(1)
    positive = s.diagonal()
    m = margins.to(s)
    zero = torch.zeros_like(positive)
    t2i = torch.where(has_negative, (m - positive + hardest_image).clamp_min(0), zero)
    i2t = torch.where(has_negative, (m - positive + hardest_text).clamp_min(0), zero)
    return (t2i + i2t).sum() / has_negative.sum().clamp_min(1)


def sew_compress(text_feat: torch.Tensor, image_feat: torch.Tensor, pids: torch.Tensor) -> torch.Tensor:
    """The sew proxy's compression of same-identity features (project's own formula after the seed's
    "compress same-identity features in the shared embedding space"; METHODS.md §6): with S as in
    `sew_hinge`,

        L = mean over the ordered pairs (i, j), i ≠ j, pid_i = pid_j of (1 − S_ij),

    i.e. every caption is pulled towards the *other* images of its person and, through (j, i), every
    image towards the person's other captions (the matching pair i = i is the hinge's business). A batch
    with no such pair gives 0 (attached to the graph)."""
    s = _cosine_text_image(text_feat, image_feat)
    same = (pids[:, None] == pids[None, :]) & ~torch.eye(len(pids), dtype=torch.bool, device=pids.device)
    return torch.where(same, 1 - s, torch.zeros_like(s)).sum() / same.sum().clamp_min(1)
