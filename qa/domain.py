"""Does the run's calibrator apply to this run's data? Checks that can see a new domain.

Consumes the calibrator (its `reference`: a sample of the fitting data's features with their labels, kept by
`miners.calibration.fit_calibrator`), a sample of this run's pairs (as `UnitMatches`, with their region
labels and reliabilities), the run's captions and the CLIP folder's vocabulary. Produces plain dicts, one
per check, each {"status": "pass" | "fail" | "unavailable", "why": one sentence, ...figures}:

- `two_sample_test`: the joint distribution of the calibrator's features here against the fitting data's,
  by a classifier two-sample test (a logistic regression on the features and their squares, told to tell
  this run's pairs from the fitting sample's; its held-out AUC and the Mann–Whitney p-value of that AUC). A per-feature mean check
  cannot see a new domain: a shift in how features go together, or in one body part's pairs, moves no
  mean by half a standard deviation. The fitting data's share of wrong pairs (the demo's calibrator is fitted
  with 20% known-wrong units) is not that of a run, so the reference is first resampled to the share of wrong
  pairs the calibrator itself predicts here (a label shift is allowed; anything else shows).
- `part_drop`: a body part whose pairs are almost all dropped here while the fitting data keeps a fair
  share of that part's pairs (the reliability the calibrator gives the reference rows, at the run's
  keep threshold);
- `vocabulary_coverage`: the share of caption words outside the CLIP tokenizer's vocabulary (they become
  `[UNK]`: the text tower never saw them), with the words.

`domain_checks` runs them all; `applies` is True only when every check ran and passed. The thresholds are
the project's own choices, parameters of each function.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from miners.calibration import Calibrator, feature_matrix, newton_logistic, sigmoid
from miners.matching import UnitMatches
from storage.schemas import BODY_PARTS

ALPHA = 0.001  # the two-sample test fails below this p-value ...
# ... and at or above this held-out AUC: with thousands of pairs a test finds any difference, and the demo's
# own fresh run differs from its calibrator's fitting data by AUC 0.54 (the calibrator applies there), while
# people drawn in another style reach 0.65 (tests/qa/test_domain.py). The project's own choice.
AUC_MAX = 0.6
MAX_ROWS = 5000  # this run's pairs in the two-sample test (drawn with a fixed seed)
MIN_ROWS = 50
CLASSIFIER_L2 = 1e-2
DROP_KEPT_MAX = 0.05  # a part "almost all dropped" keeps at most this share of its pairs here ...
DROP_REFERENCE_MIN = 0.25  # ... while the fitting data keeps at least this share
DROP_MIN_PAIRS = 20  # fewer pairs of a part say nothing
OOV_MAX = 0.01  # more than this share of caption word occurrences outside the vocabulary fails


def _design(z: np.ndarray) -> np.ndarray:
    """The classifier's inputs: the standardised features, the squares of the non-binary ones (a change of
    spread shows, not only of means), and an intercept."""
    binary = np.all(np.isin(np.round(z - z.min(0), 6), np.round([0.0, np.ptp(z, 0).max()], 6)), axis=0)
    cont = z[:, ~binary] if (~binary).any() else np.zeros((len(z), 0))
    return np.hstack([z, cont**2 - 1.0, np.ones((len(z), 1))])


def weighted_auc(score: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
    """P(score of a y=1 row > score of a y=0 row), rows weighted by w, ties counted half."""
    pos, neg = score[y == 1], score[y == 0]
    wp, wn = w[y == 1], w[y == 0]
    order = np.argsort(neg)
    neg, wn = neg[order], wn[order]
    cum = np.concatenate([[0.0], np.cumsum(wn)])
    below = cum[np.searchsorted(neg, pos, side="left")]
    tied = cum[np.searchsorted(neg, pos, side="right")] - below
    return float(np.sum(wp * (below + 0.5 * tied)) / (wp.sum() * wn.sum()))


def classifier_test(
    run_z: np.ndarray, ref_z: np.ndarray, ref_w: np.ndarray, l2: float = CLASSIFIER_L2, seed: int = 0
) -> tuple[float, float]:
    """(held-out AUC, one-sided p-value) of a classifier told to separate run rows from reference rows
    (a classifier two-sample test): two folds, each scored by the model fitted on the other. Under "same
    distribution" the AUC is 0.5 with variance (n₁ + n₂ + 1) / (12 n₁ n₂) (Mann–Whitney)."""
    x = _design(np.vstack([run_z, ref_z]))
    y = np.concatenate([np.ones(len(run_z)), np.zeros(len(ref_z))])
    w = np.concatenate([np.ones(len(run_z)), ref_w * (len(ref_w) / ref_w.sum())])
    fold = np.random.default_rng(seed).permutation(len(y)) % 2
    score = np.zeros(len(y))
    for k in (0, 1):
        theta = newton_logistic(x[fold != k], y[fold != k], w[fold != k], l2)
        score[fold == k] = x[fold == k] @ theta
    auc = weighted_auc(score, y, w)
    n1 = float(len(run_z))
    n2 = float(w[y == 0].sum() ** 2 / np.sum(w[y == 0] ** 2))  # the weighted sample's effective size
    z = (auc - 0.5) / np.sqrt((n1 + n2 + 1) / (12 * n1 * n2))
    return auc, float(0.5 * math.erfc(z / math.sqrt(2)))


