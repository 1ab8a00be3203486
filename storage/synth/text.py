"""Captions with exact sentence→region ground truth for the synthetic P-VLG benchmark.

Consumes a person's attributes (`storage.synth.draw.PersonAttrs`), the regions visible in one image
(body-part label → region id), the image's scene facts (view, brightness) and a seeded
`numpy.random.Generator`. Produces one caption of 4–8 sentences in the style of CUHK-PEDES (varied
templates and synonyms, clause-packed sentences, lowercase run-ons, at least one ungroundable
sentence) and its `links` in the pvlg format (README "The pvlg format"). Phrases are inserted into
templates while the text is assembled, so every phrase span is exact by construction; only visible
parts are ever mentioned.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from storage.synth.draw import SHORT_SLEEVED, PersonAttrs, pick

# Facts a caption can state, and the body-part region each one grounds to.
FACT_PART = {"hair": "head", "hat": "head", "upper": "upper", "lower": "lower", "feet": "feet", "bag": "bag"}
WEAR_FACTS = ("hat", "upper", "lower", "feet")

_COLOUR_WORDS = {
    "grey": ("grey", "grey", "gray"),
    "red": ("red", "red", "crimson"),
    "purple": ("purple", "purple", "violet"),
}
_HAIR_COLOUR_WORDS = {"blonde": ("blonde", "blond", "fair"), "grey": ("grey", "gray", "silver")}
_UPPER_NOUNS = {
    "t-shirt": ("t-shirt", "T-shirt", "tee", "top"),
    "shirt": ("shirt", "button-up shirt", "top"),
    "jacket": ("jacket", "coat", "zip jacket"),
    "coat": ("coat", "long coat", "overcoat"),
    "sweater": ("sweater", "jumper", "pullover"),
    "hoodie": ("hoodie", "hooded sweatshirt"),
    "blouse": ("blouse", "top"),
}
_LOWER_NOUNS = {
    "trousers": ("trousers", "pants", "slacks"),
    "jeans": ("jeans", "denim jeans", "denim pants"),
    "shorts": ("shorts", "short pants"),
    "skirt": ("skirt", "knee-length skirt"),
}
_SHOE_NOUNS = {
    "sneakers": ("sneakers", "trainers", "sports shoes", "running shoes", "shoes"),
    "boots": ("boots", "high boots"),
    "leather shoes": ("leather shoes", "shoes", "dress shoes"),
}
_HAT_NOUNS = {
    "cap": ("cap", "baseball cap"),
    "beanie": ("beanie", "knit hat", "woolly hat"),
    "hat": ("hat", "brimmed hat"),
}
_BAG_NOUNS = {
    "backpack": ("backpack", "rucksack"),
    "handbag": ("handbag", "purse"),
    "shoulder bag": ("shoulder bag", "messenger bag", "satchel", "bag"),
}

# Single-fact templates. [x] inserts fact x's noun phrase as a linked phrase, [x.poss] "his jacket",
# [x.the] "the jacket"; {x.desc} its predicative description, {x.be} is/are, {x.where} where a bag sits.
_SINGLE = {
    "hair": (
        "{Subj} has [hair].",
        "{Pron} has [hair].",
        "[hair.poss] is {hair.desc}.",
        "A {age} {person} with [hair].",
        "{Subj} with [hair] is walking along.",
        "You can see that {pron} has [hair].",
    ),
    "hat": (
        "{Pron} is wearing [hat].",
        "{Pron} has [hat] on.",
        "On {poss} head {pron} wears [hat].",
        "{Subj} wears [hat].",
    ),
    "upper": (
        "{Pron} is wearing [upper].",
        "{Pron} wears [upper].",
        "{Subj} has on [upper].",
        "{Pron} is dressed in [upper].",
        "On top, {pron} wears [upper].",
        "[upper.poss] is {upper.desc}.",
        "{Pron} is clad in [upper].",
        "A {person} in [upper].",
    ),
    "lower": (
        "{Pron} is wearing [lower].",
        "{Pron} wears [lower].",
        "{Pron} has on [lower].",
        "[lower.poss] {lower.be} {lower.desc}.",
        "Below, {pron} wears [lower].",
        "{Pron} is also wearing [lower].",
    ),
    "feet": (
        "{Pron} is wearing [feet].",
        "{Pron} wears [feet].",
        "On {poss} feet {pron} wears [feet].",
        "[feet.poss] are {feet.desc}.",
        "{Pron} walks in [feet].",
        "{Pron} has [feet] on.",
    ),
    "bag": (
        "{Pron} is carrying [bag].",
        "{Pron} carries [bag] {bag.where}.",
        "[bag] hangs {bag.where}.",
        "There is [bag] {bag.where}.",
        "{Pron} has [bag] with {obj}.",
    ),
}
_HAIR_HAT = (
    "{Pron} has [hair] and wears [hat].",
    "{Subj} with [hair] wears [hat].",
    "{Pron} wears [hat] over [hair].",
)

# (template, condition): ungroundable sentences state no visible part. Openers may only come first.
_UNGROUNDED = (
    ("{Pron} seems to be in a hurry.", "any"),
    ("{Pron} looks relaxed.", "any"),
    ("The photo was taken on a city street.", "any"),
    ("The picture seems to come from a surveillance camera.", "any"),
    ("{Pron} appears to be walking at a steady pace.", "any"),
    ("It looks like {pron} is going somewhere important.", "any"),
    ("{Pron} might be on {poss} way to work.", "any"),
    ("The scene looks like a busy shopping area.", "any"),
    ("{Pron} is probably waiting for someone.", "any"),
    ("the {person} seems calm and focused.", "any"),
    ("There are some buildings in the background.", "any"),
    ("{Pron} does not seem to notice the camera.", "any"),
    ("{Pron} is walking towards the camera.", "front"),
    ("{Pron} is facing the camera.", "front"),
    ("{Pron} is walking away from the camera.", "back"),
    ("The photo shows {obj} from behind.", "back"),
    ("The lighting in the picture is rather dim.", "dim"),
    ("The picture was taken in bright light.", "bright"),
)
_OPENERS = (
    "A {age} {person} is walking down the street.",
    "This is a photo of a {age} {person}.",
    "The image shows a {person} walking outdoors.",
    "A {person} walks along the pavement.",
)
_TOKEN = re.compile(r"\[(\w+)(?:\.(\w+))?\]|\{(\w+)(?:\.(\w+))?\}")


@dataclass(frozen=True)
class SceneFacts:
    view: str  # "front" | "back"
    brightness: float  # global light gain of the image


@dataclass(frozen=True)
class _Phrase:
    np: str  # "a red jacket"
    noun: str  # "jacket"
    desc: str  # "red"
    plural: bool
    where: str = ""


def _article(text: str) -> str:
    return f"{'an' if text[0].lower() in 'aeiou' else 'a'} {text}"


def _colour(rng: np.random.Generator, name: str) -> str:
    return pick(rng, _COLOUR_WORDS.get(name, (name,)))


def _phrases(attrs: PersonAttrs, poss: str, rng: np.random.Generator) -> dict[str, _Phrase]:
    """One realisation (synonyms, word order) of every fact, fixed for the whole caption."""
    out: dict[str, _Phrase] = {}
    hc = pick(rng, _HAIR_COLOUR_WORDS.get(attrs.hair_colour, (attrs.hair_colour,)))
    style = attrs.hair_style
    if style in ("short", "long"):
        np_, desc = f"{style} {hc} hair", f"{style} and {hc}"
    elif style == "ponytail":
        np_, desc = (
            pick(rng, (f"{hc} hair tied in a ponytail", f"a {hc} ponytail")),
            f"{hc} and tied in a ponytail",
        )
    else:
        np_, desc = pick(rng, (f"{hc} hair in a bun", f"a {hc} bun")), f"{hc} and tied up in a bun"
    out["hair"] = _Phrase(np_, "hair", desc, False)
    if attrs.hat:
        noun, c = pick(rng, _HAT_NOUNS[attrs.hat.kind]), _colour(rng, attrs.hat.colour)
        out["hat"] = _Phrase(_article(f"{c} {noun}"), noun, c, False)

    up = attrs.upper
    noun, c = pick(rng, _UPPER_NOUNS[up.kind]), _colour(rng, up.colour)
    c2 = _colour(rng, up.colour2) if up.colour2 else ""
    forms = {
        "solid": ((f"{c} {noun}",), c),
        "striped": (
            (f"{c} and {c2} striped {noun}", f"{c} {noun} with {c2} stripes"),
            f"{c} with {c2} stripes",
        ),
        "checked": ((f"{c} and {c2} plaid {noun}", f"{c} and {c2} checked {noun}"), f"{c} and {c2} checked"),
        "dotted": ((f"{c} {noun} with {c2} dots", f"{c} and {c2} polka-dot {noun}"), f"{c} with {c2} dots"),
        "two-tone": (
            (f"{c} and {c2} {noun}", f"{noun} that is {c} on top and {c2} at the bottom"),
            f"{c} on top and {c2} at the bottom",
        ),
    }
    cores, desc = forms[up.pattern]
    core = pick(rng, cores)
    if up.pattern == "solid" and "sleeve" not in noun and rng.random() < 0.2:
        core = f"{'short' if up.kind in SHORT_SLEEVED else 'long'}-sleeved {core}"
    out["upper"] = _Phrase(_article(core), noun, desc, False)

    lo = attrs.lower
    noun, c = pick(rng, _LOWER_NOUNS[lo.kind]), _colour(rng, lo.colour)
    if lo.kind == "skirt":
        out["lower"] = _Phrase(_article(f"{c} {noun}"), noun, c, False)
    else:
        out["lower"] = _Phrase(
            pick(rng, (f"{c} {noun}", f"{c} {noun}", f"a pair of {c} {noun}")), noun, c, True
        )
    noun, c = pick(rng, _SHOE_NOUNS[attrs.shoes.kind]), _colour(rng, attrs.shoes.colour)
    out["feet"] = _Phrase(pick(rng, (f"{c} {noun}", f"{c} {noun}", f"a pair of {c} {noun}")), noun, c, True)
    if attrs.bag:
        noun, c = pick(rng, _BAG_NOUNS[attrs.bag.kind]), _colour(rng, attrs.bag.colour)
        where = {
            "backpack": f"on {poss} back",
            "handbag": f"in {poss} {attrs.bag_side} hand",
            "shoulder bag": pick(
                rng, (f"on {poss} {attrs.bag_side} shoulder", f"over {poss} {attrs.bag_side} shoulder")
            ),
        }[attrs.bag.kind]
        out["bag"] = _Phrase(_article(f"{c} {noun}"), noun, c, False, where)
    return out


class _Sentence:
    """Accumulates text and the [start, end) spans of linked phrases within it."""

    def __init__(self) -> None:
        self.text = ""
        self.phrases: list[tuple[int, int, str]] = []  # (start, end, fact)

    def add(self, text: str, fact: str | None = None) -> None:
        if fact:
            self.phrases.append((len(self.text), len(self.text) + len(text), fact))
        self.text += text

    def finish(self, lowercase: bool = False) -> _Sentence:
        # Case changes keep lengths (ASCII), so the spans stay exact.
        self.text = self.text.lower() if lowercase else self.text[0].upper() + self.text[1:]
        return self


class _Writer:
    """Renders templates for one caption of one image."""

    def __init__(self, attrs: PersonAttrs, scene: SceneFacts, rng: np.random.Generator):
        self.rng = rng
        man = attrs.gender == "man"
        self.pron, self.poss, self.obj = ("he", "his", "him") if man else ("she", "her", "her")
        nouns = ("man", "guy", "man", "gentleman") if man else ("woman", "lady", "woman", "girl")
        self.person = pick(rng, nouns[:3] if attrs.age == "middle-aged" else nouns)
        self.age = attrs.age
        self.scene = scene
        self.ph = _phrases(attrs, self.poss, rng)

    def _word(self, key: str, sub: str | None) -> str:
        if sub:
            p = self.ph[key]
            return {"desc": p.desc, "be": "are" if p.plural else "is", "where": p.where}[sub]
        subj = pick(self.rng, (f"the {self.person}", f"this {self.person}", "the pedestrian"))
        words = {
            "pron": self.pron,
            "poss": self.poss,
            "obj": self.obj,
            "subj": subj,
            "person": self.person,
            "age": self.age,
        }
        word = words[key.lower()]
        return word[0].upper() + word[1:] if key[0].isupper() else word

    def render(self, template: str, lowercase: bool = False) -> _Sentence:
        sent, pos = _Sentence(), 0
        for m in _TOKEN.finditer(template):
            sent.add(template[pos : m.start()])
            if m.group(1):
                fact, form = m.group(1), m.group(2)
                p = self.ph[fact]
                text = {None: p.np, "poss": f"{self.poss} {p.noun}", "the": f"the {p.noun}"}[form]
                sent.add(text, fact)
            else:
                sent.add(self._word(m.group(3), m.group(4)))
            pos = m.end()
        sent.add(template[pos:])
        return sent.finish(lowercase)

    def single(self, fact: str) -> _Sentence:
        return self.render(pick(self.rng, _SINGLE[fact]), lowercase=self.rng.random() < 0.1)

    def packed(self, facts: list[str]) -> _Sentence:
        """Clause-packed: "She wears a red jacket and black trousers and carries a bag."."""
        progressive = self.rng.random() < 0.5
        verbs = {
            "wear": ("is wearing" if progressive else "wears"),
            "carry": ("is carrying" if progressive else "carries"),
            "have": "has",
        }
        clauses: dict[str, list[str]] = {}
        for f in facts:
            clauses.setdefault("have" if f == "hair" else "carry" if f == "bag" else "wear", []).append(f)
        sent = _Sentence()
        subject = pick(self.rng, ("{Pron}", "{Pron}", "{Subj}"))
        sent.add(self._word(subject[1:-1], None))
        for i, (verb, group) in enumerate(clauses.items()):
            sent.add(" and " if i else " ")
            sent.add(f"{verbs[verb]} ")
            for j, f in enumerate(group):
                if j:
                    sent.add(" and " if j == len(group) - 1 else ", ")
                sent.add(self.ph[f].np, f)
        sent.add(".")
        return sent.finish(lowercase=self.rng.random() < 0.1)

    def runon(self, facts: list[str]) -> _Sentence:
        """CUHK-PEDES style: "the man is wearing a white shirt , blue jeans and black shoes ."."""
        sent = _Sentence()
        lead, carry = pick(
            self.rng,
            (
                (f"the {self.person} is wearing ", "carrying"),
                (f"a {self.person} wearing ", "carrying"),
                (f"{self.pron} wears ", "carries"),
            ),
        )
        sent.add(lead)
        wear = [f for f in facts if f != "bag"]
        for j, f in enumerate(wear):
            if j:
                sent.add(" and " if j == len(wear) - 1 else " , ")
            sent.add(self.ph[f].np, f)
        if "bag" in facts:
            sent.add(f" and {carry} ")
            sent.add(self.ph["bag"].np, "bag")
        sent.add(pick(self.rng, (" .", ".", ".")))
        return sent.finish(lowercase=True)

    def detail(self, fact: str, kind: str) -> _Sentence | None:
        """A follow-up sentence about an already mentioned garment ("The jacket has long sleeves.")."""
        if fact == "upper":
            t = "[upper.the] has short sleeves." if kind in SHORT_SLEEVED else "[upper.the] has long sleeves."
            if kind == "coat":
                t = "[upper.the] reaches below {poss} hips."
        elif fact == "lower":
            t = {
                "shorts": "[lower.the] end above {poss} knees.",
                "skirt": "[lower.the] reaches {poss} knees.",
            }.get(kind, "[lower.the] reach down to {poss} ankles.")
        else:
            return None
        return self.render(t)

    def ungrounded(self, n: int, opener: bool) -> list[_Sentence]:
        s = self.scene
        ok = {"any", s.view, "dim" if s.brightness < 0.86 else "", "bright" if s.brightness > 1.1 else ""}
        pool = [t for t, cond in _UNGROUNDED if cond in ok]
        chosen = [pool[i] for i in self.rng.choice(len(pool), size=min(n, len(pool)), replace=False)]
        if opener:
            chosen[0] = pick(self.rng, _OPENERS)
        return [self.render(t) for t in chosen]


def build_caption(
    attrs: PersonAttrs, visible: dict[str, int], scene: SceneFacts, rng: np.random.Generator
) -> tuple[str, list[dict]]:
    """One caption and its links. `visible` maps body-part label → region id of the parts in the image."""
    w = _Writer(attrs, scene, rng)
    facts = []
    if "head" in visible:
        if rng.random() < 0.9:
            facts.append("hair")
        if attrs.hat and rng.random() < 0.8:
            facts.append("hat")
    keep_p = {"upper": 1.0, "lower": 1.0, "feet": 0.85, "bag": 0.9}
    facts += [f for f in ("upper", "lower", "feet", "bag") if f in visible and rng.random() < keep_p[f]]
    if not facts:
        facts = [f for f in FACT_PART if FACT_PART[f] in visible and (f != "hat" or attrs.hat)][:1]

    # Group facts into sentence units: a run-on block, hair+hat, clause-packed pairs/triples, singles.
    units: list[list[str]] = []
    clothing = [f for f in facts if f in ("upper", "lower", "feet", "bag")]
    runon = clothing[: int(rng.integers(3, 5))] if len(clothing) >= 3 and rng.random() < 0.35 else []
    i = 0
    while i < len(facts):
        f = facts[i]
        if runon and f == runon[0]:
            units.append(["runon", *runon])
            i += len(runon)
        elif f == "hair" and i + 1 < len(facts) and facts[i + 1] == "hat" and rng.random() < 0.5:
            units.append(["hairhat", "hair", "hat"])
            i += 2
        elif i + 1 < len(facts) and facts[i + 1] not in runon and rng.random() < 0.35:
            size = 3 if i + 2 < len(facts) and facts[i + 2] not in runon and rng.random() < 0.3 else 2
            units.append(["packed", *facts[i : i + size]])
            i += size
        else:
            units.append(["single", f])
            i += 1
    # Shuffle the order a little: swap one pair of neighbouring units.
    if len(units) > 1 and rng.random() < 0.3:
        j = int(rng.integers(len(units) - 1))
        units[j], units[j + 1] = units[j + 1], units[j]

    grounded: list[list[_Sentence]] = []
    for kind, *group in units:
        if kind == "runon":
            sents = [w.runon(group)]
        elif kind == "hairhat":
            sents = [w.render(pick(rng, _HAIR_HAT))]
        elif kind == "packed":
            sents = [w.packed(group)]
        else:
            sents = [w.single(group[0])]
        for f in group:
            garment = attrs.upper if f == "upper" else attrs.lower if f == "lower" else None
            if garment and rng.random() < 0.2 and (extra := w.detail(f, garment.kind)):
                sents.append(extra)
        grounded.append(sents)

    # 4–8 sentences in all, at least one ungroundable.
    n_grounded = sum(len(s) for s in grounded)
    n_ung = 1 + int(rng.random() < 0.45) + int(rng.random() < 0.15)
    n_ung = min(max(n_ung, 4 - n_grounded), 8 - n_grounded)
    while n_ung < 1:  # too many follow-ups: drop them before dropping the ungroundable sentence
        for sents in grounded:
            if len(sents) > 1 and n_ung < 1:
                sents.pop()
                n_ung += 1
    sentences = [s for sents in grounded for s in sents]
    opener = rng.random() < 0.3 and not sentences[0].text.startswith("A ")
    ung = w.ungrounded(n_ung, opener)
    if opener:
        sentences.insert(0, ung.pop(0))
    for s in ung:
        sentences.insert(int(rng.integers(1 if opener else 0, len(sentences) + 1)), s)

    # Assemble text and links
    text, links = "", []
    for s in sentences:
        start = len(text) + (1 if text else 0)
        text = f"{text} {s.text}" if text else s.text
        phrases = [
            {"span": [start + a, start + b], "region_id": visible[FACT_PART[f]]} for a, b, f in s.phrases
        ]
        ids = sorted({p["region_id"] for p in phrases})
        links.append({"span": [start, start + len(s.text)], "region_ids": ids, "phrases": phrases})
    return text, links
