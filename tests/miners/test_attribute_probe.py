"""miners.attribute_probe: every colour word gets one variant per other basic colour, every garment
phrase one per other garment kind of its body part, and the logit is the hand-computable log-ratio of
the written word against them."""

from __future__ import annotations

import numpy as np
import pytest

from miners.attribute_probe import (
    GARMENT_KINDS,
    MAX_PROBED_WORDS,
    colour_variants,
    garment_variants,
    garment_words,
    probe_logits,
)
from miners.captions import COLOUR_WORDS, part_tags


def test_variants_replace_each_colour_word_by_every_other_colour():
    groups = colour_variants("A Red coat and gray shoes")
    assert len(groups) == 2 and all(len(g) == len(COLOUR_WORDS) - 1 for g in groups)
    assert "A Blue coat and gray shoes" in groups[0] and "A Red coat and blue shoes" in groups[1]
    assert "A Red coat and grey shoes" not in groups[1]  # gray is grey: no variant of itself
    assert "An Orange coat and gray shoes" in groups[0]  # the article agrees with the new word
    assert colour_variants("a plain coat, a reddish bag") == []  # whole words only
    assert len(colour_variants("red blue green black")) == MAX_PROBED_WORDS


def test_garment_variants_name_every_other_kind_of_the_same_part():
    groups = garment_variants("She wears black denim jeans and an orange hoodie")
    lower, upper = groups
    assert len(lower) == len(GARMENT_KINDS["lower"]) - 1 and len(upper) == len(GARMENT_KINDS["upper"]) - 1
    # the longest phrase is replaced whole ("denim jeans", not "jeans"), by a kind of the same part
    assert "She wears black shorts and an orange hoodie" in lower
    assert not any("jeans" in v for v in lower) and not any("boots" in v for v in lower)
    assert "She wears black denim jeans and a orange hoodie" not in upper
    assert "She wears black denim jeans and an orange jacket" in upper
    # a synonym of the written kind is no variant: "short pants" are shorts
    assert not any("shorts" in v for v in garment_variants("blue short pants")[0])


def test_generic_nouns_and_non_garment_uses_are_not_probed():
    assert garment_words("a green top, white shoes and a bag") == []  # fit every kind of their part
    assert garment_words("a shirt with cap sleeves") == [(2, 7, "upper", "shirt")]  # "cap sleeves": sleeves
    assert garment_words("a t-shirt") == [(2, 9, "upper", "t-shirt")]  # whole words: no "shirt" inside


def test_the_miners_lexicon_tags_every_garment_phrase_with_its_part():
    """A probed phrase names its part for the splitter too, so the region it is matched to is that part's."""
    for part, kinds in GARMENT_KINDS.items():
        untagged = [p for ps in kinds.values() for p in ps if part not in part_tags(f"a {p}")]
        assert not untagged, f"{part}: {untagged} not tagged by miners/data/part_lexicon.json"


def test_the_logit_is_the_log_ratio_against_uniform():
    own = np.array([0.3, 0.1, 0.2])
    variants = [[np.array([0.1, 0.1])], [np.array([0.3, 0.3]), np.array([0.1, 0.1])], []]
    got = probe_logits(own, variants, temperature=0.1)

    def log_ratio(o, vs):
        logits = np.r_[o, vs] / 0.1
        return logits[0] - np.log(np.exp(logits).sum()) + np.log(len(logits))

    assert got[0] == pytest.approx(log_ratio(0.3, [0.1, 0.1]), rel=1e-5) and got[0] > 0
    assert got[1] == pytest.approx((log_ratio(0.1, [0.3, 0.3]) + log_ratio(0.1, [0.1, 0.1])) / 2, rel=1e-5)
    assert got[2] == 0.0  # no probed word: neutral