def two_sample_test(
    cal: Calibrator,
    matches: UnitMatches,
    alpha: float = ALPHA,
    max_rows: int = MAX_ROWS,
    seed: int = 0,
    auc_max: float = AUC_MAX,
) -> dict[str, Any]:
    """Are this run's calibrator features drawn like the fitting data's (up to the share of wrong pairs)?"""
    ref = cal.reference
    if not ref or not ref.get("x"):
        return {
            "status": "unavailable",
            "why": "the calibrator keeps no sample of its fitting data (fitted before this check existed, "
            "or the default prior): refit it to make this check possible",
        }
    try:
        run_x = feature_matrix(matches, cal.features)
    except ValueError as exc:
        return {"status": "unavailable", "why": str(exc)}
    ref_x = np.asarray(ref["x"], dtype=np.float64)
    ref_y = np.asarray(ref["correct"], dtype=bool)
    ref_w = np.asarray(ref.get("weight") or np.ones(len(ref_y)), dtype=np.float64)
    if min(len(run_x), len(ref_x)) < MIN_ROWS:
        return {
            "status": "unavailable",
            "why": f"only {min(len(run_x), len(ref_x))} pairs to compare ({MIN_ROWS} needed)",
        }
    # The share of correct pairs the calibrator claims here; the reference is reweighted to it (label shift)
    claimed = float(np.mean(cal.predict(matches)))
    share_ref = float(np.average(ref_y, weights=ref_w))
    w = ref_w * np.where(ref_y, claimed / max(share_ref, 1e-9), (1 - claimed) / max(1 - share_ref, 1e-9))
    pick = np.random.default_rng(seed).permutation(len(run_x))[:max_rows]
    scale = np.where(cal.std > 0, cal.std, 1.0)
    run_z, ref_z = (run_x[pick] - cal.mean) / scale, (ref_x - cal.mean) / scale
    auc, p = classifier_test(run_z, ref_z, w, seed=seed)
    # Which features differ most, to say where to look (the test itself is on the joint distribution)
    diff = np.abs(run_z.mean(0) - np.average(ref_z, axis=0, weights=w))
    top = [f"{cal.features[i]} ({diff[i]:.2f} sd)" for i in np.argsort(-diff)[:3]]
    ok = p >= alpha or auc < auc_max
    test = f"a classifier tells them apart with held-out AUC {auc:.3f} on {len(pick)}+{len(ref_x)} pairs, p = {p:.2g}"
    return {
        "status": "pass" if ok else "fail",
        "p_value": round(p, 6),
        "auc": round(auc, 4),
        "pairs_compared": [int(len(pick)), int(len(ref_x))],
        "correct_share_claimed": round(claimed, 3),
        "correct_share_reference": round(share_ref, 3),
        "why": (
            f"the joint distribution of the calibrator's {len(cal.features)} features here is consistent with "
            f"its fitting data ({test}: " + (f"≥ {alpha})" if p >= alpha else f"AUC below {auc_max})")
            if ok
            else f"this run's pairs are not drawn like the calibrator's fitting data ({test} < {alpha}, AUC ≥ "
            f"{auc_max}; "
            f"furthest apart: {', '.join(top)})"
        ),
    }


def part_drop(
    cal: Calibrator,
    region_label: list[str],
    kept: np.ndarray,
    keep_threshold: float | None,
    kept_max: float = DROP_KEPT_MAX,
    reference_min: float = DROP_REFERENCE_MIN,
    min_pairs: int = DROP_MIN_PAIRS,
) -> dict[str, Any]:
    """A body part whose pairs are almost all dropped here but kept in a fair share on the fitting data."""
    ref = cal.reference
    labels = [f"label_{p}" for p in BODY_PARTS]
    if not ref or not ref.get("x") or keep_threshold is None or not all(n in cal.features for n in labels):
        return {
            "status": "unavailable",
            "why": "needs the calibrator's fitting sample with its body-part features and the keep threshold",
        }
    ref_x = np.asarray(ref["x"], dtype=np.float64)
    z = (ref_x - cal.mean) / np.where(cal.std > 0, cal.std, 1.0)
    ref_kept = sigmoid(z @ cal.coef + cal.intercept) >= keep_threshold
    labels_here = np.asarray(region_label, dtype=object)
    kept = np.asarray(kept, dtype=bool)
    rates, dropped = {}, []
    for part in BODY_PARTS:
        here = labels_here == part
        in_ref = ref_x[:, cal.features.index(f"label_{part}")] > 0.5
        if here.sum() < min_pairs or in_ref.sum() < min_pairs:
            continue
        rate, rate_ref = float(kept[here].mean()), float(ref_kept[in_ref].mean())
        rates[part] = {
            "kept_here": round(rate, 3),
            "kept_reference": round(rate_ref, 3),
            "pairs": int(here.sum()),
        }
        if rate <= kept_max and rate_ref >= reference_min:
            dropped.append(
                f"{part} ({int(here.sum())} pairs, {rate:.0%} kept here, {rate_ref:.0%} on the fitting data)"
            )
    return {
        "status": "fail" if dropped else "pass",
        "kept_rate_by_part": rates,
        "why": (
            "almost every pair of a part the fitting data keeps is dropped here: " + "; ".join(dropped)
            if dropped
            else f"no body part is almost all dropped (kept ≤ {kept_max:.0%}) where the fitting data keeps it"
        ),
    }


