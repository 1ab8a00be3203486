"""The attribute probes: does the region agree with the colours and the garments its sentence names?

A sentence that names a colour the person does not wear ("a purple top" on a green top), or a garment
they do not wear ("a skirt" on shorts), can still be the best sentence for that region and score a high
raw cosine. Asked as a zero-shot question, the region answers: each colour word of the unit is replaced
in turn by every other basic colour term (`miners.captions.COLOUR_WORDS`), each garment noun by the
other garment kinds of its body part (`GARMENT_KINDS`), all variants are embedded with the same CLIP,
and the region's softmax over {own text, variants} says how much more likely the written word is than
the others.

`colour_logit` / `garment_logit` = log p(own) − log(1 / K) for the K candidates (0 when the region is
indifferent, positive when it prefers the written word), averaged over the unit's probed words; 0 for a
unit with none. They need no bank and no knowledge of the person, and depend only on the pair's region
and text: the same in any shard or batch.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from miners.captions import COLOUR_WORDS

PROBE_TEMPERATURE = 0.05  # CLIP's own logit scale is ~1/0.01; softer keeps the log-ratio bounded
MAX_PROBED_WORDS = 2  # per unit and probe: a third word adds variants but little evidence
_WORD = re.compile(r"(?<![\w-])[A-Za-z]+(?![\w-])")
_SYNONYMS = {"gray": "grey"}
_ARTICLE = re.compile(r"(?:^|(?<=\s))(an?)(\s+)$", re.I)

# Garment kinds of pedestrian captions per body part: kind -> the phrases that name it (the first is
# the one a variant uses). Written from the nouns CUHK-PEDES / ICFG-PEDES / RSTPReid captions use for
# clothing; generic nouns that fit every kind of a part ("top", "shoes", "bag", "clothes") are left
# out on purpose: replacing one says nothing the region can refute. The synthetic benchmark's nouns
# are all covered (storage.synth.text), so on real captions the probe fires somewhat less often.
GARMENT_KINDS: dict[str, dict[str, tuple[str, ...]]] = {
    "head": {
        "hat": ("hat", "brimmed hat", "sun hat", "bucket hat"),
        "cap": ("cap", "baseball cap", "peaked cap"),
        "beanie": ("beanie", "knit hat", "woolly hat", "wool hat"),
        "helmet": ("helmet",),
    },
    "upper": {
        "t-shirt": ("t-shirt", "t shirt", "tshirt", "tee", "tee shirt", "tee-shirt"),
        "shirt": ("shirt", "button-up shirt", "button-down shirt", "polo shirt", "polo"),
        "blouse": ("blouse",),
        "jacket": ("jacket", "zip jacket", "windbreaker", "blazer", "bomber jacket", "denim jacket"),
        "coat": ("coat", "long coat", "overcoat", "raincoat", "parka", "trench coat"),
        "sweater": ("sweater", "jumper", "pullover", "cardigan"),
        "hoodie": ("hoodie", "hooded sweatshirt", "sweatshirt"),
        "vest": ("vest", "tank top", "sleeveless top"),
        "dress": ("dress",),
    },
    "lower": {
        "trousers": ("trousers", "pants", "slacks"),
        "jeans": ("jeans", "denim jeans", "denim pants"),
        "shorts": ("shorts", "short pants"),
        "skirt": ("skirt", "knee-length skirt", "miniskirt", "long skirt"),
        "leggings": ("leggings", "tights"),
    },
    "feet": {
        "sneakers": ("sneakers", "trainers", "sports shoes", "running shoes", "tennis shoes"),
        "boots": ("boots", "high boots", "ankle boots"),
        "leather shoes": ("leather shoes", "dress shoes", "loafers"),
        "sandals": ("sandals", "flip-flops", "flip flops"),
        "heels": ("heels", "high heels", "high-heeled shoes"),
        "slippers": ("slippers",),
    },
    "bag": {
        "backpack": ("backpack", "rucksack", "schoolbag", "school bag"),
        "handbag": ("handbag", "purse", "hand bag", "tote bag"),
        "shoulder bag": ("shoulder bag", "messenger bag", "satchel", "crossbody bag", "cross-body bag"),
        "suitcase": ("suitcase", "luggage"),
    },
}
# phrase -> (part, kind), and the phrases longest first so "denim jeans" wins over "jeans"
_GARMENT_OF = {
    p: (part, kind) for part, kinds in GARMENT_KINDS.items() for kind, ps in kinds.items() for p in ps
}
# Phrases that name no garment when followed by these words ("cap sleeves" are sleeves)
_NOT_A_GARMENT = {"cap": re.compile(r"\s+sleeve", re.I)}
_GARMENT_RE = re.compile(
    r"(?<![\w-])("
    + "|".join(re.escape(p) for p in sorted(_GARMENT_OF, key=lambda p: (-len(p), p)))
    + r")(?![\w-])",
    re.I,
)


def replace_word(text: str, s: int, e: int, new: str, keep_case: bool = True) -> str:
    """`text` with [s, e) replaced by `new` (capitalised where the old word was, with `keep_case`), an
    "a"/"an" right before it made to agree."""
    if keep_case and text[s : s + 1].isupper():
        new = new[:1].upper() + new[1:]
    before = text[:s]
    if article := _ARTICLE.search(before):
        a = "an" if new[:1].lower() in "aeiou" else "a"
        a = a.capitalize() if article.group(1)[:1].isupper() else a
        before = before[: article.start()] + a + article.group(2)
    return before + new + text[e:]


def colour_words(text: str, colours: Sequence[str] = COLOUR_WORDS) -> list[tuple[int, int, str]]:
    """(start, end, colour) of every whole-word colour term of `text`, any case, synonyms folded."""
    out = []
    for m in _WORD.finditer(text):
        word = _SYNONYMS.get(m.group(0).lower(), m.group(0).lower())
        if word in colours:
            out.append((m.start(), m.end(), word))
    return out


def garment_words(text: str) -> list[tuple[int, int, str, str]]:
    """(start, end, part, kind) of every garment phrase of `text` (whole words, any case, the longest
    phrase where two overlap), in text order."""
    return [
        (m.start(), m.end(), *_GARMENT_OF[m.group(0).lower()])
        for m in _GARMENT_RE.finditer(text)
        if not ((after := _NOT_A_GARMENT.get(m.group(0).lower())) and after.match(text, m.end()))
    ]


def colour_variants(text: str, colours: Sequence[str] = COLOUR_WORDS) -> list[list[str]]:
    """Per colour word of `text` (first MAX_PROBED_WORDS), the texts with it replaced by each other colour."""
    return [
        [replace_word(text, s, e, other) for other in colours if other != word]
        for s, e, word in colour_words(text, colours)[:MAX_PROBED_WORDS]
    ]


def garment_variants(text: str) -> list[list[str]]:
    """Per garment phrase of `text` (first MAX_PROBED_WORDS), the texts with it replaced by the name of
    each other garment kind of its body part."""
    return [
        [
            replace_word(text, s, e, phrases[0])
            for other, phrases in GARMENT_KINDS[part].items()
            if other != kind
        ]
        for s, e, part, kind in garment_words(text)[:MAX_PROBED_WORDS]
    ]


def probe_logits(
    own_cosine: np.ndarray, variant_cosines: list[list[np.ndarray]], temperature: float = PROBE_TEMPERATURE
) -> np.ndarray:
    """Per unit: mean over its probed words of log softmax(own | own + variants) − log(1 / K); 0 without."""
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


# The probes the miner runs, by the pair column each fills: name -> variants of one unit's text
PROBES = {"colour_logit": colour_variants, "garment_logit": garment_variants}

__all__ = [
    "GARMENT_KINDS",
    "MAX_PROBED_WORDS",
    "PROBES",
    "PROBE_TEMPERATURE",
    "colour_variants",
    "colour_words",
    "garment_variants",
    "garment_words",
    "probe_logits",
    "replace_word",
]
