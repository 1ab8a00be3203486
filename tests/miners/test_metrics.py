"""Hand-computed retrieval, calibration and AUROC cases; the torch `retrieval_metrics` against a verbatim copy
of the numpy implementation it replaced (`_reference_numpy`) on random cases with ties."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from miners import metrics
from miners.metrics import QUERY_CHUNK, auroc, expected_calibration_error, retrieval_metrics


def test_retrieval_metrics_hand_computed():
    gallery = np.array([1, 2, 1, 3])
    # q0 (pid 1) ranks g0, g1, g3, g2 → hits at ranks 1 and 4: AP (1/1 + 2/4)/2 = 0.75, INP 2/4.
    # q1 (pid 2) ranks g0, g2, g3, g1 → one hit at rank 4: AP 1/4, INP 1/4.
    sim = np.array([[0.9, 0.8, 0.1, 0.5], [0.9, 0.1, 0.5, 0.3]])
    m = retrieval_metrics(sim, np.array([1, 2]), gallery)
    assert m["R1"] == pytest.approx(50.0)
    assert m["R5"] == pytest.approx(100.0)
    assert m["R10"] == pytest.approx(100.0)
    assert m["mAP"] == pytest.approx(50.0)
    assert m["mINP"] == pytest.approx(37.5)


def test_cmc_is_capped_at_one_per_query():
    sim = np.array([[0.9, 0.8, 0.7]])
    m = retrieval_metrics(sim, np.array([5]), np.array([5, 5, 5]))
    assert m["R1"] == m["R5"] == m["mAP"] == m["mINP"] == pytest.approx(100.0)


def test_r_at_k_counts_rank_k_inclusive():
    sim = np.array([[0.6, 0.5, 0.4, 0.3, 0.2, 0.1]])
    m = retrieval_metrics(sim, np.array([7]), np.array([1, 2, 3, 4, 7, 6]), ranks=(1, 4, 5))
    assert (m["R1"], m["R4"], m["R5"]) == (0.0, 0.0, 100.0)
    assert m["mAP"] == pytest.approx(20.0) and m["mINP"] == pytest.approx(20.0)


def test_ties_break_by_gallery_order():
    m = retrieval_metrics(np.array([[0.5, 0.5]]), np.array([2]), np.array([1, 2]))
    assert m["R1"] == 0.0


def test_query_without_relevant_item_and_shape_errors():
    with pytest.raises(ValueError, match="no relevant gallery item"):
        retrieval_metrics(np.array([[0.1, 0.2]]), np.array([9]), np.array([1, 2]))
    with pytest.raises(ValueError, match="expected"):
        retrieval_metrics(np.zeros((2, 3)), np.array([1]), np.array([1, 2, 3]))


def test_ece_perfect_and_overconfident():
    probs = np.array([0.9] * 10 + [0.1] * 10)
    labels = np.array([1] * 9 + [0] + [0] * 9 + [1])
    ece, bins = expected_calibration_error(probs, labels, n_bins=10)
    assert ece == pytest.approx(0.0, abs=1e-12)
    assert sum(b["count"] for b in bins) == 20
    ece_bad, _ = expected_calibration_error(np.full(10, 0.9), np.zeros(10), n_bins=10)
    assert ece_bad == pytest.approx(0.9)


def test_auroc_cases():
    assert auroc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1])) == pytest.approx(1.0)
    assert auroc(np.array([0.9, 0.8, 0.2, 0.1]), np.array([0, 0, 1, 1])) == pytest.approx(0.0)
    assert auroc(np.array([0.5, 0.5]), np.array([0, 1])) == pytest.approx(0.5)
    # one positive above one of two negatives: 1/2
    assert auroc(np.array([0.3, 0.5, 0.7]), np.array([0, 1, 0])) == pytest.approx(0.5)


def test_weighted_ece_equals_ece_of_repeated_rows():
    rng = np.random.default_rng(2)
    p = rng.random(300)
    y = rng.random(300) < p**2
    k = rng.integers(1, 5, 300)
    ece_w, bins_w = expected_calibration_error(p, y, 10, weights=k.astype(float))
    ece_r, bins_r = expected_calibration_error(np.repeat(p, k), np.repeat(y, k), 10)
    assert ece_w == pytest.approx(ece_r)
    assert [b["accuracy"] for b in bins_w if b["count"]] == pytest.approx(
        [b["accuracy"] for b in bins_r if b["count"]]
    )
    assert ece_w != pytest.approx(expected_calibration_error(p, y, 10)[0])


def test_retrieval_metrics_do_not_depend_on_the_query_chunk(rank_path):
    """Queries are ranked a chunk at a time to bound memory; the figures must be the same for any chunk
    (ties included: they are broken by gallery order in every chunk)."""
    rng = np.random.default_rng(0)
    for case in range(20):
        n_q, n_g = int(rng.integers(1, 40)), int(rng.integers(1, 60))
        gallery = rng.integers(0, 6, n_g)
        queries = rng.choice(gallery, n_q)
        sim = rng.normal(size=(n_q, n_g)).astype(np.float32)
        if case % 2:
            sim = np.round(sim, 1)
        whole = retrieval_metrics(sim, queries, gallery, chunk=n_q)
        for chunk in (1, 3, 256):
            assert retrieval_metrics(sim, queries, gallery, chunk=chunk) == whole


# The numpy implementation `retrieval_metrics` had before it moved to torch (issue: metrics computed in
# torch, in query chunks), copied verbatim: the independent reference the torch version must equal.
def _reference_numpy(
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


def _random_case(rng: np.random.Generator, ties: bool, max_q: int = 40, max_g: int = 60):
    """Q x G float64 scores (rounded to one decimal when `ties`: many equal scores per row), person ids
    with every query's id present in the gallery."""
    n_q, n_g = int(rng.integers(1, max_q)), int(rng.integers(1, max_g))
    gallery = rng.integers(0, 6, n_g)
    queries = rng.choice(gallery, n_q)
    sim = rng.normal(size=(n_q, n_g))
    return (np.round(sim, 1) if ties else sim), queries, gallery


