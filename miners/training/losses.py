"""The field's training losses for text-based person search, as pure functions of features and identities.

Consumes row-aligned projections of a batch (`text_feat` and `image_feat`, B x E, *unnormalised*; row i
of each is a matching caption–image pair, several rows may share a person id), the person ids (B, long)
and the model's learned logit scale; produces one scalar loss. No model and no data loader inside (IRRA's
`objectives.py` style): a trainer looks a global loss up by name in `GLOBAL_LOSSES` and passes every entry
the same four arguments; `USES_LOGIT_SCALE` says which entries read the learned scale (the others have a
fixed temperature or none, and ignore it).

Also here: IRRA's ID loss (`id_loss`, logits from one shared classifier) and its masked-language-model
loss (`mlm_loss`, scores from miners.training.heads.CrossModalMLM).

Sources: /work/shared/METHODS.md §1 (IRRA: SDM, ID, IRR) and §4 (IVT: CMPM), read from the authors' code.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from miners.training.config import GLOBAL_LOSS_NAMES

# IRRA's fixed SDM temperature (options `--temperature 0.02`, i.e. a constant logit scale of 50)
IRRA_SDM_TEMPERATURE = 0.02
# Added to the label distribution before its log (IRRA and IVT both use 1e-8), so log(0) never occurs
LABEL_EPS = 1e-8


def _label_distribution(pids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """B x B, row i = uniform over the rows sharing row i's person id; in the features' `dtype`, at least
    float32 (a half-precision q would lose the 1e-8 added before its log)."""
    same = (pids[:, None] == pids[None, :]).to(torch.promote_types(dtype, torch.float32))
    return same / same.sum(1, keepdim=True)


def _kl_to_labels(logits: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """mean_i Σ_j p_ij (log p_ij − log(q_ij + eps)), p = softmax(logits) along rows: KL(p‖q), the model's
    distribution first, as IRRA's SDM and Zhang & Lu's CMPM."""
    log_p = F.log_softmax(logits, 1)
    return (log_p.exp() * (log_p - torch.log(q + LABEL_EPS))).sum(1).mean()


def identity_infonce(
    text_feat: torch.Tensor, image_feat: torch.Tensor, pids: torch.Tensor, logit_scale: torch.Tensor | float
) -> torch.Tensor:
    """Identity-aware InfoNCE: cross-entropy of softmax(scale · t̂ v̂ᵀ) against the uniform distribution
    over same-person rows, text→image and image→text averaged. Several captions or images of one person
    are all positives, unlike CLIP's InfoNCE (`itc`). The project's default global loss (formerly
    `trainer.identity_aware_loss`, which took already-normalised embeddings; this one normalises)."""
    t, v = F.normalize(text_feat, dim=-1), F.normalize(image_feat, dim=-1)
    sim = logit_scale * t @ v.T
    q = _label_distribution(pids, sim.dtype)  # symmetric pattern: the same rows serve both directions
    t2i = -(q * F.log_softmax(sim, 1)).sum(1).mean()
    i2t = -(q * F.log_softmax(sim.T, 1)).sum(1).mean()
    return (t2i + i2t) / 2


def sdm(
    text_feat: torch.Tensor,
    image_feat: torch.Tensor,
    pids: torch.Tensor,
    logit_scale: torch.Tensor | float | None = None,
    *,
    temperature: float = IRRA_SDM_TEMPERATURE,
) -> torch.Tensor:
    """IRRA's similarity distribution matching: with s_ij = cos(v_i, t_j), p^{i2t}_i = softmax_j(s_ij/τ),
    p^{t2i}_i = softmax_j(s_ji/τ) and q_ij = 1[pid_i = pid_j] / Σ_k 1[pid_i = pid_k],

        L = mean_i KL(p^{i2t}_i ‖ q_i) + mean_i KL(p^{t2i}_i ‖ q_i),  log(q + 1e-8),

    the two directions **summed** (IRRA's `compute_sdm`), not averaged, so its scale is about twice an
    averaged loss's. τ is IRRA's **fixed** 0.02: `logit_scale` (the model's learned scale) is accepted
    for the uniform signature and ignored, as in IRRA; pass `temperature` to change τ.

    Value ≥ −log(1 + B·1e-8) ≈ 0 (a KL, up to the eps added to q)."""
    del logit_scale  # IRRA's temperature is a constant, not the learned one
    v, t = F.normalize(image_feat, dim=-1), F.normalize(text_feat, dim=-1)
    cos_it = v @ t.T  # B x B, image i against text j
    q = _label_distribution(pids, cos_it.dtype)
    return _kl_to_labels(cos_it / temperature, q) + _kl_to_labels(cos_it.T / temperature, q)


def itc(
    text_feat: torch.Tensor, image_feat: torch.Tensor, pids: torch.Tensor, logit_scale: torch.Tensor | float
) -> torch.Tensor:
    """CLIP's InfoNCE: cross-entropy of softmax(scale · t̂ v̂ᵀ) against labels arange(B), t2i and i2t
    averaged. Every other row is a negative even when it shows the same person (`pids` is accepted for
    the uniform signature and ignored)."""
    del pids  # instance discrimination: identity is not used
    t, v = F.normalize(text_feat, dim=-1), F.normalize(image_feat, dim=-1)
    sim = logit_scale * t @ v.T
    target = torch.arange(len(sim), device=sim.device)
    return (F.cross_entropy(sim, target) + F.cross_entropy(sim.T, target)) / 2


def cmpm(
    text_feat: torch.Tensor,
    image_feat: torch.Tensor,
    pids: torch.Tensor,
    logit_scale: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Cross-modal projection matching (Zhang & Lu, ECCV 2018; IVT's only fine-tuning loss): the
    *unnormalised* image feature is projected on the normalised text features, p_ij = softmax_j(v_i · t̂_j)
    (no temperature: the feature norm plays its role), and

        L = mean_i Σ_j p_ij (log p_ij − log(q_ij + 1e-8)) + the same for text→image (t_i · v̂_j),

    the two directions summed (as IVT's `cmps_loss.py`). q_ij = 1[pid_i = pid_j] / Σ_k 1[pid_i = pid_k] is
    a proper distribution. IVT's released code divides by the L2 norm of the label row instead (q is then
    not a distribution when a person has several rows in the batch); that quirk is not followed.
    `logit_scale` is accepted for the uniform signature and ignored."""
    del logit_scale  # CMPM has no temperature
    q = _label_distribution(pids, image_feat.dtype)
    image_on_text = image_feat @ F.normalize(text_feat, dim=-1).T  # B x B
    text_on_image = text_feat @ F.normalize(image_feat, dim=-1).T
    return _kl_to_labels(image_on_text, q) + _kl_to_labels(text_on_image, q)


GlobalLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | float], torch.Tensor]

