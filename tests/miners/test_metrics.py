"""Hand-computed retrieval, calibration and AUROC cases."""

import numpy as np
import pytest

from miners.metrics import auroc, expected_calibration_error, retrieval_metrics


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


def test_retrieval_metrics_do_not_depend_on_the_query_chunk():
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