def _assert_close(got: dict[str, float], want: dict[str, float]) -> None:
    assert got.keys() == want.keys()
    for key in want:
        assert abs(got[key] - want[key]) <= 1e-9, (key, got[key], want[key])


@pytest.fixture(params=["sort", "count"])
def rank_path(request, monkeypatch):
    """Both ways a chunk's ranks are found: sorting every row, or counting each relevant item's rank."""
    monkeypatch.setattr(metrics, "COUNT_MAX_RELEVANT", 0 if request.param == "sort" else 10**9)
    return request.param


@pytest.mark.parametrize("as_tensor", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_retrieval_metrics_equal_the_numpy_reference(as_tensor, dtype, rank_path):
    rng = np.random.default_rng(11)
    for case in range(30):
        sim, queries, gallery = _random_case(rng, ties=case % 2 == 1)
        sim = sim.astype(dtype)
        want = _reference_numpy(sim, queries, gallery, ranks=(1, 2, 5, 10, 100))
        given = torch.from_numpy(sim) if as_tensor else sim
        for chunk in (1, 3, 7, sim.shape[0], QUERY_CHUNK):
            _assert_close(
                retrieval_metrics(given, queries, gallery, ranks=(1, 2, 5, 10, 100), chunk=chunk), want
            )


def test_retrieval_metrics_equal_the_reference_on_special_scores_and_layouts(rank_path):
    """±0 (which tie), ±inf, NaN (ranked last by numpy's sort), integer and float16 scores, transposed and
    reversed views (non-contiguous / negative strides), tensors for the ids, string ids."""
    rng = np.random.default_rng(5)
    for _case in range(20):
        sim, queries, gallery = _random_case(rng, ties=True)
        specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan])
        mask = rng.random(sim.shape) < 0.3
        sim[mask] = rng.choice(specials, int(mask.sum()))
        want = _reference_numpy(sim, queries, gallery)
        _assert_close(retrieval_metrics(sim, queries, gallery, chunk=4), want)
        _assert_close(retrieval_metrics(torch.from_numpy(sim), queries, gallery, chunk=4), want)
        _assert_close(
            retrieval_metrics(sim, torch.from_numpy(queries), torch.from_numpy(gallery), chunk=3), want
        )
        _assert_close(retrieval_metrics(sim, queries.astype(str), gallery.astype(str)), want)
        # image→text on the transpose (as the training evaluation does), when every image has a caption
        if np.isin(gallery, queries).all():
            want_t = _reference_numpy(sim.T, gallery, queries)
            _assert_close(retrieval_metrics(sim.T, gallery, queries, chunk=5), want_t)
            _assert_close(retrieval_metrics(torch.from_numpy(sim).T, gallery, queries, chunk=5), want_t)
        reversed_view = sim[:, ::-1]
        _assert_close(
            retrieval_metrics(reversed_view, queries, gallery[::-1], chunk=2),
            _reference_numpy(reversed_view, queries, gallery[::-1]),
        )
        ints = rng.integers(-3, 4, sim.shape)
        _assert_close(retrieval_metrics(ints, queries, gallery), _reference_numpy(ints, queries, gallery))
        _assert_close(
            retrieval_metrics(torch.from_numpy(ints), queries, gallery),
            _reference_numpy(ints, queries, gallery),
        )
        half = sim.astype(np.float16)
        _assert_close(retrieval_metrics(half, queries, gallery), _reference_numpy(half, queries, gallery))


