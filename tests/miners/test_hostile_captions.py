"""Hostile captions: mixed scripts, emoji sequences, control, zero-width and bidi characters, combining
marks, no punctuation at all, tens of thousands of characters.

Properties of `CaptionSplitter.split` in both modes: it never raises; every unit is a non-empty,
edge-trimmed slice `caption[char_start:char_end]`; units are ordered, disjoint and numbered 0..n-1; their
tags are body parts; and no word vanishes except the clause separators the splitter is documented to
drop. Format characters (zero-width, bidi) slipped into a caption change nothing but the spans, and a
caption of over a million characters splits in seconds. Then one seeded set of such captions goes through
the real importer and the real miner: every caption ends in exactly one outcome, and every unit of every
mined caption is a pair row.
"""

from __future__ import annotations

import json
import random
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from miners.captions import TextUnit
from miners.rsm import RSMConfig, RSMMiner
from storage.importers import RejectReason
from storage.manifest import DEFAULT_MAX_CAPTION_CHARS, import_dataset, read_manifest
from storage.schemas import STATUS_OK, ErrorKind
from tests.miners.test_captions import check_invariants, splitter

# --- building blocks ---------------------------------------------------------------------------------
# Each pool is ordered benign-first: hypothesis shrinks a sampled choice towards the first element, so a
# falsifying example comes out as plain as the failure allows.


def _letters(lo: int, hi: int) -> str:
    """The letters, marks and digits of one script block (no punctuation, which has its own pool)."""
    return "".join(chr(c) for c in range(lo, hi + 1) if unicodedata.category(chr(c))[0] in "LMN")


SCRIPTS: dict[str, str] = {
    "latin": _letters(0x41, 0x24F),
    "cyrillic": _letters(0x400, 0x4FF),
    "greek": _letters(0x370, 0x3FF),
    "hebrew": _letters(0x591, 0x5F4),
    "arabic": _letters(0x600, 0x6FF),
    "devanagari": _letters(0x900, 0x97F),
    "thai": _letters(0xE01, 0xE5B),
    "cjk": _letters(0x4E00, 0x9FFF),
    "kana": _letters(0x3041, 0x30FF),
    "hangul": _letters(0xAC00, 0xD7A3),
}
# Garment phrases the lexicon knows, clause separators and the abbreviation/number cases the splitter
# special-cases: these are what the hostile characters get interleaved with.
GARMENTS = (
    "a red jacket", "black trousers", "white sneakers", "a shoulder bag", "long black hair", "blue jeans",
    "a black and white striped shirt", "a backpack", "a cap", "grey shorts", "a long dress", "boots",
    "the man wears", "she carries", "is wearing", "and", "with", "as well as", "along with", "Mr.", "e.g.",
    "etc.", "U.S.", "3.5-inch", "on top of", "HAT", "T-shirt",
)  # fmt: skip
NATIVE_PHRASES = (
    "黑色外套", "白色鞋子", "赤いジャケット", "قميص أحمر", "حقيبة سوداء", "חולצה אדומה", "लाल शर्ट",
    "красная куртка", "เสื้อสีแดง", "빨간 재킷", "μαύρο παντελόνι",
)  # fmt: skip
EMOJI_BASES = ("😀", "👍", "👩", "👨", "👧", "🧑", "👜", "👟", "🧢", "👕", "👖", "❤", "🔬", "🚀", "🏳")
SKIN_TONES = tuple(chr(c) for c in range(0x1F3FB, 0x1F400))
REGIONAL_INDICATORS = tuple(chr(c) for c in range(0x1F1E6, 0x1F200))
C0_C1_CONTROLS = "".join(chr(c) for c in (*range(0x20), 0x7F, *range(0x80, 0xA0)))
ZERO_WIDTH = "\u200b\u200c\u200d\ufeff\u2060"
BIDI_CONTROLS = "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c"
COMBINING = "\u0301\u0300\u0308\u0327\u0336\u034f\u0489\u20dd\u20e3\u0e31\u093c\u05b0\u064b\u3099"
ODD_SPACES = " \u00a0\u3000\u2007\u202f\u205f\u1680\u2000\u200a\t\n\r\x0b\x0c\x85\u2028\u2029"
PUNCTUATION = (
    ".", " . ", "..", "...", "…", "!", "?!", ";", ",", ":", "。", "！", "？", "；", "，", "、", "-", "—",
    "(", ")", '"', "'", "”", "»", "*", "•", "/", "|", "&", "+",
)  # fmt: skip
LONE_SURROGATES = "\ud800\udbff\udc00\udfff"
INVISIBLES = ZERO_WIDTH + BIDI_CONTROLS

