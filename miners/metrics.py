"""Retrieval and calibration metrics — the one implementation shared by training evaluation and QA.

Consumes similarity matrices / scores with person ids or labels; produces plain dicts of floats.
`retrieval_metrics` follows IRRA's evaluation: relevant = same person id; CMC capped at 1 per
query; AP averages precision at every hit position; mINP = (number of hits) / (rank of the last hit).
It ranks in torch on the similarity's own device (numpy arrays are viewed, not copied); the rest is numpy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

# Query rows ranked at once: bounds the working memory to about 33 bytes x QUERY_CHUNK x gallery size
# (one chunk's negated scores, the sort's values and int64 order, the gallery codes in rank order and the
# matches; 168 MB at 256 x 19,848 float64, 128 MB float32), so a CUHK-PEDES- or ICFG-PEDES-sized test
# needs little beyond the similarity matrix itself
QUERY_CHUNK = 256

# Mean relevant items per query up to which a chunk's ranks are counted (each relevant item against its
# row: about 5 elementwise passes over G per item) rather than sorted (a full sort of every row, 10-20x an
# elementwise pass per item on CPU); person search has a few images per person (ICFG-PEDES ~6). The
# threshold is the project's own, from a CPU timing at 2,000 x 2,000
COUNT_MAX_RELEVANT = 16


def retrieval_metrics(
    similarity: np.ndarray | torch.Tensor,
    query_pids: np.ndarray,
    gallery_pids: np.ndarray,
    ranks: tuple[int, ...] = (1, 5, 10),
    chunk: int = QUERY_CHUNK,
) -> dict[str, float]:
    """Text→image retrieval metrics in percent.

    similarity: Q x G (higher = more similar), a numpy array or a torch tensor (CPU or CUDA: ranked on
    its device, so a GPU evaluation never copies the Q x G matrix to the host); query_pids: Q;
    gallery_pids: G (numpy arrays or tensors of any comparable dtype).
    Returns {"R1", "R5", "R10", "mAP", "mINP"} (keys follow `ranks`, each ≥ 1). Ties are broken by
    gallery order (stable sort), so results are deterministic; NaN scores rank last. Every query needs at
    least one relevant gallery item, as in the benchmarks' protocols; otherwise ValueError. Queries are
    ranked `chunk` rows at a time (precisions in float64): the figures do not depend on `chunk` (on CUDA,
    up to the last bits of a float64 sum), the memory does. A chunk's hit ranks come from a stable sort of
    its rows or, with few relevant items per query (`COUNT_MAX_RELEVANT`) and no NaN, from counting the
    items ahead of each relevant one: the same ranks, found faster.
    """
    import torch  # here, not at the top: QA and the flow driver import this module without torch

    sim_all = similarity.detach() if isinstance(similarity, torch.Tensor) else np.asarray(similarity)
    q_pids, g_pids = _pids_numpy(query_pids), _pids_numpy(gallery_pids)
    if tuple(sim_all.shape) != (q_pids.size, g_pids.size):
        raise ValueError(f"similarity is {tuple(sim_all.shape)}, expected ({q_pids.size}, {g_pids.size})")
    if q_pids.size * g_pids.size == 0:
        raise ValueError("empty similarity matrix")
    if any(int(k) < 1 for k in ranks):
        raise ValueError(f"ranks must be ≥ 1, got {tuple(ranks)}")
    # Person ids as integer codes (any dtype: equal ids get equal codes), so ranking needs only int tensors
    _, codes = np.unique(np.concatenate([q_pids, g_pids]), return_inverse=True, equal_nan=False)
    q_codes, g_codes = codes[: q_pids.size], codes[q_pids.size :]
    num_rel = np.bincount(g_codes, minlength=codes.max() + 1)[q_codes]  # relevant items per query
    if (num_rel == 0).any():
        bad = int(np.flatnonzero(num_rel == 0)[0])
        raise ValueError(f"query {bad} (pid {q_pids[bad]}) has no relevant gallery item")

    device = sim_all.device if isinstance(sim_all, torch.Tensor) else torch.device("cpu")
    n_query = q_pids.size
    q_codes_t = torch.from_numpy(q_codes.astype(np.int64)).to(device)
    g_codes_t = torch.from_numpy(g_codes.astype(np.int32)).to(device)  # int32: 4 B per ranked item
    num_rel_t = torch.from_numpy(num_rel.astype(np.int64)).to(device)
    first_rank = torch.empty(n_query, dtype=torch.int64, device=device)
    ap = torch.empty(n_query, dtype=torch.float64, device=device)
    inp = torch.empty(n_query, dtype=torch.float64, device=device)
    # Each kind's gallery indices, grouped: the relevant items of a query without a pass over the gallery
    by_code = np.argsort(g_codes, kind="stable")
    code_start = np.concatenate([[0], np.cumsum(np.bincount(g_codes, minlength=codes.max() + 1))])
    step = max(1, chunk)
    for start in range(0, n_query, step):
        stop = min(n_query, start + step)
        key = _sort_key(_rows(sim_all, start, stop))  # rows x G, ascending = best first
        has_nan = bool(torch.isnan(key).any())
        if not has_nan and num_rel[start:stop].sum() <= COUNT_MAX_RELEVANT * (stop - start):
            rel_np = num_rel[start:stop]
            pair_row = np.repeat(np.arange(stop - start), rel_np)
            within = np.arange(pair_row.size) - np.repeat(np.cumsum(rel_np) - rel_np, rel_np)
            pair_item = by_code[np.repeat(code_start[q_codes[start:stop]], rel_np) + within]
            hit_row, hit_col = _hits_by_counting(key, pair_row, pair_item, block=step)
        else:
            order = _rank_order(key, has_nan)  # rows x G gallery indices, best first
            del key
            matches = g_codes_t[order] == q_codes_t[start:stop, None]  # rows x G, in rank order
            del order
            # Only the hits matter: row-major nonzero lists each query's hits in rank order
            hit_row, hit_col = matches.nonzero(as_tuple=True)
            del matches
        rel = num_rel_t[start:stop]
        row_first = torch.cumsum(rel, 0) - rel  # index of each query's first hit in hit_row
        hit_number = torch.arange(hit_row.numel(), device=device) - row_first[hit_row] + 1  # 1, 2, ...
        precision = hit_number.to(torch.float64) / (hit_col + 1).to(torch.float64)
        ap_sum = torch.zeros(stop - start, dtype=torch.float64, device=device)
        ap_sum.index_add_(0, hit_row, precision)
        ap[start:stop] = ap_sum / rel
        first_rank[start:stop] = hit_col[row_first] + 1
        inp[start:stop] = rel.to(torch.float64) / (hit_col[row_first + rel - 1] + 1).to(torch.float64)
    first_rank_np = first_rank.cpu().numpy()
    out: dict[str, float] = {f"R{k}": float((first_rank_np <= k).mean() * 100) for k in ranks}
    out["mAP"] = float(ap.cpu().numpy().mean() * 100)
    out["mINP"] = float(inp.cpu().numpy().mean() * 100)
    return out


def _pids_numpy(pids) -> np.ndarray:
    """Person ids as a flat numpy array (tensors are small: Q or G ids, copied to the host)."""
    if hasattr(pids, "detach"):  # a torch tensor, without importing torch for numpy callers
        pids = pids.detach().cpu().numpy()
    return np.asarray(pids).reshape(-1)


def _rows(sim_all: np.ndarray | torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Rows start:stop as a float32 or float64 tensor on the matrix's device; only this chunk is copied
    (a non-contiguous or non-float numpy chunk), never the whole matrix."""
    import torch

    rows = sim_all[start:stop]
    if isinstance(rows, torch.Tensor):
        return rows if rows.dtype in (torch.float32, torch.float64) else rows.to(torch.float64)
    if rows.dtype not in (np.float32, np.float64):  # ints, bools, float16, non-native byte order
        rows = rows.astype(np.float64)
    if any(stride < 0 for stride in rows.strides):  # torch views no negative strides (a reversed view)
        rows = np.ascontiguousarray(rows)
    return torch.from_numpy(rows)