def test_nan_scores_rank_last_and_zeros_tie(rank_path):
    # q (pid 2): g0 is NaN, g1 -0.0, g2 +0.0 (pid 2), g3 -inf. Order g1, g2, g3, g0 → hit at rank 2.
    sim = np.array([[np.nan, -0.0, 0.0, -np.inf]])
    m = retrieval_metrics(sim, np.array([2]), np.array([1, 1, 2, 1]), ranks=(1, 2))
    assert (m["R1"], m["R2"], m["mAP"], m["mINP"]) == (0.0, 100.0, 50.0, 50.0)
    # the only relevant item has a NaN score: ranked after -inf, last
    m = retrieval_metrics(sim, np.array([2]), np.array([2, 1, 1, 1]))
    assert m["mAP"] == pytest.approx(25.0) and m["R1"] == 0.0


def test_errors_keep_their_texts_for_numpy_and_torch():
    sim = np.array([[0.3, 0.2], [0.1, 0.2], [0.5, 0.5]])
    for given in (sim, torch.from_numpy(sim)):
        # the first query without a relevant item is named, whichever chunk it falls in
        with pytest.raises(ValueError, match=r"^query 1 \(pid 9\) has no relevant gallery item$"):
            retrieval_metrics(given, np.array([1, 9, 8]), np.array([1, 2]), chunk=1)
        with pytest.raises(ValueError, match=r"^similarity is \(3, 2\), expected \(2, 2\)$"):
            retrieval_metrics(given, np.array([1, 2]), np.array([1, 2]))
        with pytest.raises(ValueError, match="^empty similarity matrix$"):
            retrieval_metrics(given[:0], np.array([], dtype=int), np.array([1, 2]))
        with pytest.raises(ValueError, match="ranks must be"):
            retrieval_metrics(given, np.array([1, 2, 1]), np.array([1, 2]), ranks=(0, 1))
    # the texts are today's: the reference raises the same messages
    with pytest.raises(ValueError, match=r"^query 1 \(pid 9\) has no relevant gallery item$"):
        _reference_numpy(sim, np.array([1, 9, 8]), np.array([1, 2]), chunk=1)
    with pytest.raises(ValueError, match=r"^similarity is \(3, 2\), expected \(2, 2\)$"):
        _reference_numpy(sim, np.array([1, 2]), np.array([1, 2]))
    with pytest.raises(ValueError, match="^empty similarity matrix$"):
        _reference_numpy(sim[:0], np.array([], dtype=int), np.array([1, 2]))


def test_only_a_chunk_of_rows_is_ranked_at_once(monkeypatch):
    """Peak memory: every sort sees at most `chunk` query rows, never the whole Q x G matrix."""
    monkeypatch.setattr(metrics, "COUNT_MAX_RELEVANT", 0)
    rows_seen = []
    argsort = torch.argsort

    def recording_argsort(tensor, *args, **kwargs):
        rows_seen.append(tensor.shape[0])
        return argsort(tensor, *args, **kwargs)

    monkeypatch.setattr(torch, "argsort", recording_argsort)
    rng = np.random.default_rng(3)
    gallery = rng.integers(0, 4, 50)
    queries = rng.choice(gallery, 23)
    sim = rng.normal(size=(23, 50))
    _assert_close(retrieval_metrics(sim, queries, gallery, chunk=5), _reference_numpy(sim, queries, gallery))
    assert rows_seen == [5, 5, 5, 5, 3]


def test_counting_compares_a_block_of_pairs_at_once(monkeypatch):
    """Peak memory of the counting path: at most `chunk` (query, relevant item) pairs x G at once."""
    monkeypatch.setattr(metrics, "COUNT_MAX_RELEVANT", 10**9)
    blocks_seen = []
    index_select = torch.Tensor.index_select

    def recording(tensor, dim, index):
        blocks_seen.append(index.numel())
        return index_select(tensor, dim, index)

    monkeypatch.setattr(torch.Tensor, "index_select", recording)
    gallery = np.repeat(np.arange(5), 4)  # 4 relevant items per query
    queries = np.arange(5).repeat(2)[:7]
    sim = np.random.default_rng(4).normal(size=(7, 20))
    _assert_close(retrieval_metrics(sim, queries, gallery, chunk=3), _reference_numpy(sim, queries, gallery))
    assert blocks_seen == [3, 3, 3, 3, 3, 3, 3, 3, 3, 1] and max(blocks_seen) <= 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensor_is_ranked_on_the_device_and_equals_the_reference():
    rng = np.random.default_rng(7)
    for case in range(10):
        sim, queries, gallery = _random_case(rng, ties=case % 2 == 1, max_q=300, max_g=500)
        if case == 0:
            sim[rng.random(sim.shape) < 0.1] = np.nan
        for dtype in (np.float32, np.float64):
            want = _reference_numpy(sim.astype(dtype), queries, gallery)
            got = retrieval_metrics(torch.from_numpy(sim.astype(dtype)).cuda(), queries, gallery, chunk=64)
            _assert_close(got, want)
