"""The colour probe: does the region agree with the colours its sentence names?

A sentence that names a colour the person does not wear ("a purple top" on a green top) can still be
the best sentence for that region and score a high raw cosine. Asked as a zero-shot question, the
region answers: each colour word of the unit is replaced in turn by every other basic colour term
(`miners.captions.COLOUR_WORDS`), all variants are embedded with the same CLIP, and the region's
softmax over {own text, variants} says how much more likely the written colour is than the others.

`colour_logit` = log p(own) − log(1 / K) for the K candidates (0 when the region is indifferent,
positive when it prefers the written colour), averaged over the unit's colour words; 0 for a unit with
no colour word. It needs no bank and no knowledge of the person, and depends only on the pair's
region and text: the same in any shard or batch.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from miners.captions import COLOUR_WORDS

COLOUR_TEMPERATURE = 0.05  # CLIP's own logit scale is ~1/0.01; softer keeps the log-ratio bounded
MAX_COLOUR_WORDS = 2  # per unit: a third colour adds variants but little evidence
_WORD = re.compile(r"(?<![\w-])[A-Za-z]+(?![\w-])")
_SYNONYMS = {"gray": "grey"}


def colour_words(text: str, colours: Sequence[str] = COLOUR_WORDS) -> list[tuple[int, int, str]]:
    """(start, end, colour) of every whole-word colour term of `text`, any case, synonyms folded."""
    out = []
    for m in _WORD.finditer(text):
        word = _SYNONYMS.get(m.group(0).lower(), m.group(0).lower())
        if word in colours:
            out.append((m.start(), m.end(), word))
    return out


def colour_variants(text: str, colours: Sequence[str] = COLOUR_WORDS) -> list[list[str]]:
    """Per colour word of `text` (first MAX_COLOUR_WORDS), the texts with it replaced by each other colour."""
    return [
        [text[:s] + other + text[e:] for other in colours if other != word]
        for s, e, word in colour_words(text, colours)[:MAX_COLOUR_WORDS]
    ]


def colour_logits(
    own_cosine: np.ndarray, variant_cosines: list[list[np.ndarray]], temperature: float = COLOUR_TEMPERATURE
) -> np.ndarray:
    """Per unit: mean over its colour words of log softmax(own | own + variants) − log(1 / K); 0 without."""
    out = np.zeros(len(own_cosine), dtype=np.float32)
    for s, groups in enumerate(variant_cosines):
        if not groups:
            continue
        values = []
        for cos in groups:
            logits = np.concatenate([[own_cosine[s]], np.asarray(cos, dtype=np.float64)]) / temperature
            log_p_own = logits[0] - (logits.max() + np.log(np.exp(logits - logits.max()).sum()))
            values.append(log_p_own + np.log(len(logits)))
        out[s] = float(np.mean(values))
    return out


__all__ = ["COLOUR_TEMPERATURE", "colour_logits", "colour_variants", "colour_words"]
