"""Region-to-sentence matching: from a units x regions cosine matrix to one scored pair per unit.

Consumes, per caption, the CLIP cosine matrix (S units x R regions), each unit's lexical body-part tags,
and each region's body-part label and quality; produces, for every unit, its chosen region and the
features the reliability calibrator reads:
- `clip_cosine`; `softmax_prob` over the image's regions at a low temperature; `margin` to the
  runner-up region; `mutual_best` (the region also prefers this unit over the caption's other units);
- `part_agreement` (1 the region's label is among the unit's part words, 0 it contradicts them,
  0.5 unknown: no part words or an unlabelled region); `has_part_words`; `region_quality`; the region's label.
Modes: `clip` picks by cosine, `lexical` by part agreement (quality breaks ties), `combined` by cosine
plus a lexical bonus large enough that a region of the named part wins and CLIP chooses among those.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

MATCH_MODES = ("clip", "lexical", "combined")


@dataclass(frozen=True)
class MatchConfig:
    mode: str = "combined"
    softmax_temperature: float = 0.05
    lexical_bonus: float = 1.0  # cosines live in [-1, 1]: 1.0 makes lexical agreement decide first
    keep_threshold: float = 0.5  # on reliability


@dataclass
class UnitMatches:
    """Row-aligned arrays, one entry per unit (S)."""

    region_index: np.ndarray  # S int
    clip_cosine: np.ndarray
    softmax_prob: np.ndarray
    margin: np.ndarray
    mutual_best: np.ndarray  # S bool
    part_agreement: np.ndarray
    has_part_words: np.ndarray  # S bool
    region_quality: np.ndarray
    region_label: list[str | None]  # S: the chosen region's body-part label
    # Content against the reference bank (miners.bank); None when the miner has no bank.
    bank_region_z: np.ndarray | None = field(default=None)
    bank_sentence_z: np.ndarray | None = field(default=None)
    # The attribute probes (miners.attribute_probe); None when one is off.
    colour_logit: np.ndarray | None = field(default=None)
    garment_logit: np.ndarray | None = field(default=None)


def part_agreement_matrix(unit_tags: list[tuple[str, ...]], region_labels: list[str | None]) -> np.ndarray:
    """S x R: 1 agree, 0 contradict, 0.5 unknown."""
    out = np.full((len(unit_tags), len(region_labels)), 0.5, dtype=np.float32)
    for s, tags in enumerate(unit_tags):
        if not tags:
            continue
        for r, label in enumerate(region_labels):
            if label is not None:
                out[s, r] = 1.0 if label in tags else 0.0
    return out


def match_units(
    cosine: np.ndarray,
    unit_tags: list[tuple[str, ...]],
    region_labels: list[str | None],
    region_quality: np.ndarray,
    cfg: MatchConfig,
) -> UnitMatches:
    if cfg.mode not in MATCH_MODES:
        raise ValueError(f"match mode {cfg.mode!r}: use one of {MATCH_MODES}")
    cos = np.asarray(cosine, dtype=np.float32)
    n_units, n_regions = cos.shape
    quality = np.asarray(region_quality, dtype=np.float32)
    agree = part_agreement_matrix(unit_tags, region_labels)
    if cfg.mode == "clip":
        selection = cos
    elif cfg.mode == "lexical":
        selection = agree + 1e-3 * quality[None, :]
    else:
        selection = cos + cfg.lexical_bonus * (agree - 0.5) * 2.0
    best = selection.argmax(axis=1) if n_regions else np.zeros(n_units, dtype=np.int64)
    rows = np.arange(n_units)

    # Softmax over the image's regions at a low temperature: how peaked CLIP's preference is.
    logits = cos / cfg.softmax_temperature
    logits = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    chosen_cos = cos[rows, best]
    if n_regions > 1:
        others = cos.copy()
        others[rows, best] = -np.inf
        margin = chosen_cos - others.max(axis=1)
    else:
        margin = np.zeros(n_units, dtype=np.float32)
    # Mutual best: among the caption's units, the chosen region likes this one most.
    best_unit_of_region = cos.argmax(axis=0)
    mutual = best_unit_of_region[best] == rows
    return UnitMatches(
        region_index=best.astype(np.int64),
        clip_cosine=chosen_cos.astype(np.float32),
        softmax_prob=probs[rows, best].astype(np.float32),
        margin=margin.astype(np.float32),
        mutual_best=mutual,
        part_agreement=agree[rows, best],
        has_part_words=np.array([bool(t) for t in unit_tags], dtype=bool),
        region_quality=quality[best],
        region_label=[region_labels[int(r)] for r in best] if n_regions else [None] * n_units,
    )
