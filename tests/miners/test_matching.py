"""Matching features and modes on hand-made score matrices."""

import numpy as np
import pytest

from miners.matching import MatchConfig, match_units, part_agreement_matrix


def test_part_agreement_values():
    m = part_agreement_matrix([("upper",), (), ("upper", "lower")], ["upper", "lower", None])
    np.testing.assert_array_equal(m, [[1, 0, 0.5], [0.5, 0.5, 0.5], [1, 1, 0.5]])


def test_clip_mode_picks_argmax_with_margin_and_softmax():
    cos = np.array([[0.1, 0.5, 0.3], [0.2, 0.25, 0.9]], dtype=np.float32)
    m = match_units(cos, [(), ()], ["head", "upper", "lower"], np.ones(3), MatchConfig(mode="clip"))
    assert m.region_index.tolist() == [1, 2]
    assert m.margin == pytest.approx([0.2, 0.65])
    assert m.mutual_best.tolist() == [True, True]
    assert 0.5 < m.softmax_prob[0] < 1.0 and m.softmax_prob[1] > 0.99


def test_combined_mode_prefers_named_part_and_clip_breaks_ties():
    # Unit 0 names the lower garment but CLIP prefers the head: combined follows the words.
    # Unit 1 names a bag; two bag zones, CLIP picks between them.
    cos = np.array([[0.9, 0.2, 0.1, 0.3], [0.1, 0.1, 0.4, 0.6]], dtype=np.float32)
    labels = ["head", "lower", "bag", "bag"]
    tags = [("lower",), ("bag",)]
    combined = match_units(cos, tags, labels, np.ones(4), MatchConfig(mode="combined"))
    assert combined.region_index.tolist() == [1, 3]
    assert combined.part_agreement.tolist() == [1.0, 1.0]
    clip_only = match_units(cos, tags, labels, np.ones(4), MatchConfig(mode="clip"))
    assert clip_only.region_index.tolist() == [0, 3]
    assert clip_only.part_agreement.tolist() == [0.0, 1.0]
    lexical = match_units(cos, tags, labels, np.array([1, 1, 0.9, 0.2]), MatchConfig(mode="lexical"))
    assert lexical.region_index.tolist() == [1, 2]  # quality breaks the bag tie


def test_mutual_best_false_when_region_prefers_another_unit():
    cos = np.array([[0.5, 0.1], [0.9, 0.2]], dtype=np.float32)
    m = match_units(cos, [(), ()], [None, None], np.ones(2), MatchConfig(mode="clip"))
    assert m.region_index.tolist() == [0, 0]
    assert m.mutual_best.tolist() == [False, True]


def test_single_region_and_bad_mode():
    m = match_units(np.array([[0.3]]), [("head",)], ["head"], np.ones(1), MatchConfig())
    assert m.margin.tolist() == [0.0] and m.softmax_prob.tolist() == [1.0]
    with pytest.raises(ValueError, match="match mode"):
        match_units(np.array([[0.3]]), [()], [None], np.ones(1), MatchConfig(mode="nope"))
