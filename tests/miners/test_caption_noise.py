"""Known-noise injection: the requested fraction of units replaced by another person's, spans intact;
attribute swaps that make a unit false for its person; same-part donors."""

import json
import re

import numpy as np
import pyarrow.compute as pc
import pytest

from miners.caption_noise import (
    attribute_candidates,
    attribute_swap,
    colour_swap,
    corpus_garments,
    garment_swap,
    pick_same_part_donor,
    shuffle_caption_units,
)
from miners.captions import COLOUR_WORDS, CaptionSplitter
from storage.manifest import read_manifest
from storage.synth.generate import IDENTITIES_FILE
from storage.synth.identities import attribute_vocabulary, read_identity_attributes


def test_shuffle_caption_units(tiny_dataset):
    table, _ = read_manifest(tiny_dataset / "manifest.parquet")
    noisy, injected = shuffle_caption_units(table, 0.3, seed=5)
    splitter = CaptionSplitter()
    train = table.filter(pc.equal(table["split"], "train"))
    n_units = sum(len(u) for u in splitter.split_many(train["caption"].to_pylist()))
    assert abs(len(injected) - 0.3 * n_units) <= 2
    before = dict(zip(table["sample_id"].to_pylist(), table.to_pylist(), strict=True))
    after = dict(zip(noisy["sample_id"].to_pylist(), noisy.to_pylist(), strict=True))
    changed = {i["sample_id"] for i in injected}
    pid_of_text = {}
    for row in before.values():
        for u in splitter.split(row["caption"]):
            pid_of_text.setdefault(u.text, set()).add(row["person_id"])
    for sid, row in after.items():
        if sid in changed:
            assert row["caption"] != before[sid]["caption"] and row["gt_links"] is None
        else:
            assert row == before[sid]  # test split and untouched captions unchanged
    for inj in injected:
        assert inj["replacement"] in after[inj["sample_id"]]["caption"]
        # the donor is another person's unit
        assert pid_of_text[inj["replacement"]] - {before[inj["sample_id"]]["person_id"]}
    again, injected_again = shuffle_caption_units(table, 0.3, seed=5)
    assert again.equals(noisy) and injected_again == injected
    with pytest.raises(ValueError, match="fraction"):
        shuffle_caption_units(table, 1.5, seed=0)


# ------------------------------------------------------------------------------------ attribute swaps


def _own_words(attributes: dict) -> dict[str, dict[str, set[str]]]:
    """What each part of a synthetic person really is, straight from the caption writer's tables (not
    through storage.synth.identities, so a wrong reader cannot hide a wrong swap)."""
    from storage.synth import text

    def colours(*names):
        return {w for n in names if n for w in text._COLOUR_WORDS.get(n, (n,))}

    def garment(table, g):
        return {
            "colour": colours(g["colour"], g.get("colour2")),
            "garment": {w.lower() for w in table[g["kind"]]},
        }

    hat = attributes["hat"]
    hair = set(text._HAIR_COLOUR_WORDS.get(attributes["hair_colour"], (attributes["hair_colour"],)))
    out = {
        "head": {
            "colour": hair | (colours(hat["colour"]) if hat else set()),
            "garment": {w.lower() for w in text._HAT_NOUNS[hat["kind"]]} if hat else set(),
        },
        "upper": garment(text._UPPER_NOUNS, attributes["upper"]),
        "lower": garment(text._LOWER_NOUNS, attributes["lower"]),
        "feet": garment(text._SHOE_NOUNS, attributes["shoes"]),
    }
    if attributes["bag"]:
        out["bag"] = garment(text._BAG_NOUNS, attributes["bag"])
    return out


def test_attribute_swap_never_names_what_the_person_wears(tiny_dataset):
    identities = read_identity_attributes(tiny_dataset)
    raw = {e["id"]: e["attributes"] for e in json.loads((tiny_dataset / IDENTITIES_FILE).read_text())}
    assert identities is not None and set(identities) == set(raw)
    vocabulary = attribute_vocabulary()
    table, _ = read_manifest(tiny_dataset / "manifest.parquet")
    splitter = CaptionSplitter()
    swapped = 0
    for row in table.to_pylist():
        pid = row["person_id"]
        own = _own_words(raw[pid])
        for unit in splitter.split(row["caption"]):
            if not unit.part_tags:
                assert (
                    attribute_swap(
                        unit.text, unit.part_tags, identities[pid], np.random.default_rng(0), vocabulary
                    )
                    is None
                )
                continue
            candidates = attribute_candidates(unit.text, unit.part_tags, identities[pid], vocabulary)
            for seed in range(4):
                out = attribute_swap(
                    unit.text, unit.part_tags, identities[pid], np.random.default_rng(seed), vocabulary
                )
                if out is None:
                    assert not candidates
                    continue
                swapped += 1
                # Exactly one candidate word replaced; the rest of the text kept (but "a"/"an" before it)
                hits = [
                    (s, e, w)
                    for s, e, words in candidates
                    for w in words
                    if _norm(out) == _norm(unit.text[:s] + w + unit.text[e:])
                ]
                assert hits, (unit.text, out)
                s, e, new = hits[0]
                old = unit.text[s:e].lower()
                have = [p for p in unit.part_tags if p in own]
                slot = "colour" if any(old in vocabulary[p]["colour"] for p in have) else "garment"
                # The replaced word was true of the person; the new one is of the same slot and false
                assert any(old in own[p][slot] for p in have), (unit.text, old)
                parts = have if slot == "colour" else [p for p in have if old in vocabulary[p]["garment"]]
                for p in parts:
                    assert new in vocabulary[p][slot] and new not in own[p][slot], (unit.text, out, p)
                    assert new not in identities[pid][p][slot]  # nor a synonym or near kind of it
    assert swapped > 50  # the tiny benchmark's captions are full of colours and garments


