"""Known-noise injection: swap text units of captions for units of other people's captions, or alter
one attribute word of a unit so that it no longer holds for the person.

One algorithm, two users. `swap_unit` replaces one unit's char span by a donor text and returns the
new caption and the donor's span in it; `pick_donor` draws a donor unit of another person,
`pick_same_part_donor` one that also names the same body part(s); `attribute_swap` replaces one colour
or garment word of a unit by a word of the same slot that is false for the person (the person's words
come as plain sets, e.g. from storage.synth.identities). The QA
estimator check (qa.inject) swaps units of already-mined captions and tracks each by span; the
training ablation (bench/train_ablation.py) uses `shuffle_caption_units`, which swaps a `fraction` of
a manifest split's units *before mining*, so the injected pairs get their features and reliability
from the RSM itself — which is what a reliability-weighted trainer is tested against. Ground-truth
links of changed captions are dropped (their spans no longer hold); other rows are untouched.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence, Set
from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa

from miners.attribute_probe import GARMENT_KINDS, colour_words, garment_words, replace_word
from miners.captions import COLOUR_WORDS, CaptionSplitter
from storage.synth.identities import AttributeWords, attribute_vocabulary


def swap_unit(caption: str, char_start: int, char_end: int, donor: str) -> tuple[str, tuple[int, int]]:
    """(caption with [char_start, char_end) replaced by `donor`, the donor's (start, end) in it)."""
    return caption[:char_start] + donor + caption[char_end:], (char_start, char_start + len(donor))


def pick_donor(rng: np.random.Generator, pool: np.ndarray, persons: np.ndarray, person: object) -> int | None:
    """A uniformly drawn index from `pool` whose `persons[index]` is not `person`; None if there is none."""
    candidates = pool[persons[pool] != person]
    if not candidates.size:
        return None
    return int(candidates[rng.integers(candidates.size)])


def pick_same_part_donor(
    rng: np.random.Generator,
    pool: np.ndarray,
    persons: np.ndarray,
    parts: np.ndarray,
    person: object,
    part: object,
    texts: np.ndarray | None = None,
    text: object = None,
) -> int | None:
    """A uniformly drawn index from `pool` of another person whose `parts[index]` (a unit's body-part
    tags as one hashable key, e.g. "lower|upper") equals `part` and, with `texts`, whose text is not
    `text` (two people in the same shorts may be described by the same sentence: swapping it in would
    change nothing); None if there is none."""
    keep = (persons[pool] != person) & (parts[pool] == part)
    if texts is not None:
        keep &= texts[pool] != text
    candidates = pool[keep]
    if not candidates.size:
        return None
    return int(candidates[rng.integers(candidates.size)])


# Attribute words are matched as whole words ("shirt" is not inside "t-shirt"), case-insensitively
_EDGE_BEFORE, _EDGE_AFTER = r"(?<![\w-])", r"(?![\w-])"
# Word uses that name no garment: "on top, she wears ...", "on top of the bag"
_NOT_A_GARMENT = {"top": (re.compile(r"\bon\s+$", re.I), re.compile(r"^\s+of\b", re.I))}


def _matches(text: str, words: Set[str]) -> list[tuple[int, int, str]]:
    """Non-overlapping whole-word occurrences (start, end, word) of `words` in `text`, longest first
    ("leather shoes" before "shoes"), in text order."""
    lowered, taken = text.lower(), []
    for word in sorted(words, key=lambda w: (-len(w), w)):
        for m in re.finditer(_EDGE_BEFORE + re.escape(word) + _EDGE_AFTER, lowered):
            s, e = m.span()
            skip = _NOT_A_GARMENT.get(word)
            if skip and (skip[0].search(text[:s]) or skip[1].search(text[e:])):
                continue
            if all(e <= s0 or s >= e0 for s0, e0, _ in taken):
                taken.append((s, e, word))
    return sorted(taken)


def _plural(word: str) -> bool:
    return word.endswith("s")  # true of every garment noun the captions use (trousers, shoes, boots)


def attribute_candidates(
    text: str,
    parts: Sequence[str],
    attrs: Mapping[str, Mapping[str, Set[str]]],
    vocabulary: Mapping[str, Mapping[str, Set[str]]],
) -> list[tuple[int, int, tuple[str, ...]]]:
    """Where `text` can be made false for a person: (start, end, replacements) per colour or garment
    word of `text` that is true of one of the person's `parts` (the unit's body-part tags), with the
    words of the same slot that are false for the person. No randomness (callers test feasibility).

    `attrs`: body part → slot ("colour" | "garment") → the words that are not false of the person;
    a part the person does not have is absent. `vocabulary`: body part → slot → every word of the
    slot. A colour replacement is false for every tagged part the person has (a unit naming two parts
    may let the colour belong to either); a garment replacement is a noun of the same part."""
    have = [p for p in dict.fromkeys(parts) if p in attrs and p in vocabulary]
    out = []
    for slot in ("colour", "garment"):
        for s, e, word in _matches(text, set().union(*(vocabulary[p].get(slot, ()) for p in have))):
            owners = [p for p in have if word in attrs[p].get(slot, ())]
            if not owners:
                continue  # only words that hold for the person are made false
            if slot == "colour":
                pool = set.intersection(*(set(vocabulary[p]["colour"]) for p in have))
                false = pool - set().union(*(attrs[p].get("colour", ()) for p in have))
            else:
                same_part = [p for p in owners if word in vocabulary[p]["garment"]]
                if not same_part:
                    continue
                false = set.intersection(
                    *(set(vocabulary[p]["garment"]) - set(attrs[p]["garment"]) for p in same_part)
                )
                # Keep the noun's number where the slot allows it ("jeans" -> "shorts", not "skirt")
                same_number = {w for w in false if _plural(w) == _plural(word)}
                false = same_number or false
            if false:
                out.append((s, e, tuple(sorted(false))))
    return sorted(out)


def attribute_swap(
    text: str,
    parts: Sequence[str],
    attrs: Mapping[str, Mapping[str, Set[str]]],
    rng: np.random.Generator,
    vocabulary: Mapping[str, Mapping[str, Set[str]]],
) -> str | None:
    """`text` with one colour or garment word true of the person replaced by a word of the same slot
    that is false for the person (see `attribute_candidates`); the rest of the text is kept but for an
    "a"/"an" before the word. None when no word of `text` can be made false."""
    swapped = _swap_one(text, attribute_candidates(text, parts, attrs, vocabulary), rng)
    return None if swapped is None else swapped[0]


def _swap_one(
    text: str, candidates: list[tuple[int, int, tuple[str, ...]]], rng: np.random.Generator
) -> tuple[str, str] | None:
    """(text with one drawn candidate word replaced, the word it replaced); None without candidates."""
    if not candidates:
        return None
    s, e, words = candidates[int(rng.integers(len(candidates)))]
    new = words[int(rng.integers(len(words)))]
    # Capitalised only at the start: "T-shirt" mid-sentence must not make "a Hoodie"
    return replace_word(text, s, e, new, keep_case=(s == 0)), text[s:e].lower()


# ------------------------------------------------------------- perturbing mined units (QA, calibration)


@dataclass(frozen=True)
class Perturbation:
    """One injected unit: clean unit `target`, re-mined as caption `sample_id` whose unit at `span` is
    `injected` (it was `original`)."""

    target: int
    sample_id: str
    row: dict  # the perturbed manifest row
    span: tuple[int, int]
    original: str
    injected: str
    slot: str | None = None  # attribute swaps: "colour" or "garment", the kind of word changed


class NoiseUnavailable(Exception):
    """A kind of noise cannot be made on this data; the message says why (QA puts it into qa.json)."""


def tagged_units(clean: pl.DataFrame) -> np.ndarray:
    return clean["part_tags"].list.len().to_numpy() > 0


def swap_perturbations(
    clean: pl.DataFrame, rows: pl.DataFrame, rng: np.random.Generator, n_target: int, same_part: bool
) -> tuple[np.ndarray, list[Perturbation]]:
    """Swap units that name a body part (the ones that can be right) for another person's such units:
    the text still names a part, so only the image side can tell the pair is wrong. `same_part`: the
    donor names the same part(s) as the unit it replaces, so not even the part words change."""
    n = clean.height
    persons = clean["person_id"].to_numpy()
    has_tags = tagged_units(clean)
    tagged = np.flatnonzero(has_tags)
    untagged = np.setdiff1d(np.arange(n), tagged)
    first = rng.choice(tagged, size=min(n_target, tagged.size), replace=False)
    rest = rng.choice(untagged, size=n_target - first.size, replace=False)
    targets = np.sort(np.concatenate([first, rest]).astype(np.int64))
    pool = tagged if tagged.size else np.arange(n)
    # One key per unit for its tag set, so "same part(s)" is one comparison
    part_keys = np.array(["|".join(t) for t in clean["part_tags"].to_list()], dtype=object)
    sentences = clean["sentence"].to_numpy().astype(object)
    captions = dict(rows.select("sample_id", "caption").iter_rows())
    row_of = {r["sample_id"]: r for r in rows.iter_rows(named=True)}
    out = []
    for t in targets:
        unit = clean.row(int(t), named=True)
        if same_part:
            d = pick_same_part_donor(
                rng, np.arange(n), persons, part_keys, persons[t], part_keys[t], sentences, sentences[t]
            )
        else:
            d = pick_donor(rng, pool, persons, persons[t])
        if d is None:
            continue
        sid = f"{unit['sample_id']}#inject{int(t)}"
        caption, span = swap_unit(
            captions[unit["sample_id"]], unit["char_start"], unit["char_end"], clean["sentence"][d]
        )
        out.append(
            Perturbation(
                int(t),
                sid,
                {**row_of[unit["sample_id"]], "sample_id": sid, "caption": caption},
                span,
                unit["sentence"],
                clean["sentence"][d],
            )
        )
    return targets, out


def attribute_perturbations(
    clean: pl.DataFrame,
    rows: pl.DataFrame,
    identities: dict[int, AttributeWords],
    rng: np.random.Generator,
    n_target: int,
) -> tuple[np.ndarray, list[Perturbation], int]:
    """(targets, perturbations, number of alterable units): alter up to `n_target` units of `clean`
    (pairs of the manifest `rows`), drawn among those naming a colour or garment word of a part their
    person has (`identities`: person id -> storage.synth.identities words): that word replaced by one of
    the same slot the person does not wear. Every altered unit is false for its person, so its pair is
    wrong whatever region it matched. Raises NoiseUnavailable when no unit can be altered."""
    vocabulary = attribute_vocabulary()
    colours = set().union(*(slots.get("colour", ()) for slots in vocabulary.values()))
    captions = dict(rows.select("sample_id", "caption").iter_rows())
    row_of = {r["sample_id"]: r for r in rows.iter_rows(named=True)}
    units = clean.select("sample_id", "person_id", "char_start", "char_end", "part_tags").rows()

    def text_of(i: int) -> str:
        sid, _, s, e, _ = units[i]
        return captions[sid][s:e]

    alterable = np.array(
        [
            i
            for i, (_, pid, _, _, tags) in enumerate(units)
            if tags
            and pid in identities
            and attribute_candidates(text_of(i), tags, identities[pid], vocabulary)
        ],
        dtype=np.int64,
    )
    if not alterable.size:
        raise NoiseUnavailable(
            "no text unit of the audit subset names a colour or garment word of a part its person has"
        )
    targets = np.sort(rng.choice(alterable, size=min(n_target, alterable.size), replace=False))
    out = []
    for t in targets:
        sid, pid, s, e, tags = units[int(t)]
        original = text_of(int(t))
        swapped = _swap_one(original, attribute_candidates(original, tags, identities[pid], vocabulary), rng)
        if swapped is None:  # cannot happen: candidates are what made the unit alterable
            raise RuntimeError(f"attribute swap found nothing to alter in {original!r}")
        altered, word = swapped
        new_sid = f"{sid}#inject{int(t)}"
        caption, span = swap_unit(captions[sid], s, e, altered)
        out.append(
            Perturbation(
                int(t),
                new_sid,
                {**row_of[sid], "sample_id": new_sid, "caption": caption},
                span,
                original,
                altered,
                "colour" if word in colours else "garment",
            )
        )
    return targets, out, int(alterable.size)


def locate_injected(mined: pl.DataFrame, perturbed: list[Perturbation]) -> dict[int, dict]:
    """target -> the mined pair row of each injected unit, found by char span (the splitter may cut
    the new caption a little differently: the unit covering at least half the injected span)."""
    spans = {p.sample_id: (p.target, *p.span) for p in perturbed}
    found: dict[int, dict] = {}
    for sid, units in mined.group_by("sample_id"):
        t, s0, s1 = spans[sid[0]]
        overlap = np.minimum(units["char_end"].to_numpy(), s1) - np.maximum(
            units["char_start"].to_numpy(), s0
        )
        best = int(np.argmax(overlap))
        if overlap[best] * 2 >= s1 - s0:
            found[t] = units.row(best, named=True)
    return found


def colour_swap(text: str, rng: np.random.Generator, colours: Sequence[str] = COLOUR_WORDS) -> str | None:
    """`text` with one of its colour words (whole words, any case) replaced by another colour that
    the text does not mention; None without a colour word. Needs no knowledge of the person: used for
    training negatives (miners.refine_clip), where "almost surely false" is enough; QA's content test
    uses `attribute_swap`, which knows what the person wears."""
    found = colour_words(text, colours)
    if not found:
        return None
    s, e, _ = found[int(rng.integers(len(found)))]
    mentioned = {c for _, _, c in found}
    choices = [c for c in colours if c not in mentioned]
    if not choices:
        return None
    return replace_word(text, s, e, choices[int(rng.integers(len(choices)))])


def corpus_garments(texts: Iterable[str]) -> dict[str, dict[str, str]]:
    """Body part -> garment kind -> its most used phrase, over the kinds `texts` name at all.

    Hard training negatives: a caption corpus names few of the kinds the lexicon knows, and a swap to a
    kind nobody wears ("a kilt") is easy to reject; a swap among the kinds people in the data do wear
    (sneakers / boots / leather shoes) is the distinction the miner must see. Needs no labels."""
    counts: dict[str, dict[str, Counter]] = {}
    for text in texts:
        for s, e, part, kind in garment_words(text):
            counts.setdefault(part, {}).setdefault(kind, Counter())[text[s:e].lower()] += 1
    # Ties broken by the phrase itself, so the choice does not depend on the order of `texts`
    return {
        part: {kind: min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] for kind, c in sorted(kinds.items())}
        for part, kinds in sorted(counts.items())
    }


