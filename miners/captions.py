"""Caption splitting: one pedestrian caption -> ordered text units (sentences, then part clauses).

Consumes raw captions (`str`, any style: "He wears a red jacket." or CUHK-PEDES "the man wears a
white shirt . he has black shorts") and the body-part lexicon `miners/data/part_lexicon.json`.
Produces `list[TextUnit]` per caption: each unit's text, its exact char span `[char_start, char_end)`
in the original caption (`caption[char_start:char_end] == text`), its index in the caption and the
body-part tags (`storage.schemas.BODY_PARTS`) its words name.

The pipeline is `spacy.blank("en")` plus rule components only (no model download):
  tokenizer (+ abbreviation special cases) -> `rsm_caption_sentences` (sets `token.is_sent_start`)
  -> `rsm_part_mentions` (PhraseMatcher on the lexicon, writes `doc.spans["rsm_parts"]`).
Clause splitting then runs on the tokens: a sentence naming two different parts in a row is cut at
the last separator run (comma, "and", "with", "is wearing", ...) between the two part nouns, so
"She wears a red jacket and black trousers" -> "She wears a red jacket" | "black trousers", while a
colour coordination ("a black and white striped shirt") never counts as a separator.
Format characters (zero-width, bidi controls, BOM, soft hyphen) are invisible to the rules: they run on
the caption without them, and each unit's span, mapped back, keeps the ones inside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import re
import sys
import unicodedata
from bisect import bisect_left
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy
import spacy
from spacy.attrs import SENT_START
from spacy.language import Language
from spacy.matcher import PhraseMatcher
from spacy.tokens import Doc, Span, Token
from spacy.util import filter_spans

from storage.schemas import BODY_PARTS

SPANS_KEY = "rsm_parts"

# Sentence ends: a token made only of these chars; newline-like whitespace also ends a sentence.
_SENT_PUNCT = frozenset(".!?;…。！？；")
_NEWLINES = frozenset("\n\r\u2028\u2029\x0b\x0c\x85")
# Closing quotes/brackets glued to a sentence end belong to that sentence.
_CLOSERS = frozenset(")]}\"'”’»")
# Punctuation-only tokens trimmed from the edges of every unit.
_TRIM_CHARS = frozenset(".,;:!?…-–—*•·/|。！？；，、")

# Abbreviations kept as one token; only the sentence-final ones may end a sentence (before a capital).
ABBREVIATIONS: tuple[str, ...] = (
    "mr.", "mrs.", "ms.", "dr.", "prof.", "st.", "jr.", "sr.", "e.g.", "i.e.", "approx.", "appr.",
    "vs.", "etc.", "incl.", "esp.", "u.s.", "u.k.", "a.m.", "p.m.", "no.", "ca.", "cf.", "resp.",
)  # fmt: skip
_FINAL_ABBREVIATIONS = frozenset({"etc.", "a.m.", "p.m.", "no."})

# Clause separators. Dropped ones vanish from the clause edge; right-attached ones (verbs, pronouns)
# start the next clause: "black hair is wearing a coat" -> "black hair" | "is wearing a coat".
_DROP_WORDS = frozenset({",", "and", "with", "while", "but", "plus", "&", "+", "also", "whereas"})
_RIGHT_WORDS = frozenset((
    "wearing", "wears", "wear", "wore", "worn", "dressed", "carrying", "carries", "carry", "carried",
    "holding", "holds", "hold", "has", "have", "having", "had", "is", "are", "was", "were", "who", "which",
    "he", "she", "they", "his", "her", "their", "in", "sporting",
))  # fmt: skip
_COORDINATORS = frozenset({"and", "or", ",", "&", "/"})
# Basic colour terms of pedestrian captions (CUHK-PEDES, ICFG-PEDES, RSTPReid all use these), one
# spelling each; refine_clip swaps one for another to make a hard negative sentence.
COLOUR_WORDS: tuple[str, ...] = (
    "black", "white", "red", "blue", "green", "yellow", "orange", "purple", "pink", "brown", "grey",
    "beige",
)  # fmt: skip
# Words that coordinate inside one garment phrase ("black and white", "long and curly"): an "and"
# between two of them joins modifiers, it does not separate part phrases.
_MODIFIERS = frozenset((
    "black", "white", "red", "blue", "green", "yellow", "orange", "purple", "pink", "brown", "grey",
    "gray", "beige", "tan", "navy", "khaki", "maroon", "violet", "cream", "gold", "golden", "silver",
    "dark", "light", "bright", "pale", "deep", "greyish", "grayish", "bluish", "reddish", "striped",
    "plaid", "checked", "checkered", "dotted", "floral", "patterned", "printed", "colored", "coloured",
    "colorful", "colourful", "long", "short", "curly", "straight", "wavy", "loose", "tight", "baggy",
    "slim", "wide", "thick", "thin", "big", "small", "large", "little", "plain", "casual", "formal",
    "denim", "leather", "cotton",
))  # fmt: skip
# Lexicon hits inside these phrases are not garments ("on top of the bag").
_EXCLUDED_PHRASES = ("top of",)
_SURROGATES = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class TextUnit:
    """One sentence or clause of a caption; `caption[char_start:char_end] == text`."""

    text: str
    char_start: int  # [start, end) in the caption, in Python str indices
    char_end: int
    sentence_index: int  # index of the unit within its caption (0..), units ordered by position
    part_tags: tuple[str, ...]  # sorted body-part tags found by the lexicon, () if none


def load_lexicon(path: str | Path | None = None) -> dict[str, list[str]]:
    """Body part -> lower-cased phrases, from `path` or the packaged `miners/data/part_lexicon.json`."""
    if path is None:
        source = "miners/data/part_lexicon.json"
        raw = resources.files("miners").joinpath("data/part_lexicon.json").read_text(encoding="utf-8")
    else:
        source = str(path)
        raw = Path(path).read_text(encoding="utf-8")
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"{source}: not valid JSON ({err})") from err
    if not isinstance(data, dict) or set(data) != set(BODY_PARTS):
        got = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{source}: expected exactly the body parts {list(BODY_PARTS)} as keys, got {got}")
    lexicon: dict[str, list[str]] = {}
    for part in BODY_PARTS:
        phrases = data[part]
        if not isinstance(phrases, list) or not all(isinstance(p, str) and p.strip() for p in phrases):
            raise ValueError(f"{source}: '{part}' must be a list of non-empty strings")
        lexicon[part] = list(dict.fromkeys(" ".join(p.lower().split()) for p in phrases))
    return lexicon


# Sentence segmentation
@Language.component("rsm_caption_sentences")
def caption_sentences(doc: Doc) -> Doc:
    """Set `is_sent_start` on every token: rule boundaries robust to abbreviations and " . " run-ons."""
    n = len(doc)
    starts = [False] * n
    i = 0
    while i < n:
        if _ends_sentence(doc, i):
            # Absorb the rest of a punctuation run ("!!", "?!") and glued closing quotes/brackets.
            j = i + 1
            while j < n and (
                _is_sent_punct(doc[j].text) or (doc[j].text in _CLOSERS and not doc[j - 1].whitespace_)
            ):
                j += 1
            if j < n:
                starts[j] = True
            i = j
        else:
            i += 1
    if n:
        # One array write instead of n `token.is_sent_start` setters (each re-checks the parse).
        starts[0] = True
        values = numpy.where(numpy.asarray(starts), 1, -1).astype("uint64").reshape(n, 1)
        doc.from_array([SENT_START], values)
    return doc


def _is_sent_punct(text: str) -> bool:
    return all(ch in _SENT_PUNCT for ch in text)


def _ends_sentence(doc: Doc, i: int) -> bool:
    token = doc[i]
    text = token.text
    nxt = doc[i + 1] if i + 1 < len(doc) else None
    if token.is_space:
        return any(ch in _NEWLINES for ch in text)
    if _is_sent_punct(text):
        glued_left = i > 0 and not doc[i - 1].whitespace_
        if text == "." and glued_left and doc[i - 1].lower_ + "." in ABBREVIATIONS:
            # The tokenizer split an abbreviation off its period (e.g. "approx" inside brackets).
            return _abbreviation_ends(doc[i - 1].lower_ + ".", token, nxt)
        # "3 .5" style numbers: a period glued to a following digit is not an end.
        return not (text == "." and nxt is not None and not token.whitespace_ and nxt.text[:1].isdigit())
    if text.endswith(".") and len(text) > 1 and not text[:-1].replace(".", "").isdigit():
        return _abbreviation_ends(token.lower_, token, nxt)
    return False


def _abbreviation_ends(abbr: str, token: Token, nxt: Token | None) -> bool:
    """An abbreviation ends a sentence only if it may do so and a capitalised word follows."""
    if nxt is None or not token.whitespace_:
        return False
    if abbr in ABBREVIATIONS and abbr not in _FINAL_ABBREVIATIONS:
        return False
    return nxt.text[:1].isupper()


# Part mentions
@Language.factory("rsm_part_mentions", default_config={"lexicon": None})
def make_part_mentions(nlp: Language, name: str, lexicon: dict[str, list[str]] | None) -> PartMentions:
    return PartMentions(nlp, lexicon if lexicon is not None else load_lexicon())


class PartMentions:
    """Writes `doc.spans[SPANS_KEY]`: non-overlapping lexicon hits (longest first), one span per tag."""

    def __init__(self, nlp: Language, lexicon: dict[str, list[str]]):
        # LOWER + the same tokenizer: case-insensitive whole-token matches ("hat" never hits "that").
        self.matcher = PhraseMatcher(nlp.vocab, attr="LOWER")
        for part, phrases in lexicon.items():
            self.matcher.add(part, list(nlp.tokenizer.pipe(phrases)))
        self.excluded = PhraseMatcher(nlp.vocab, attr="LOWER")
        self.excluded.add("EXCLUDED", list(nlp.tokenizer.pipe(_EXCLUDED_PHRASES)))

    def __call__(self, doc: Doc) -> Doc:
        tags: dict[tuple[int, int], set[str]] = {}
        for match_id, start, end in self.matcher(doc):
            tags.setdefault((start, end), set()).add(doc.vocab.strings[match_id])
        blocked = [(s, e) for _, s, e in self.excluded(doc)]
        candidates = [
            doc[s:e] for s, e in tags if not any(bs <= s and e <= be for bs, be in blocked)
        ]  # fmt: skip
        spans = []
        for span in sorted(filter_spans(candidates), key=lambda sp: sp.start):
            spans.extend(
                Span(doc, span.start, span.end, label=tag) for tag in sorted(tags[span.start, span.end])
            )
        doc.spans[SPANS_KEY] = spans
        return doc


@dataclass(frozen=True)
class _Mention:
    start: int  # token indices, [start, end)
    end: int
    tags: frozenset[str]


def _mentions(doc: Doc) -> list[_Mention]:
    grouped: dict[tuple[int, int], set[str]] = {}
    for span in doc.spans[SPANS_KEY]:
        grouped.setdefault((span.start, span.end), set()).add(span.label_)
    return [_Mention(s, e, frozenset(t)) for (s, e), t in sorted(grouped.items())]


def _mentions_within(mentions: list[_Mention], starts: list[int], lo: int, hi: int) -> list[_Mention]:
    """The mentions inside tokens [lo, hi); `starts` are the mentions' starts.

    Mentions are sorted and disjoint, so those inside form one run from the first starting at `lo`:
    found by bisection, which keeps a long caption linear (a scan of every mention per sentence and per
    unit made a 200,000-char caption take seconds, a 1,000,000-char one minutes)."""
    first = last = bisect_left(starts, lo)
    while last < len(mentions) and mentions[last].end <= hi:
        last += 1
    return mentions[first:last]


def build_nlp(lexicon: dict[str, list[str]] | None = None) -> Language:
    """spacy.blank("en") + abbreviation special cases + the two rule components."""
    nlp = spacy.blank("en")
    # spaCy refuses texts over 1,000,000 chars to protect parser/NER memory; these rule components
    # need none, and a caption that long must still split (the importer bounds caption length).
    nlp.max_length = sys.maxsize
    for abbr in ABBREVIATIONS:
        for variant in {abbr, abbr.capitalize(), abbr.upper()}:
            nlp.tokenizer.add_special_case(variant, [{"ORTH": variant}])
    nlp.add_pipe("rsm_caption_sentences")
    nlp.add_pipe("rsm_part_mentions", config={"lexicon": lexicon if lexicon is not None else load_lexicon()})
    return nlp


# Clause splitting
def _separator_kind(doc: Doc, i: int) -> str | None:
    """'drop', 'right' or None for token i, judged in context."""
    lower = doc[i].lower_
    prev = doc[i - 1].lower_ if i > 0 else ""
    nxt = doc[i + 1].lower_ if i + 1 < len(doc) else ""
    if lower in _COORDINATORS and prev in _MODIFIERS and nxt in _MODIFIERS:
        return None  # "black and white", "long and curly": one garment phrase
    if lower in _DROP_WORDS:
        return "drop"
    if lower in ("along", "together") and nxt == "with":
        return "drop"
    if lower in ("as", "well") and _in_as_well_as(doc, i):
        return "drop"
    if lower in _RIGHT_WORDS:
        return "right"
    return None


def _in_as_well_as(doc: Doc, i: int) -> bool:
    for first in range(max(0, i - 2), i + 1):
        if [t.lower_ for t in doc[first : first + 3]] == ["as", "well", "as"]:
            return True
    return False


def _cut_between(doc: Doc, lo: int, hi: int) -> int | None:
    """Start of the last separator run among tokens [lo, hi), or None if there is none."""
    cut = None
    prev_was_separator = False
    for i in range(lo, hi):
        is_separator = _separator_kind(doc, i) is not None
        if is_separator and not prev_was_separator:
            cut = i
        prev_was_separator = is_separator
    return cut


def _clause_ranges(doc: Doc, sent: Span, inside: list[_Mention]) -> list[tuple[int, int]]:
    """Token ranges of the clauses of `sent`, given the mentions `inside` it."""
    cuts = []
    for left, right in zip(inside, inside[1:], strict=False):
        if left.tags & right.tags:
            continue  # same part named twice ("a shirt and a jacket"): one unit
        cut = _cut_between(doc, left.end, right.start)
        if cut is not None:
            cuts.append(cut)
    bounds = [sent.start, *cuts, sent.end]
    return list(zip(bounds, bounds[1:], strict=False))


def _is_invisible(ch: str) -> bool:
    return ch.isspace() or unicodedata.category(ch) == "Cf"


def _without_format_chars(text: str) -> tuple[str, list[int] | None]:
    """`text` minus its format characters (category Cf: zero-width, bidi, BOM, soft hyphen) and, when it
    had any, the index in `text` of every char kept.

    Glued to a word they are invisible yet make a different token: "jacket\u200b" is no garment and
    "jacket\u200b." no sentence end. So the rules run on the text without them, and the units' spans are
    mapped back to the caption (which keeps them, inside the units)."""
    if text.isascii():  # no ASCII char is Cf: the common case costs no scan
        return text, None
    kept = [i for i, ch in enumerate(text) if unicodedata.category(ch) != "Cf"]
    if len(kept) == len(text):
        return text, None
    return "".join(text[i] for i in kept), kept


def _trim(doc: Doc, start: int, end: int, drop_leading_separators: bool) -> tuple[int, int]:
    def is_trim(tok: Token) -> bool:
        return all(ch in _TRIM_CHARS or _is_invisible(ch) for ch in tok.text)

    while start < end and (
        is_trim(doc[start]) or (drop_leading_separators and _separator_kind(doc, start) == "drop")
    ):
        start += 1
    while end > start and is_trim(doc[end - 1]):
        end -= 1
    return start, end


class CaptionSplitter:
    """Splits captions into `TextUnit`s; build once, call `split`/`split_many` many times."""

    def __init__(self, split_clauses: bool = True, lexicon_path: str | Path | None = None):
        self.split_clauses = split_clauses
        self.nlp = build_nlp(load_lexicon(lexicon_path))

    def split(self, caption: str) -> list[TextUnit]:
        return self.split_many([caption])[0]

    def split_many(self, captions: Iterable[str], batch_size: int = 256) -> list[list[TextUnit]]:
        captions = list(captions)
        for row, caption in enumerate(captions):
            if not isinstance(caption, str):
                raise TypeError(f"caption {row}: expected str, got {type(caption).__name__}")
        # Lone surrogates cannot be encoded by spaCy; replacing them 1:1 keeps every char offset.
        views = [_without_format_chars(_SURROGATES.sub("\ufffd", c)) for c in captions]
        docs = self.nlp.pipe((text for text, _ in views), batch_size=batch_size)
        return [
            self._units(doc, caption, kept)
            for doc, caption, (_, kept) in zip(docs, captions, views, strict=True)
        ]

    def _units(self, doc: Doc, caption: str, kept: list[int] | None = None) -> list[TextUnit]:
        """Units of `caption` from its `doc`; `kept` maps doc char offsets to the caption's (None: same)."""
        mentions = _mentions(doc)
        starts = [m.start for m in mentions]
        units: list[TextUnit] = []
        for sent in doc.sents:
            if self.split_clauses:
                ranges = _clause_ranges(doc, sent, _mentions_within(mentions, starts, sent.start, sent.end))
            else:
                ranges = [(sent.start, sent.end)]
            for k, (start, end) in enumerate(ranges):
                start, end = _trim(doc, start, end, drop_leading_separators=k > 0)
                if start >= end:
                    continue
                char_start = doc[start].idx
                char_end = doc[end - 1].idx + len(doc[end - 1].text)
                if kept is not None:
                    char_start, char_end = kept[char_start], kept[char_end - 1] + 1
                # Strip invisible chars the tokenizer kept at a token's edge (NBSP, zero-width space).
                while char_start < char_end and _is_invisible(caption[char_start]):
                    char_start += 1
                while char_end > char_start and _is_invisible(caption[char_end - 1]):
                    char_end -= 1
                text = caption[char_start:char_end]
                if not any(ch.isalnum() for ch in text):
                    continue  # punctuation-only remains ("...", "-")
                tags = set().union(*(m.tags for m in _mentions_within(mentions, starts, start, end)))
                units.append(TextUnit(text, char_start, char_end, len(units), tuple(sorted(tags))))
        return units