# The words clause splitting drops at the head of a clause ("a red jacket and black trousers" ->
# "a red jacket" | "black trousers"); any other word missing from every unit was lost.
DROPPED_SEPARATOR_WORDS = frozenset(
    {"and", "with", "while", "but", "plus", "also", "whereas", "along", "together", "as", "well"}
)

# One draw interface for two drivers: hypothesis (shrinkable draws) and a seeded `random.Random` (the
# fixed dataset of the pipeline test), so both build captions from the very same recipes.
One = Callable[[Sequence], object]  # pick one element of a non-empty sequence
Count = Callable[[int, int], int]  # an integer in [lo, hi]


def script_word(one: One, count: Count) -> str:
    letters = SCRIPTS[one(tuple(SCRIPTS))]
    return "".join(one(letters) for _ in range(count(1, 8)))


def emoji(one: One, count: Count) -> str:
    """A single emoji, one with a skin tone / VS16, a ZWJ family, a flag or a keycap."""
    kind = one(("plain", "toned", "zwj", "flag", "keycap"))
    if kind == "plain":
        return one(EMOJI_BASES)
    if kind == "toned":
        return one(EMOJI_BASES) + one(SKIN_TONES) + one(("", "\ufe0f"))
    if kind == "zwj":
        parts = [one(EMOJI_BASES) + one(("", *SKIN_TONES)) for _ in range(count(2, 5))]
        return "\u200d".join(parts) + one(("", "\ufe0f"))
    if kind == "flag":
        return one(REGIONAL_INDICATORS) + one(REGIONAL_INDICATORS)
    return one("0123456789") + "\ufe0f\u20e3"


def zalgo(one: One, count: Count) -> str:
    """A letter buried under a stack of combining marks (or marks with no base at all)."""
    base = one(("", *"aeoxZ", "ก", "क", "ש"))
    return base + "".join(one(COMBINING) for _ in range(count(1, 12)))


def disguised_garment(one: One, count: Count) -> str:
    """A garment phrase with invisible or control characters slipped between its letters."""
    text = list(one(GARMENTS))
    for _ in range(count(1, 4)):
        text.insert(count(0, len(text)), one((*INVISIBLES, *C0_C1_CONTROLS, *ODD_SPACES)))
    return "".join(text)


def run_of(chars: str) -> Callable[[One, Count], str]:
    return lambda one, count: "".join(one(chars) for _ in range(count(1, 4)))


PIECES: dict[str, Callable[[One, Count], str]] = {
    "garment": lambda one, count: one(GARMENTS),
    "space": lambda one, count: " ",
    "script": script_word,
    "native": lambda one, count: one(NATIVE_PHRASES),
    "emoji": emoji,
    "punctuation": lambda one, count: one(PUNCTUATION),
    "disguised": disguised_garment,
    "zalgo": zalgo,
    "zero_width": run_of(ZERO_WIDTH),
    "bidi": run_of(BIDI_CONTROLS),
    "control": run_of(C0_C1_CONTROLS),
    "odd_space": run_of(ODD_SPACES),
    "surrogate": run_of(LONE_SURROGATES),
}
# Pieces that hold no punctuation and no line break: a caption of these is one long run-on sentence.
UNPUNCTUATED = ("garment_word", "script", "native", "emoji_plain", "zalgo", "zero_width", "bidi")
_PLAIN_GARMENT_WORDS = tuple(w for w in GARMENTS if all(ch.isalnum() or ch == " " for ch in w))
_UNPUNCTUATED_PIECES = PIECES | {
    "garment_word": lambda one, count: one(_PLAIN_GARMENT_WORDS),
    "emoji_plain": lambda one, count: one(EMOJI_BASES) + one(("", *SKIN_TONES)),
}


