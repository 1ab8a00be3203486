"""Retrieval and calibration metrics — the one implementation shared by training evaluation and QA.

Consumes similarity matrices / scores with person ids or labels; produces plain dicts of floats.
`retrieval_metrics` follows IRRA's evaluation: relevant = same person id; CMC capped at 1 per
query; AP averages precision at every hit position; mINP = (number of hits) / (rank of the last hit).
"""

from __future__ import annotations

import numpy as np

# Query rows ranked at once: bounds the working memory to about 41 bytes x QUERY_CHUNK x gallery size
# (the rank order, matches, running hit counts and precisions of one chunk; 208 MB at 256 x 19,848), so a
# CUHK-PEDES- or ICFG-PEDES-sized test needs little beyond the similarity matrix itself
QUERY_CHUNK = 256


def retrieval_metrics(
    similarity: np.ndarray,
    query_pids: np.ndarray,
    gallery_pids: np.ndarray,
    ranks: tuple[int, ...] = (1, 5, 10),
    chunk: int = QUERY_CHUNK,
) -> dict[str, float]:
    """Text→image retrieval metrics in percent.

    similarity: Q x G (higher = more similar); query_pids: Q; gallery_pids: G.
    Returns {"R1", "R5", "R10", "mAP", "mINP"} (keys follow `ranks`). Ties are broken by gallery
    order (stable sort), so results are deterministic. Every query needs at least one relevant
    gallery item, as in the benchmarks' protocols; otherwise ValueError. Queries are ranked `chunk`
    rows at a time (float64 per chunk): the figures do not depend on `chunk`, the memory does.
    """
    sim_all = np.asarray(similarity)
    q_pids = np.asarray(query_pids).reshape(-1)
    g_pids = np.asarray(gallery_pids).reshape(-1)
    if sim_all.shape != (q_pids.size, g_pids.size):
        raise ValueError(f"similarity is {sim_all.shape}, expected ({q_pids.size}, {g_pids.size})")
    if sim_all.size == 0:
        raise ValueError("empty similarity matrix")
    n_gallery = sim_all.shape[1]
    positions = np.arange(1, n_gallery + 1)
    hit_at = {k: [] for k in ranks}
    ap, inp = [], []
    for start in range(0, q_pids.size, max(1, chunk)):
        stop = min(q_pids.size, start + max(1, chunk))
        sim = sim_all[start:stop].astype(np.float64, copy=False)
        order = np.argsort(-sim, axis=1, kind="stable")
        matches = g_pids[order] == q_pids[start:stop, None]  # rows x G, in rank order
        num_rel = matches.sum(axis=1)
        if (num_rel == 0).any():
            bad = start + int(np.flatnonzero(num_rel == 0)[0])
            raise ValueError(f"query {bad} (pid {q_pids[bad]}) has no relevant gallery item")
        hits_cum = np.cumsum(matches, axis=1)
        for k in ranks:
            hit_at[k].append(hits_cum[:, min(k, n_gallery) - 1] > 0)
        ap.append((hits_cum / positions * matches).sum(axis=1) / num_rel)
        last_hit_rank = n_gallery - np.argmax(matches[:, ::-1], axis=1)
        inp.append(num_rel / last_hit_rank)
    out: dict[str, float] = {f"R{k}": float(np.concatenate(hit_at[k]).mean() * 100) for k in ranks}
    out["mAP"] = float(np.concatenate(ap).mean() * 100)
    out["mINP"] = float(np.concatenate(inp).mean() * 100)
    return out


def expected_calibration_error(
    probs: np.ndarray, labels: np.ndarray, n_bins: int = 15, weights: np.ndarray | None = None
) -> tuple[float, list[dict[str, float]]]:
    """ECE with equal-width bins on [0, 1], and the per-bin table for a reliability diagram.

    probs: N predicted probabilities of being correct; labels: N booleans (correct or not); weights:
    optional N sample weights (an audit sample's 1/π), which weigh bin shares, means and accuracies.
    Returns (ece, bins) where each bin has lo, hi, count, mean_prob, accuracy.
    """
    p = np.asarray(probs, dtype=np.float64).reshape(-1)
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    if p.size != y.size:
        raise ValueError(f"{p.size} probabilities vs {y.size} labels")
    if p.size == 0:
        return float("nan"), []
    w = np.ones_like(p) if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.size != p.size:
        raise ValueError(f"{w.size} weights vs {p.size} probabilities")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.digitize(p, edges[1:-1], right=True), 0, n_bins - 1)
    ece = 0.0
    bins = []
    for b in range(n_bins):
        in_bin = idx == b
        count = int(in_bin.sum())
        if count == 0:
            bins.append(
                {"lo": edges[b], "hi": edges[b + 1], "count": 0, "mean_prob": np.nan, "accuracy": np.nan}
            )
            continue
        mean_p = float(np.average(p[in_bin], weights=w[in_bin]))
        acc = float(np.average(y[in_bin], weights=w[in_bin]))
        ece += w[in_bin].sum() / w.sum() * abs(mean_p - acc)
        bins.append(
            {"lo": edges[b], "hi": edges[b + 1], "count": count, "mean_prob": mean_p, "accuracy": acc}
        )
    return float(ece), bins


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (probability a positive outscores a negative; ties count half)."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels, dtype=bool).reshape(-1)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    # Mid-ranks: tied scores share the average of the ranks they span.
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2.0)[inverse]
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))