@functools.lru_cache(maxsize=8)
def _tagger(lexicon_json: str | None) -> Language:
    lexicon = json.loads(lexicon_json) if lexicon_json is not None else load_lexicon()
    nlp = build_nlp(lexicon)
    nlp.remove_pipe("rsm_caption_sentences")
    return nlp


def part_tags(text: str, lexicon: dict[str, list[str]] | None = None) -> tuple[str, ...]:
    """Sorted body-part tags that `text` names, e.g. "a red dress" -> ("lower", "upper")."""
    key = None if lexicon is None else json.dumps(lexicon, sort_keys=True)
    doc = _tagger(key)(_without_format_chars(_SURROGATES.sub("\ufffd", text))[0])
    return tuple(sorted({span.label_ for span in doc.spans[SPANS_KEY]}))


def main(argv: list[str] | None = None) -> int:
    """Print the units of each caption (arguments, or one caption per line of --file) as JSON lines."""
    parser = argparse.ArgumentParser(prog="python -m miners.captions", description=main.__doc__)
    parser.add_argument("captions", nargs="*", help="captions to split")
    parser.add_argument("--file", type=Path, help="UTF-8 text file, one caption per line")
    parser.add_argument("--no-clauses", action="store_true", help="sentences only, no part clauses")
    parser.add_argument("--lexicon", type=Path, help="part lexicon JSON (default: the packaged one)")
    args = parser.parse_args(argv)
    captions = list(args.captions)
    if args.file is not None:
        captions += args.file.read_text(encoding="utf-8").splitlines()
    if not captions:
        parser.error("give captions as arguments or --file")
    splitter = CaptionSplitter(split_clauses=not args.no_clauses, lexicon_path=args.lexicon)
    for row, units in enumerate(splitter.split_many(captions)):
        for unit in units:
            record = {"caption": row, **dataclasses.asdict(unit)}
            sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