def hostile_piece(one: One, count: Count) -> str:
    return PIECES[one(tuple(PIECES))](one, count)


def hostile_caption(one: One, count: Count, max_pieces: int = 40) -> str:
    return "".join(hostile_piece(one, count) for _ in range(count(0, max_pieces)))


def unpunctuated_caption(one: One, count: Count) -> str:
    words = [_UNPUNCTUATED_PIECES[one(UNPUNCTUATED)](one, count) for _ in range(count(0, 40))]
    return "".join(w + one((" ", "  ", "\u3000", "\u00a0", "")) for w in words)


def long_caption(one: One, count: Count) -> str:
    """5,000-20,000 chars cycled from a few hostile (or unpunctuated) pieces in a seeded order.

    The cycling runs on a local Random seeded by one draw: a few draws describe the whole text, where
    drawing every piece would take thousands of choices per example."""
    source = hostile_piece if one((True, False)) else (lambda o, c: unpunctuated_caption(o, c) or "a")
    pieces = [source(one, count) + one(("", " ")) for _ in range(count(1, 20))]
    target, order = count(5_000, 20_000), random.Random(count(0, 2**32))
    out: list[str] = []
    length = 0
    while length < target:
        out.append(order.choice(pieces))
        length += len(out[-1])
    return "".join(out)


@st.composite
def _drawn(draw: st.DrawFn, recipe: Callable[[One, Count], str]) -> str:
    return recipe(lambda seq: draw(st.sampled_from(seq)), lambda lo, hi: draw(st.integers(lo, hi)))


hostile_captions = _drawn(hostile_caption)
unpunctuated_captions = _drawn(unpunctuated_caption)
long_captions = _drawn(long_caption)


# --- properties ----------------------------------------------------------------------------------------
def _is_invisible(ch: str) -> bool:
    return ch.isspace() or unicodedata.category(ch) == "Cf"


def _strip_invisible(text: str) -> str:
    start, end = 0, len(text)
    while start < end and _is_invisible(text[start]):
        start += 1
    while end > start and _is_invisible(text[end - 1]):
        end -= 1
    return text[start:end]


def _gaps(caption: str, units: list[TextUnit]) -> list[str]:
    """The caption text outside every unit."""
    bounds = [0, *(b for u in units for b in (u.char_start, u.char_end)), len(caption)]
    return [caption[bounds[i] : bounds[i + 1]] for i in range(0, len(bounds), 2)]


def check_units(caption: str, units: list[TextUnit], split_clauses: bool) -> None:
    # Spans map back, ordered and disjoint, consecutive indices, non-empty stripped text, body-part tags.
    check_invariants(caption, units)
    for unit in units:
        # No zero-width / bidi / odd space left at a unit's edge (it would reach CLIP and the pairs).
        assert not _is_invisible(unit.text[0]) and not _is_invisible(unit.text[-1]), ascii(unit.text)
    # Nothing dropped silently: a letter or digit outside every unit belongs to a dropped separator word.
    for gap in _gaps(caption, units):
        words = "".join(ch if ch.isalnum() else " " for ch in gap).split()
        allowed = DROPPED_SEPARATOR_WORDS if split_clauses else frozenset()
        assert all(w.lower() in allowed for w in words), f"lost {words} from {ascii(caption)[:300]}"


def check_both_modes(caption: str) -> tuple[list[TextUnit], list[TextUnit]]:
    clauses, sentences = splitter(True).split(caption), splitter(False).split(caption)
    check_units(caption, clauses, split_clauses=True)
    check_units(caption, sentences, split_clauses=False)
    return clauses, sentences


@settings(max_examples=200, deadline=None)
@given(hostile_captions)
def test_hostile_captions_split_into_units_that_map_back(caption: str) -> None:
    check_both_modes(caption)