def _words(text: str) -> list[str]:
    """Lower-cased words as a whitespace-and-punctuation pre-tokenizer splits them (`\\w+|[^\\w\\s]+`, the
    tiny CLIP's `Whitespace`): "t-shirt" is "t", "-", "shirt"; punctuation is dropped."""
    return [w for w in re.findall(r"\w+|[^\w\s]+", text.lower()) if re.match(r"\w", w)]


def caption_words(captions: list[str]) -> Counter:
    """Word occurrences of the captions, lower-cased and split as the CLIP's tokenizer splits them."""
    return Counter(w for c in captions for w in _words(c))


def clip_vocabulary(clip_dir: str | Path) -> set[str] | None:
    """The word-level vocabulary of a CLIP folder's tokenizer (tokenizer.json of a WordLevel model, as the
    tiny CLIP's); None for a subword tokenizer (BPE: no word is out of its vocabulary) or no tokenizer."""
    path = Path(clip_dir) / "tokenizer.json"
    try:
        model = json.loads(path.read_text()).get("model", {})
    except (OSError, ValueError):
        return None
    if model.get("type") != "WordLevel":
        return None
    return {w for w in model.get("vocab", {}) if not (w.startswith("[") and w.endswith("]"))}


def vocabulary_coverage(
    captions: list[str], vocab: set[str] | None, oov_max: float = OOV_MAX
) -> dict[str, Any]:
    """The share of caption word occurrences (and distinct words) inside the CLIP's vocabulary."""
    if vocab is None:
        return {
            "status": "unavailable",
            "why": "the CLIP's tokenizer is not word-level (no word is unknown to it)",
        }
    words = caption_words(captions)
    if not words:
        return {"status": "unavailable", "why": "no caption words"}
    unknown = {w: n for w, n in words.items() if w not in vocab}
    share = sum(unknown.values()) / sum(words.values())
    listed = sorted(unknown, key=lambda w: (-unknown[w], w))
    ok = share <= oov_max
    return {
        "status": "pass" if ok else "fail",
        "distinct_words": len(words),
        "unknown_distinct": len(unknown),
        "unknown_share_occurrences": round(share, 4),
        "unknown_words": listed[:20],
        "why": (
            f"{len(words) - len(unknown)} of {len(words)} distinct caption words are in the CLIP's vocabulary"
            + (f" ({len(unknown)} outside: {', '.join(listed[:10])})" if unknown else "")
            + ("" if ok else f"; {share:.1%} of word occurrences become [UNK] (more than {oov_max:.0%})")
        ),
    }


def domain_checks(
    cal: Calibrator,
    matches: UnitMatches,
    kept: np.ndarray,
    keep_threshold: float | None,
    vocabulary: dict[str, Any] | None,
) -> dict[str, Any]:
    """Every check of this module, and `applies`: True only when all ran and passed (`vocabulary`: the
    result of `vocabulary_coverage` on the run's captions, None when they are not readable)."""
    checks = {
        "two_sample": two_sample_test(cal, matches),
        "part_drop": part_drop(cal, list(matches.region_label), kept, keep_threshold),
        "vocabulary": vocabulary
        or {"status": "unavailable", "why": "the run's captions are not readable (manifest gone)"},
    }
    failed = [k for k, c in checks.items() if c["status"] == "fail"]
    missing = [k for k, c in checks.items() if c["status"] == "unavailable" and k != "vocabulary"]
    applies = not failed and not missing
    reasons = [checks[k]["why"] for k in failed] or [checks[k]["why"] for k in missing]
    return {
        "applies": applies,
        "checks": checks,
        "why": (
            "checked here: " + "; ".join(c["why"] for c in checks.values() if c["status"] == "pass")
            if applies
            else "; ".join(reasons)
        ),
    }


__all__ = [
    "caption_words",
    "clip_vocabulary",
    "domain_checks",
    "classifier_test",
    "part_drop",
    "two_sample_test",
    "vocabulary_coverage",
    "weighted_auc",
]