def _sort_key(rows: torch.Tensor) -> torch.Tensor:
    """-score as a contiguous tensor (also for a transposed matrix's rows), with -0.0 made +0.0 so that the
    two zeros tie whichever sort the device uses. Ascending key = numpy's `argsort(-scores, kind="stable")`
    which this replaces; float32 scores are not widened: the order is the same (widening is exact)."""
    import torch

    key = torch.empty(rows.shape, dtype=rows.dtype, device=rows.device)
    torch.neg(rows, out=key)
    return key.add_(0.0)  # -0.0 + 0.0 = +0.0


def _rank_order(key: torch.Tensor, has_nan: bool) -> torch.Tensor:
    """Gallery indices of each row by ascending key; ties in gallery order; NaN last (numpy's rule). NaN
    keys go after +inf by a second stable pass on the NaN flag, as torch's NaN placement may vary by device."""
    import torch

    if not has_nan:
        return torch.argsort(key, dim=1, stable=True)
    nan = torch.isnan(key)
    order = torch.argsort(key.masked_fill(nan, float("inf")), dim=1, stable=True)
    nan_in_order = torch.gather(nan, 1, order).to(torch.uint8)
    return torch.gather(order, 1, torch.argsort(nan_in_order, dim=1, stable=True))


def _hits_by_counting(
    key: torch.Tensor, pair_row: np.ndarray, pair_item: np.ndarray, block: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (query row, relevant gallery item) pair's 0-based rank, without sorting the row: the number of
    items with a smaller key, plus the tied ones earlier in the gallery (the stable sort's tie rule). Key
    must have no NaN. Pairs are compared `block` at a time (block x G intermediates). Returns the hits as
    `nonzero` on the ranked matches would: (row, rank - 1), row-major, ranks ascending within a row."""
    import torch

    device, n_gallery = key.device, key.shape[1]
    rows_t = torch.from_numpy(pair_row).to(device)
    items_t = torch.from_numpy(pair_item).to(device)
    rank0 = torch.empty(rows_t.numel(), dtype=torch.int64, device=device)
    for lo in range(0, rows_t.numel(), block):
        rows_b, items_b = rows_t[lo : lo + block], items_t[lo : lo + block]
        scores = key.index_select(0, rows_b)  # block x G
        own = scores.gather(1, items_b[:, None])  # block x 1: each pair's own key
        ahead = (scores < own).sum(1)
        ties = (scores == own).sum(1)  # ≥ 1: the item itself
        tied = torch.nonzero(ties > 1).reshape(-1)
        if tied.numel():  # rare with real scores: count only the tied items earlier in the gallery
            earlier = torch.arange(n_gallery, device=device)[None, :] < items_b[tied, None]
            ahead[tied] += ((scores[tied] == own[tied]) & earlier).sum(1)
        rank0[lo : lo + block] = ahead
    # Rows stay grouped; within a row put the hits in rank order
    order = torch.argsort(rows_t * n_gallery + rank0, stable=True)
    return rows_t[order], rank0[order]


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