@settings(max_examples=150, deadline=None)
@given(hostile_captions)
def test_clauses_refine_sentences(caption: str) -> None:
    # Clause splitting only cuts inside sentences: each clause lies in exactly one sentence unit and
    # names no part that sentence does not, and every sentence keeps at least one clause.
    clauses, sentences = check_both_modes(caption)
    for clause in clauses:
        (host,) = [
            s for s in sentences if s.char_start <= clause.char_start and clause.char_end <= s.char_end
        ]
        assert set(clause.part_tags) <= set(host.part_tags)
    for sentence in sentences:
        assert any(sentence.char_start <= c.char_start and c.char_end <= sentence.char_end for c in clauses)


@settings(max_examples=150, deadline=None)
@given(unpunctuated_captions)
def test_a_caption_without_punctuation_is_one_sentence(caption: str) -> None:
    assert not any(unicodedata.category(ch).startswith("P") or ch in "\n\r\u2028\u2029" for ch in caption)
    clauses, sentences = check_both_modes(caption)
    # Nothing can end a sentence, so sentence mode returns the whole caption (minus invisible edges) or,
    # when it holds no letter or digit at all, nothing.
    expected = [_strip_invisible(caption)] if any(ch.isalnum() for ch in caption) else []
    assert [u.text for u in sentences] == expected
    assert len(clauses) >= len(sentences)


@settings(max_examples=12, deadline=None)
@given(long_captions)
def test_very_long_captions(caption: str) -> None:
    assert len(caption) >= 5_000
    clauses, sentences = check_both_modes(caption)
    assert len(clauses) >= len(sentences)


FORMAT_CHARS = ZERO_WIDTH + BIDI_CONTROLS + "\u00ad"  # all of category Cf: invisible when rendered
PLAIN_PIECES = ("garment", "space", "script", "native", "punctuation")


def plain_caption(one: One, count: Count) -> str:
    return "".join(PIECES[one(PLAIN_PIECES)](one, count) for _ in range(count(0, 30)))


@st.composite
def plain_and_disguised(draw: st.DrawFn) -> tuple[str, str]:
    """A caption without format characters, and the same caption with some slipped in anywhere."""
    plain = draw(_drawn(plain_caption))
    chars = list(plain)
    for _ in range(draw(st.integers(1, 6))):
        chars.insert(draw(st.integers(0, len(chars))), draw(st.sampled_from(FORMAT_CHARS)))
    return plain, "".join(chars)


def _visible(text: str) -> str:
    return "".join(ch for ch in text if unicodedata.category(ch) != "Cf")


@settings(max_examples=200, deadline=None)
@given(plain_and_disguised())
def test_invisible_format_characters_do_not_change_the_split(captions: tuple[str, str]) -> None:
    # A zero-width space or a bidi mark cannot be seen, so it must not hide a garment from the lexicon, a
    # period from the sentence rules or an "and" from clause splitting: the units of the disguised
    # caption are those of the plain one, the invisible characters inside them aside.
    plain, disguised = captions
    for split_clauses in (True, False):
        want = [(u.text, u.sentence_index, u.part_tags) for u in splitter(split_clauses).split(plain)]
        units = splitter(split_clauses).split(disguised)
        check_units(disguised, units, split_clauses)
        assert [(_visible(u.text), u.sentence_index, u.part_tags) for u in units] == want


