"""miners.colour_probe: every colour word gets one variant per other basic colour, and the logit is the
hand-computable log-ratio of the written colour against them."""

from __future__ import annotations

import numpy as np
import pytest

from miners.captions import COLOUR_WORDS
from miners.colour_probe import MAX_COLOUR_WORDS, colour_logits, colour_variants


def test_variants_replace_each_colour_word_by_every_other_colour():
    groups = colour_variants("A Red coat and gray shoes")
    assert len(groups) == 2 and all(len(g) == len(COLOUR_WORDS) - 1 for g in groups)
    assert "A blue coat and gray shoes" in groups[0] and "A Red coat and blue shoes" in groups[1]
    assert "A Red coat and grey shoes" not in groups[1]  # gray is grey: no variant of itself
    assert colour_variants("a plain coat, a reddish bag") == []  # whole words only
    assert len(colour_variants("red blue green black")) == MAX_COLOUR_WORDS


def test_the_logit_is_the_log_ratio_against_uniform():
    own = np.array([0.3, 0.1, 0.2])
    variants = [[np.array([0.1, 0.1])], [np.array([0.3, 0.3]), np.array([0.1, 0.1])], []]
    got = colour_logits(own, variants, temperature=0.1)

    def log_ratio(o, vs):
        logits = np.r_[o, vs] / 0.1
        return logits[0] - np.log(np.exp(logits).sum()) + np.log(len(logits))

    assert got[0] == pytest.approx(log_ratio(0.3, [0.1, 0.1]), rel=1e-5) and got[0] > 0
    assert got[1] == pytest.approx((log_ratio(0.1, [0.3, 0.3]) + log_ratio(0.1, [0.1, 0.1])) / 2, rel=1e-5)
    assert got[2] == 0.0  # no colour word: neutral
