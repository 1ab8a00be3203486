"""Tests for miners.captions: sentence + clause splitting, char spans, body-part tags."""

from __future__ import annotations

import functools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from miners.captions import CaptionSplitter, TextUnit, load_lexicon, main, part_tags
from storage.schemas import BODY_PARTS


@functools.cache
def splitter(split_clauses: bool = True) -> CaptionSplitter:
    # Cached rather than a fixture so hypothesis tests can share it across examples.
    return CaptionSplitter(split_clauses=split_clauses)


def texts(caption: str, split_clauses: bool = True) -> list[str]:
    return [u.text for u in splitter(split_clauses).split(caption)]


def check_invariants(caption: str, units: list[TextUnit]) -> None:
    previous_end = 0
    for k, unit in enumerate(units):
        assert unit.sentence_index == k
        assert 0 <= previous_end <= unit.char_start < unit.char_end <= len(caption)
        assert caption[unit.char_start : unit.char_end] == unit.text
        assert unit.text == unit.text.strip() and unit.text
        assert any(ch.isalnum() for ch in unit.text)
        assert list(unit.part_tags) == sorted(set(unit.part_tags))
        assert set(unit.part_tags) <= set(BODY_PARTS)
        previous_end = unit.char_end


# Sentences only (split_clauses=False): abbreviations, numbers, run-ons, punctuation, whitespace.
SENTENCE_CASES = [
    ("Mr. Lee wears a hat. He is tall.", ["Mr. Lee wears a hat", "He is tall"]),
    (
        "She has e.g. a scarf, i.e. a wool one. It is red!",
        ["She has e.g. a scarf, i.e. a wool one", "It is red"],
    ),
    (
        "He is approx. 1.8 metres tall vs. 1.5 metres for her.",
        ["He is approx. 1.8 metres tall vs. 1.5 metres for her"],
    ),
    (
        "She carries bags, boxes etc. and walks. He waits.",
        ["She carries bags, boxes etc. and walks", "He waits"],
    ),
    ("He carries bags, boxes etc. She waits.", ["He carries bags, boxes etc.", "She waits"]),
    ("A U.S. army jacket. Black boots.", ["A U.S. army jacket", "Black boots"]),
    ("He wears a 3.5-inch heel and a 0.5 kg bag", ["He wears a 3.5-inch heel and a 0.5 kg bag"]),
    ("A man in a coat. He has no bag", ["A man in a coat", "He has no bag"]),
    (
        "the man wears a white shirt . he has black shorts . he walks",
        ["the man wears a white shirt", "he has black shorts", "he walks"],
    ),
    ("What a day!! He runs?! Yes.. maybe", ["What a day", "He runs", "Yes", "maybe"]),
    ("a red coat\nblack boots\r\n\nno bag", ["a red coat", "black boots", "no bag"]),
    ("a red coat; black boots ; a bag", ["a red coat", "black boots", "a bag"]),
    ('She said "nice hat." He left.', ['She said "nice hat."', "He left"]),
    ("shirt.He wears boots", ["shirt", "He wears boots"]),
    ("A woman (approx. 30 years old) walks.", ["A woman (approx. 30 years old) walks"]),
    ("", []),
    ("   \n\t ", []),
    (" . ... !! ", []),
    ("  padded caption .  ", ["padded caption"]),
    ("😀 un café\u2028naïve ﬁne hat\u00a0 \u200b.", ["😀 un café", "naïve ﬁne hat"]),
    ("黑色外套。 白色鞋子.", ["黑色外套", "白色鞋子"]),
]


@pytest.mark.parametrize(("caption", "expected"), SENTENCE_CASES)
def test_sentences(caption: str, expected: list[str]) -> None:
    units = splitter(False).split(caption)
    assert [u.text for u in units] == expected
    check_invariants(caption, units)


# Clause splitting: several parts split at the separator between them, one part never split.
CLAUSE_CASES = [
    ("She wears a red jacket and black trousers.", ["She wears a red jacket", "black trousers"]),
    (
        "the man wears a white shirt , blue jeans and black shoes",
        ["the man wears a white shirt", "blue jeans", "black shoes"],
    ),
    (
        "a woman wearing a white t-shirt , a black skirt , and white shoes .",
        ["a woman wearing a white t-shirt", "a black skirt", "white shoes"],
    ),
    ("a black and white striped shirt", ["a black and white striped shirt"]),
    ("a red, white and blue dress", ["a red, white and blue dress"]),
    ("He wears a white shirt and a black jacket.", ["He wears a white shirt and a black jacket"]),
    ("a red jacket and black and white shoes", ["a red jacket", "black and white shoes"]),
    (
        "a blue shirt with white and red stripes and jeans",
        ["a blue shirt with white and red stripes", "jeans"],
    ),
    (
        "A man with short black hair is wearing a blue jacket and jeans.",
        ["A man with short black hair", "is wearing a blue jacket", "jeans"],
    ),
    ("She wears a red jacket and walks fast.", ["She wears a red jacket and walks fast"]),
    (
        "the girl has long hair and wears a white coat . she carries a red handbag in her hand .",
        ["the girl has long hair", "wears a white coat", "she carries a red handbag in her hand"],
    ),
    (
        "She wears a dress and black shoes as well as a shoulder bag",
        ["She wears a dress", "black shoes", "a shoulder bag"],
    ),
    (
        "He is walking with a black backpack and white sneakers",
        ["He is walking with a black backpack", "white sneakers"],
    ),
    (
        "he wears a hat that is on top of a hill and a bag",
        ["he wears a hat that is on top of a hill", "a bag"],
    ),
]