# Over spaCy's default `max_length` (1,000,000 chars: ValueError E088 before the fix), and dense in part
# mentions, so a scan of every mention per sentence and unit (quadratic: about 3 minutes here before the
# fix, against seconds now) trips the timeout.
@pytest.mark.timeout(60)
def test_a_caption_of_over_a_million_chars_still_splits() -> None:
    rng = random.Random(3)
    piece = (
        hostile_caption(rng.choice, rng.randint, max_pieces=8) + " a red jacket and black trousers, a cap. "
    )
    caption = piece * (1_000_000 // len(piece) + 1)
    assert len(caption) > 1_000_000
    clauses, sentences = check_both_modes(caption)
    assert len(clauses) > len(sentences) > 10_000


@settings(max_examples=25, deadline=None)
@given(st.lists(hostile_captions, max_size=8))
def test_batched_splitting_equals_one_by_one(captions: list[str]) -> None:
    # The miner splits a whole batch in one spaCy pipe: a hostile caption must not leak into its
    # neighbours' units.
    for split_clauses in (True, False):
        s = splitter(split_clauses)
        assert s.split_many(captions, batch_size=3) == [s.split(c) for c in captions]


# --- the pipeline reports rather than drops -----------------------------------------------------------
# Fixed captions that make every importer outcome and both mining outcomes certain to occur; the seeded
# hostile ones come on top of them.
EDGE_CAPTIONS: list[object] = [
    "A man in a red jacket and black trousers. He carries a shoulder bag.",
    "  A man in a red jacket and black trousers. He carries a shoulder bag. \u3000",  # duplicate once stripped
    "A man in a red jacket and black trousers. He carries a shoulder bag.\u200b",  # not one: ZWSP is text
    "",
    " \t\u3000\u00a0 ",
    "\u200b\u200d\ufeff\u2060",  # invisible but not whitespace: imported, then no sentences
    "\u202e.teg a ni nam A\u202c",
    "😀👍🏽👩‍👩‍👧 🇺🇳 1️⃣",
    "a red jacket\x00 and boots",
    "blue jeans\x85",
    "a cap \ud800 here",
    None,
    "a" * (DEFAULT_MAX_CAPTION_CHARS + 1),
    " ".join(["a red jacket and black trousers with white sneakers"] * 70)[:3_900],  # long, no punctuation
    "رجل يرتدي قميص أحمر وبنطال أسود. He wears a black backpack; אישה עם תיק",
    "Z\u0301\u0308\u0336a\u0489l\u20ddg\u0300o t-shirt, s\u0327hoes",
    "the man wears a white shirt . he has black shorts . 他穿着黑色外套",
]
CAPTIONS_PER_RECORD = 3


def _storable(text: str) -> str:
    """`text` without the characters the importer refuses (C0/C1 controls but tab and line breaks, lone
    surrogates), so that the rest of its hostility reaches the miner."""
    return "".join(ch for ch in text if ch in "\t\n\v\f\r" or unicodedata.category(ch) not in ("Cc", "Cs"))


def seeded_captions(seed: int) -> list[str]:
    """Hostile captions from the strategies' recipes, driven by a seeded Random: most made storable (to be
    mined), some raw (to be refused), long ones both cut to just under the import limit and not."""
    rng = random.Random(seed)
    one, count = rng.choice, rng.randint
    limit = DEFAULT_MAX_CAPTION_CHARS
    return [
        *(_storable(hostile_caption(one, count)) for _ in range(20)),
        *(hostile_caption(one, count) for _ in range(6)),
        *(unpunctuated_caption(one, count) for _ in range(3)),
        *(_storable(long_caption(one, count))[: limit - k] for k in range(2)),
        *(long_caption(one, count) for _ in range(2)),
    ]


def expected_reject(raw: object, seen: set[str]) -> str | None:
    """The importer's documented verdict on one caption of an image (None: imported)."""
    if not isinstance(raw, str):
        return RejectReason.BAD_CAPTION_TYPE
    bad_control = any(unicodedata.category(ch) == "Cc" and ch not in "\t\n\v\f\r" for ch in raw)
    if bad_control or any(unicodedata.category(ch) == "Cs" for ch in raw):
        return RejectReason.BAD_TEXT
    caption = raw.strip()
    if not caption:
        return RejectReason.EMPTY_CAPTION
    if len(caption) > DEFAULT_MAX_CAPTION_CHARS:
        return RejectReason.CAPTION_TOO_LONG
    if caption in seen:
        return RejectReason.DUPLICATE
    seen.add(caption)
    return None


def test_hostile_captions_are_imported_or_rejected_and_mined_or_reported(
    tiny_clip_dir, tmp_path: Path
) -> None:
    captions = EDGE_CAPTIONS + seeded_captions(seed=6)
    per_record = [captions[i : i + CAPTIONS_PER_RECORD] for i in range(0, len(captions), CAPTIONS_PER_RECORD)]
    root = tmp_path / "cuhk"
    noise = np.random.default_rng(0).integers(0, 255, (128, 64, 3), dtype=np.uint8)
    records = []
    for i, caps in enumerate(per_record):
        path = f"cam_{i % 2}/{i:04d}.png"
        (root / "imgs" / path).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(noise).save(root / "imgs" / path)
        records.append({"id": i + 1, "file_path": path, "captions": caps, "split": "train"})
    # ensure_ascii (the default) writes lone surrogates as \ud800 escapes, as a real annotation file can.
    (root / "reid_raw.json").write_text(json.dumps(records), encoding="utf-8")

    summary = import_dataset("cuhk-pedes", root, tmp_path / "manifest.parquet")
    manifest, meta = read_manifest(tmp_path / "manifest.parquet")
    rejects = pq.read_table(summary.rejects_path).to_pylist()

    # Import: every caption is one manifest row or one reject, with the reason its text calls for.
    outcome: dict[tuple[int, int], str] = {}
    record_of = {f"imgs/{r['file_path']}": i for i, r in enumerate(records)}
    for row in manifest.to_pylist():
        key = (record_of[row["image_path"]], row["caption_index"])
        assert key not in outcome
        outcome[key] = "imported"
        assert row["caption"] == per_record[key[0]][key[1]].strip()
    for reject in rejects:
        key = (reject["record_index"], reject["caption_index"])
        assert key not in outcome
        outcome[key] = reject["reason"]
        # A reject message is one printable line: no raw control, bidi or zero-width char of the caption.
        assert reject["message"] and not any(unicodedata.category(ch)[0] == "C" for ch in reject["message"])
    expected = {}
    for r, caps in enumerate(per_record):
        seen: set[str] = set()
        expected |= {(r, c): expected_reject(raw, seen) or "imported" for c, raw in enumerate(caps)}
    assert outcome == expected
    assert summary.rows == manifest.num_rows and sum(summary.rejected.values()) == len(rejects)
    caption_reasons = {RejectReason.BAD_CAPTION_TYPE, RejectReason.BAD_TEXT, RejectReason.EMPTY_CAPTION}
    caption_reasons |= {RejectReason.CAPTION_TOO_LONG, RejectReason.DUPLICATE}
    assert set(expected.values()) == {"imported", *caption_reasons}  # every outcome did occur

    # Mining: one status row per manifest row, in order; every unit of an "ok" row is one pair row.
    miner = RSMMiner(RSMConfig(clip_model=str(tiny_clip_dir), images_per_batch=4))
    result = miner.mine(manifest, meta["root"])
    assert result.status["sample_id"].to_pylist() == manifest["sample_id"].to_pylist()
    pairs_of: dict[str, list[dict]] = {}
    for pair in result.pairs.to_pylist():
        pairs_of.setdefault(pair["sample_id"], []).append(pair)
    statuses = Counter()
    for row, status in zip(manifest.to_pylist(), result.status.to_pylist(), strict=True):
        units = splitter(miner.cfg.split_clauses).split(row["caption"])
        statuses[status["status"]] += 1
        # The images are all fine, so the caption alone decides: units -> ok, none -> no_sentences.
        if units:
            assert (status["status"], status["error_message"]) == (STATUS_OK, None)
            assert status["n_sentences"] == status["n_pairs"] == len(units)
            got = sorted(pairs_of.pop(row["sample_id"]), key=lambda p: p["sentence_index"])
            assert [(p["sentence_index"], p["sentence"], p["char_start"], p["char_end"]) for p in got] == [
                (u.sentence_index, u.text, u.char_start, u.char_end) for u in units
            ]
            assert [tuple(p["part_tags"]) for p in got] == [u.part_tags for u in units]
            assert all(np.isfinite(p["reliability"]) and 0.0 <= p["reliability"] <= 1.0 for p in got)
        else:
            assert status["status"] == ErrorKind.NO_SENTENCES and row["sample_id"] in status["error_message"]
            assert status["n_pairs"] == 0
    assert not pairs_of, f"pairs for rows that were not mined ok: {sorted(pairs_of)}"
    assert statuses[STATUS_OK] > 0 and statuses[ErrorKind.NO_SENTENCES] > 0

    # The hostile text survives storage: pairs and status round-trip through Parquet unchanged.
    for table in (result.pairs, result.status):
        pq.write_table(table, tmp_path / "t.parquet")
        assert pq.read_table(tmp_path / "t.parquet").equals(table)