def _norm(text: str) -> str:
    return re.sub(r"\ban\b", "a", text.lower())


def test_attribute_swap_keeps_the_slot_case_and_article():
    vocabulary = {"upper": {"colour": {"green", "orange"}, "garment": {"top", "hoodie"}}}
    person = {"upper": {"colour": {"green"}, "garment": {"top", "hoodie"}}}  # no false garment word
    rng = np.random.default_rng(0)
    assert (
        attribute_swap("She wears a green top", ("upper",), person, rng, vocabulary)
        == "She wears an orange top"
    )
    assert attribute_swap("Green top on", ("upper",), person, rng, vocabulary) == "Orange top on"
    # "on top" names no garment; a hoodie has a false colour only
    assert attribute_candidates("On top, a green hoodie", ("upper",), person, vocabulary) == [
        (10, 15, ("orange",))
    ]


def test_attribute_swap_returns_none_when_nothing_can_be_made_false():
    vocabulary = attribute_vocabulary()
    person = {"upper": {"colour": frozenset({"green"}), "garment": frozenset({"blouse", "top"})}}
    rng = np.random.default_rng(0)
    assert attribute_swap("She looks relaxed", (), person, rng, vocabulary) is None  # no part named
    assert attribute_swap("a red handbag", ("bag",), person, rng, vocabulary) is None  # she has no bag
    assert attribute_swap("a red jacket", ("upper",), person, rng, vocabulary) is None  # not her words
    everything = {"upper": {s: vocabulary["upper"][s] for s in ("colour", "garment")}}
    assert attribute_swap("a green blouse", ("upper",), everything, rng, vocabulary) is None  # no false word


def test_same_part_donor_is_another_person_naming_the_same_part():
    persons = np.array([1, 1, 2, 2, 3, 3])
    parts = np.array(["upper", "lower", "upper", "lower|upper", "lower", ""], dtype=object)
    pool = np.arange(persons.size)
    for seed in range(20):
        rng = np.random.default_rng(seed)
        d = pick_same_part_donor(rng, pool, persons, parts, 1, "upper")
        assert d == 2  # the only other person's "upper" unit ("lower|upper" is another tag set)
        d = pick_same_part_donor(rng, pool, persons, parts, 1, "lower")
        assert d == 4
    assert pick_same_part_donor(np.random.default_rng(0), pool, persons, parts, 2, "lower|upper") is None
    assert pick_same_part_donor(np.random.default_rng(0), pool, persons, parts, 3, "") is None


def test_colour_swap_changes_one_colour_to_one_the_text_does_not_name():
    rng = np.random.default_rng(3)
    for text in ("a red jacket and black shoes", "An orange top", "his Gray hat", "a black and white shirt"):
        for _ in range(20):
            new = colour_swap(text, rng)
            old_words, new_words = text.lower().replace("gray", "grey").split(), new.lower().split()
            changed = [(a, b) for a, b in zip(old_words, new_words, strict=True) if a != b]
            colour = [(a, b) for a, b in changed if a in COLOUR_WORDS]
            assert len(colour) == 1 and colour[0][1] in COLOUR_WORDS and colour[0][1] not in old_words
            assert all(a in ("a", "an") for a, _ in changed if (a, _) not in colour)  # only the article
    assert colour_swap("An orange top", np.random.default_rng(0)).split()[0] in ("A", "An")
    assert colour_swap("a plain top, no colour", rng) is None


def test_garment_swap_names_another_kind_of_the_same_part():
    from miners.attribute_probe import GARMENT_KINDS, garment_words

    rng = np.random.default_rng(4)
    for text, part in (
        ("black denim jeans", "lower"),
        ("An orange hoodie", "upper"),
        ("white sneakers", "feet"),
    ):
        seen = set()
        for _ in range(30):
            new = garment_swap(text, rng)
            (_, _, new_part, new_kind), *_ = garment_words(new)
            assert new_part == part and new_kind != garment_words(text)[0][3]
            seen.add(new_kind)
        assert seen <= set(GARMENT_KINDS[part]) and len(seen) > 1  # drawn among the part's other kinds
    assert garment_swap("An orange hoodie", np.random.default_rng(0)).split()[0] in ("A", "An")
    assert garment_swap("a green top and a bag", rng) is None  # generic nouns only


def test_corpus_garments_limit_the_swap_to_kinds_the_data_names():
    from miners.attribute_probe import garment_words

    corpus = ["He wears white trainers.", "Black boots.", "white trainers", "grey sneakers", "blue jeans"]
    worn = corpus_garments(corpus)
    # Kinds by their most used phrase; a part or kind the corpus never names is absent
    assert worn == {"feet": {"boots": "boots", "sneakers": "trainers"}, "lower": {"jeans": "jeans"}}
    assert corpus_garments(reversed(corpus)) == worn  # independent of order
    rng = np.random.default_rng(0)
    assert {garment_swap("red boots", rng, worn) for _ in range(20)} == {"red trainers"}
    # A part with no other worn kind falls back to the lexicon's kinds (never returns the same kind)
    swapped = {garment_words(garment_swap("blue jeans", rng, worn))[0][3] for _ in range(30)}
    assert "jeans" not in swapped and len(swapped) > 1
