"""Each identity's clothing as plain words, read from the synthetic benchmark's identity file.

Consumes `DIR/synth_identities.json` (written by `storage.synth.generate`; one entry per identity with
its `PersonAttrs` as JSON). Produces, per person id, body part → slot → the words a caption may use
for that person without lying (`read_identity_attributes`), and the words a caption may use for a
slot at all (`attribute_vocabulary`). A slot is "colour" (the colours of the part's garments, and the
hair colour for the head) or "garment" (the garment nouns of the part: a hat for the head).

The QA content test (miners.caption_noise.attribute_swap) uses the two to replace a colour or garment
word of a caption by one that is false for the person. "Not false" is wider than the person's own
words, so that a replacement is false beyond doubt: synonyms the caption writer uses (grey/gray,
jacket/coat), near kinds (a t-shirt, a shirt and a blouse; trousers and jeans), hypernyms ("top",
"shoes", "bag", "hat") and near hair colours (blonde hair next to yellow). The tables come from the
caption writer (storage.synth.text), so they cannot drift from what the captions say.

Only parts the person has appear in its mapping: no "bag" key without a bag; the head is always there
(hair), its garment set empty without a hat.
"""

from __future__ import annotations

import json
from pathlib import Path

from storage.synth.draw import COLOURS, HAIR_RGB
from storage.synth.generate import IDENTITIES_FILE
from storage.synth.text import (
    _BAG_NOUNS,
    _COLOUR_WORDS,
    _HAIR_COLOUR_WORDS,
    _HAT_NOUNS,
    _LOWER_NOUNS,
    _SHOE_NOUNS,
    _UPPER_NOUNS,
)

SLOTS = ("colour", "garment")
AttributeWords = dict[str, dict[str, frozenset[str]]]  # body part → slot → words

# Garment nouns per body part and kind (the head's garment is the hat)
_NOUNS: dict[str, dict[str, tuple[str, ...]]] = {
    "head": _HAT_NOUNS,
    "upper": _UPPER_NOUNS,
    "lower": _LOWER_NOUNS,
    "feet": _SHOE_NOUNS,
    "bag": _BAG_NOUNS,
}
# Kinds close enough that calling one by the other's name is no clear lie
_FAMILIES: dict[str, tuple[frozenset[str], ...]] = {
    "upper": (
        frozenset({"jacket", "coat"}),
        frozenset({"sweater", "hoodie"}),
        frozenset({"t-shirt", "shirt", "blouse"}),
    ),
    "lower": (frozenset({"trousers", "jeans"}),),
}
# Words that fit any garment of the part (a cap is a hat, sneakers are shoes)
_GENERIC: dict[str, frozenset[str]] = {
    "head": frozenset({"hat"}),
    "upper": frozenset({"top"}),
    "feet": frozenset({"shoes"}),
    "bag": frozenset({"bag"}),
}
# Words of one kind that are not false for it though another kind owns them ("short pants" are pants)
_ALSO: dict[str, dict[str, frozenset[str]]] = {"lower": {"shorts": frozenset({"pants"})}}
# Hair colours and the palette colours that come close to them
_HAIR_NEAR: dict[str, frozenset[str]] = {
    "blonde": frozenset({"yellow", "beige"}),
    "grey": frozenset({"white"}),
}


def _colour_words(name: str) -> frozenset[str]:
    return frozenset(_COLOUR_WORDS.get(name, (name,)))


def _hair_words(name: str) -> frozenset[str]:
    return frozenset(_HAIR_COLOUR_WORDS.get(name, (name,))) | _HAIR_NEAR.get(name, frozenset())


def attribute_vocabulary() -> AttributeWords:
    """Body part → slot → every word (lower case) the benchmark's captions use for that slot."""
    palette = frozenset().union(*(_colour_words(c) for c in COLOURS))
    hair = frozenset().union(*(_hair_words(c) for c in HAIR_RGB))
    return {
        part: {
            "colour": palette | hair if part == "head" else palette,
            "garment": frozenset(n.lower() for names in kinds.values() for n in names),
        }
        for part, kinds in _NOUNS.items()
    }


def _garment_words(part: str, kind: str) -> frozenset[str]:
    kinds = {kind}.union(*(f for f in _FAMILIES.get(part, ()) if kind in f))
    words = {n.lower() for k in kinds for n in _NOUNS[part][k]}
    return frozenset(words | _GENERIC.get(part, frozenset()) | _ALSO.get(part, {}).get(kind, frozenset()))


def _garment(part: str, g: dict) -> dict[str, frozenset[str]]:
    colours = _colour_words(g["colour"]) | (_colour_words(g["colour2"]) if g.get("colour2") else frozenset())
    return {"colour": colours, "garment": _garment_words(part, g["kind"])}


def person_attribute_words(attributes: dict) -> AttributeWords:
    """Body part → slot → the words that are not false of this person (`PersonAttrs.to_json` input)."""
    hat = attributes.get("hat")
    head = _garment("head", hat) if hat else {"colour": frozenset(), "garment": frozenset()}
    out: AttributeWords = {
        "head": {
            "colour": head["colour"] | _hair_words(attributes["hair_colour"]),
            "garment": head["garment"],
        },
        "upper": _garment("upper", attributes["upper"]),
        "lower": _garment("lower", attributes["lower"]),
        "feet": _garment("feet", attributes["shoes"]),
    }
    if attributes.get("bag"):
        out["bag"] = _garment("bag", attributes["bag"])
    return out


def read_identity_attributes(dataset_dir: str | Path) -> dict[int, AttributeWords] | None:
    """Person id → `person_attribute_words`, from `dataset_dir/synth_identities.json`; None when the
    dataset has no such file (it is not the synthetic benchmark). Raises ValueError when it is malformed."""
    path = Path(dataset_dir) / IDENTITIES_FILE
    if not path.is_file():
        return None
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
        return {int(e["id"]): person_attribute_words(e["attributes"]) for e in entries}
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ValueError(f"{path}: not a synthetic identity file ({type(exc).__name__}: {exc})") from exc


__all__ = [
    "SLOTS",
    "AttributeWords",
    "attribute_vocabulary",
    "person_attribute_words",
    "read_identity_attributes",
]