@pytest.mark.parametrize(("caption", "expected"), CLAUSE_CASES)
def test_clauses(caption: str, expected: list[str]) -> None:
    units = splitter(True).split(caption)
    assert [u.text for u in units] == expected
    check_invariants(caption, units)


def test_units_carry_spans_indices_and_tags() -> None:
    caption = "A man with a red cap. He wears a grey coat, blue jeans and a shoulder bag"
    units = splitter(True).split(caption)
    assert [(u.text, u.part_tags) for u in units] == [
        ("A man with a red cap", ("head",)),
        ("He wears a grey coat", ("upper",)),
        ("blue jeans", ("lower",)),
        ("a shoulder bag", ("bag",)),
    ]
    assert [u.sentence_index for u in units] == [0, 1, 2, 3]
    assert (units[2].char_start, units[2].char_end) == (caption.index("blue jeans"), caption.index(" and a"))
    assert splitter(False).split(caption)[1].part_tags == ("bag", "lower", "upper")


def test_lone_surrogate_keeps_offsets() -> None:
    caption = "a hat \ud800 here. black shoes"
    units = splitter(True).split(caption)
    assert [u.text for u in units] == ["a hat \ud800 here", "black shoes"]
    check_invariants(caption, units)


def test_split_many_matches_split_and_rejects_non_strings() -> None:
    captions = [c for c, _ in SENTENCE_CASES + CLAUSE_CASES]
    assert splitter(True).split_many(captions) == [splitter(True).split(c) for c in captions]
    with pytest.raises(TypeError, match="caption 1"):
        splitter(True).split_many(["ok", None])  # type: ignore[list-item]


WORDS = ["a", "man", "hat", "that", "shirt", "Mr.", "e.g.", "etc.", "1.5", "3.5-inch", "U.S.", "and", "with"]
PIECES = WORDS + [
    ".",
    " . ",
    "..",
    "!!",
    "?",
    ";",
    ",",
    "\n",
    " ",
    "  ",
    "-",
    '"',
    "(",
    ")",
    "é",
    "😀",
    "\u200b",
]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=40).map("".join))
def test_span_invariants_on_word_soup(caption: str) -> None:
    check_invariants(caption, splitter(True).split(caption))
    check_invariants(caption, splitter(False).split(caption))


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=60))
def test_span_invariants_on_any_text(caption: str) -> None:
    check_invariants(caption, splitter(True).split(caption))


# Lexicon
@pytest.mark.parametrize(
    ("text", "tags"),
    [
        ("a red hat", ("head",)),
        ("that is what he said", ()),
        ("Two HATS and some Sneakers", ("feet", "head")),
        ("a brown Shoulder Bag", ("bag",)),
        ("a long dress", ("lower", "upper")),
        ("a white T-shirt and jeans", ("lower", "upper")),
        ("he is on top of the stairs", ()),
        ("a tank top", ("upper",)),
        ("he stops at the shop", ()),
        ("boots, trainers and socks", ("feet",)),
        ("a backpack", ("bag",)),
    ],
)
def test_part_tags(text: str, tags: tuple[str, ...]) -> None:
    assert part_tags(text) == tags


def test_packaged_lexicon_covers_body_parts() -> None:
    lexicon = load_lexicon()
    assert tuple(lexicon) == BODY_PARTS
    assert "shoulder bag" in lexicon["bag"] and "dress" in lexicon["upper"] and "dress" in lexicon["lower"]
    assert {"hats", "shoes", "jackets", "backpacks"} <= {w for words in lexicon.values() for w in words}


def test_custom_lexicon_file_and_errors(tmp_path) -> None:
    custom = {part: [] for part in BODY_PARTS} | {"head": ["Wig"], "bag": ["tote"]}
    path = tmp_path / "lex.json"
    path.write_text(json.dumps(custom), encoding="utf-8")
    units = CaptionSplitter(lexicon_path=str(path)).split("a blonde wig and a tote")
    assert [(u.text, u.part_tags) for u in units] == [("a blonde wig", ("head",)), ("a tote", ("bag",))]
    assert part_tags("a WIG and a hat", lexicon=load_lexicon(path)) == ("head",)

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"head": ["hat"]}), encoding="utf-8")
    with pytest.raises(ValueError, match="bad.json: expected exactly the body parts"):
        load_lexicon(bad)
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        load_lexicon(bad)


def test_main_prints_json_lines(capsys, tmp_path) -> None:
    lines = tmp_path / "captions.txt"
    lines.write_text("a red jacket and black trousers\nno parts here\n", encoding="utf-8")
    assert main(["--file", str(lines)]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["caption"], r["text"], r["part_tags"]) for r in records] == [
        (0, "a red jacket", ["upper"]),
        (0, "black trousers", ["lower"]),
        (1, "no parts here", []),
    ]


def test_pipeline_is_blank_english_with_rule_components() -> None:
    nlp = splitter(True).nlp
    assert nlp.pipe_names == ["rsm_caption_sentences", "rsm_part_mentions"]
    doc = nlp("Mr. Lee wears a hat . he is tall")
    assert [t.is_sent_start for t in doc] == [True, False, False, False, False, False, True, False, False]
    assert [s.text for s in doc.sents] == ["Mr. Lee wears a hat .", "he is tall"]