def garment_swap(
    text: str, rng: np.random.Generator, kinds: Mapping[str, Mapping[str, str]] | None = None
) -> str | None:
    """`text` with one of its garment phrases (miners.attribute_probe.garment_words) replaced by the
    name of another garment kind of the same body part; None without one. Like `colour_swap` it needs
    no knowledge of the person (a training negative, miners.refine_clip). `kinds` (part -> kind ->
    phrase, e.g. `corpus_garments`) limits the replacements to those kinds where it offers any other
    kind of the part; by default every kind the lexicon knows, by its first name."""
    found = garment_words(text)
    if not found:
        return None
    s, e, part, kind = found[int(rng.integers(len(found)))]
    others = [phrase for other, phrase in (kinds or {}).get(part, {}).items() if other != kind]
    if not others:
        others = [phrases[0] for other, phrases in GARMENT_KINDS[part].items() if other != kind]
    return replace_word(text, s, e, others[int(rng.integers(len(others)))])


def shuffle_caption_units(
    manifest: pa.Table,
    fraction: float,
    seed: int,
    split: str = "train",
    splitter: CaptionSplitter | None = None,
) -> tuple[pa.Table, list[dict]]:
    """(noisy manifest, injected) where injected lists {sample_id, unit_index, original, replacement}."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must lie in [0, 1], got {fraction}")
    splitter = splitter or CaptionSplitter()
    rows = manifest.to_pylist()
    chosen_rows = [i for i, r in enumerate(rows) if r["split"] == split]
    units = splitter.split_many([rows[i]["caption"] for i in chosen_rows])
    flat = [(i, k) for i, us in zip(chosen_rows, units, strict=True) for k in range(len(us))]
    unit_of = dict(zip(chosen_rows, units, strict=True))
    persons = np.array([rows[i]["person_id"] for i, _ in flat])
    everyone = np.arange(len(flat))
    rng = np.random.default_rng(seed)
    n_pick = int(round(fraction * len(flat)))
    picked = sorted(rng.choice(len(flat), size=n_pick, replace=False).tolist()) if n_pick else []
    by_row: dict[int, list[int]] = {}
    for p in picked:
        i, k = flat[p]
        by_row.setdefault(i, []).append(k)

    injected = []
    for i, ks in by_row.items():
        caption, us = rows[i]["caption"], unit_of[i]
        # Replace from the end so earlier spans stay valid.
        for k in sorted(ks, reverse=True):
            d = pick_donor(rng, everyone, persons, rows[i]["person_id"])
            if d is None:
                continue
            j, m = flat[d]
            donor = unit_of[j][m].text
            u = us[k]
            caption, _ = swap_unit(caption, u.char_start, u.char_end, donor)
            injected.append(
                {"sample_id": rows[i]["sample_id"], "unit_index": k, "original": u.text, "replacement": donor}
            )
        rows[i] = {**rows[i], "caption": caption, "gt_links": None}
    return pa.Table.from_pylist(rows, schema=manifest.schema), injected


__all__ = [
    "NoiseUnavailable",
    "Perturbation",
    "attribute_candidates",
    "attribute_perturbations",
    "attribute_swap",
    "colour_swap",
    "corpus_garments",
    "garment_swap",
    "locate_injected",
    "pick_donor",
    "pick_same_part_donor",
    "shuffle_caption_units",
    "swap_perturbations",
    "swap_unit",
    "tagged_units",
]