# name → fn(text_feat, image_feat, pids, logit_scale) -> scalar; the trainer knows only these names
GLOBAL_LOSSES: dict[str, GlobalLoss] = {
    "identity-infonce": identity_infonce,
    "sdm": sdm,  # fixed τ = 0.02 (IRRA); ignores logit_scale
    "itc": itc,
    "cmpm": cmpm,  # no temperature; ignores logit_scale
}
assert tuple(GLOBAL_LOSSES) == GLOBAL_LOSS_NAMES, "miners.training.config lists the global losses"
# The entries whose value depends on the learned logit scale (the others ignore the argument)
USES_LOGIT_SCALE: frozenset[str] = frozenset({"identity-infonce", "itc"})


def id_loss(image_logits: torch.Tensor, text_logits: torch.Tensor, pids: torch.Tensor) -> torch.Tensor:
    """IRRA's ID loss, ½[CE(image_logits, pids) + CE(text_logits, pids)]: both B x C logits come from one
    shared classifier (miners.training.heads.IdentityClassifier) on the unnormalised global features.
    `pids` are class indices 0..C−1 (map raw person ids with heads.pid_classes first)."""
    return (F.cross_entropy(image_logits, pids) + F.cross_entropy(text_logits, pids)) / 2


def mlm_loss(scores: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Masked-language-model loss: mean cross-entropy of `scores` (N x T x V) over the positions whose
    `labels` (N x T, long) is not `ignore_index` (heads.mask_tokens marks unselected positions -100).

    A batch with no masked position gives 0, still attached to the graph (a zero gradient, never NaN —
    PyTorch's mean cross-entropy over zero targets is 0/0)."""
    flat_scores, flat_labels = scores.reshape(-1, scores.shape[-1]), labels.reshape(-1)
    total = F.cross_entropy(flat_scores, flat_labels, ignore_index=ignore_index, reduction="sum")
    # Dividing by max(count, 1) keeps the empty case finite without a host sync on the count
    count = (flat_labels != ignore_index).sum().clamp_min(1)
    return total / count


def mlm_token_losses(scores: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """The cross-entropy of each masked position (a vector, in the order of the positions): `mlm_loss` is
    its mean. For several processes, whose masked tokens differ in number, gather these and average."""
    flat_scores, flat_labels = scores.reshape(-1, scores.shape[-1]), labels.reshape(-1)
    keep = flat_labels != ignore_index
    return F.cross_entropy(flat_scores[keep], flat_labels[keep], reduction="none")
