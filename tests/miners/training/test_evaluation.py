"""miners.training.evaluation: global retrieval reports gallery/query sizes and the long-query block;
local grounding is measured against ground-truth links, with one vision forward per image."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from miners.clip_scorer import load_clip
from miners.metrics import retrieval_metrics
from miners.training.data import build_clip_data
from miners.training.evaluation import LONG_QUERY_MIN_SENTENCES, evaluate_global, evaluate_local
from storage.manifest import read_manifest


@pytest.fixture(scope="module")
def model_data(tiny_dataset, tiny_clip_dir):
    model, processor = load_clip(tiny_clip_dir, "cpu")
    table, meta = read_manifest(tiny_dataset / "manifest.parquet")
    return model, processor, build_clip_data(table, processor, root=meta["root"])


def test_global_metrics_count_queries_and_gallery(model_data):
    model, processor, data = model_data
    out = evaluate_global(model, data, processor, "sentence-pool")
    assert out["num_queries"] == len(data) and out["num_gallery"] == data.images_u8.shape[0]
    assert 0.0 <= out["R1"] <= out["R5"] <= out["R10"] <= 100.0
    n_long = int((data.cap_n_sentences >= LONG_QUERY_MIN_SENTENCES).sum())
    assert out["long_query"]["num_queries"] == n_long
    assert out["long_query"]["min_sentences"] == LONG_QUERY_MIN_SENTENCES
    # image→text: each gallery image ranks the captions (the transposed similarity, the same metric code)
    assert set(out["i2t"]) == {"R1", "R5", "R10", "mAP", "mINP"} and 0.0 <= out["i2t"]["R1"] <= 100.0
    # the text mode changes the caption embedding, so the figures can differ, never the counts
    truncated = evaluate_global(model, data, processor, "truncate")
    assert truncated["num_queries"] == out["num_queries"]


def test_local_grounding_counts_linked_sentences(model_data):
    model, processor, data = model_data
    out = evaluate_local(model, data, processor)
    linked = sum(1 for links in data.cap_gt_links if links for link in links if link.get("region_ids"))
    assert out["local_sentences"] == linked > 0
    assert 0.0 <= out["local_grounding_acc"] <= 100.0
    # no ground truth: no figure, and it says so with a zero count
    no_truth = dataclasses.replace(data, cap_gt_links=[None] * len(data))
    assert evaluate_local(model, no_truth, processor) == {"local_grounding_acc": None, "local_sentences": 0}


def test_retrieval_metrics_is_the_shared_implementation():
    sim = np.array([[0.9, 0.1], [0.2, 0.8]])
    out = retrieval_metrics(sim, np.array([1, 2]), np.array([1, 2]))
    assert out["R1"] == 100.0 and out["mAP"] == 100.0
