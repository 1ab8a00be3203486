"""Tests for the synthetic P-VLG benchmark (storage.synth, synth_draw, synth_text): determinism,
ground-truth consistency (masks, boxes, spans, links), splits, identity consistency, the CLI."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from storage.rle import decode_mask, mask_to_box_xyxy
from storage.schemas import BODY_PARTS
from storage.synth.__main__ import main
from storage.synth.draw import PALETTE_RGB, person_from_json
from storage.synth.generate import CONFIG_FILE, IDENTITIES_FILE, generate, processed_tokens
from storage.synth.text import _COLOUR_WORDS, _UNGROUNDED

N_IDS, K_IMGS = 6, 3


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("synth") / "bench"
    summary = generate(out, N_IDS, K_IMGS, seed=7, workers=1)
    assert summary["images"] == N_IDS * K_IMGS and summary["captions"] == 2 * N_IDS * K_IMGS
    return out, json.loads((out / "pvlg.json").read_text())


def test_same_seed_is_byte_identical_across_worker_counts(bench, tmp_path):
    out, _ = bench
    again = tmp_path / "again"
    generate(again, N_IDS, K_IMGS, seed=7, workers=2)
    first, second = _files(out), _files(again)
    assert sorted(first) == sorted(second)
    assert any(name.endswith(".png") for name in first)
    assert all(first[name] == second[name] for name in first)


def test_different_seed_differs(bench, tmp_path):
    out, _ = bench
    other = tmp_path / "other"
    generate(other, N_IDS, K_IMGS, seed=8, workers=1)
    a, b = _files(out), _files(other)
    assert a["pvlg.json"] != b["pvlg.json"]
    shared_pngs = [n for n in a if n.endswith(".png") and n in b]
    assert shared_pngs, "the two seeds share no image path to compare"
    assert all(a[n] != b[n] for n in shared_pngs)


def test_record_fields_match_documented_pvlg_format(bench):
    _, records = bench
    assert isinstance(records, list) and len(records) == N_IDS * K_IMGS
    for r in records:
        assert set(r) == {"id", "file_path", "split", "captions", "processed_tokens", "regions", "links"}
        assert isinstance(r["id"], int) and 1 <= r["id"] <= N_IDS
        assert r["split"] in ("train", "test")
        assert r["file_path"] == f"{r['split']}/{r['id']:05d}/{Path(r['file_path']).name}"
        assert len(r["captions"]) == len(r["processed_tokens"]) == len(r["links"]) == 2
        assert r["captions"][0] != r["captions"][1]
        for region in r["regions"]:
            assert set(region) == {"id", "label", "bbox", "mask"}
            assert set(region["mask"]) == {"size", "counts"} and isinstance(region["mask"]["counts"], str)
            assert len(region["bbox"]) == 4 and all(isinstance(v, float) for v in region["bbox"])
        for caption, tokens in zip(r["captions"], r["processed_tokens"], strict=True):
            assert tokens == processed_tokens(caption) and all(t == t.lower() for t in tokens)


def test_images_exist_and_decode_at_the_configured_size(bench):
    out, records = bench
    for r in records:
        with Image.open(out / "imgs" / r["file_path"]) as img:
            assert img.format == "PNG" and img.size == (128, 256) and img.mode == "RGB"
            img.load()


def test_masks_are_tight_disjoint_and_nonempty(bench):
    out, records = bench
    for r in records:
        labels = [g["label"] for g in r["regions"]]
        assert [g["id"] for g in r["regions"]] == list(range(len(labels)))
        assert set(labels) <= set(BODY_PARTS) and len(set(labels)) == len(labels)
        assert {"head", "upper", "lower", "feet"} <= set(labels)
        union = np.zeros((256, 128), dtype=int)
        for g in r["regions"]:
            mask = decode_mask(g["mask"])
            assert mask.shape == (256, 128) and mask.any(), (r["file_path"], g["label"])
            x0, y0, x1, y1 = (int(v) for v in g["bbox"])
            assert mask[y0:y1, x0:x1].sum() == mask.sum()  # inside its box
            assert list(mask_to_box_xyxy(mask)) == g["bbox"]  # and the box is tight
            union += mask
        assert union.max() == 1, r["file_path"]


def test_masks_are_the_painted_pixels(bench):
    # lower garment, shoes and bags are painted in one solid colour (lighting varies slowly), so a mask
    # that leaked onto background, skin or an occluding part would show a large colour spread.
    out, records = bench
    checked = 0
    for r in records:
        rgb = np.asarray(Image.open(out / "imgs" / r["file_path"]).convert("RGB")).astype(float)
        for g in r["regions"]:
            if g["label"] in ("lower", "feet", "bag"):
                pixels = rgb[decode_mask(g["mask"])]
                assert pixels.std(axis=0).max() < 12.0, (r["file_path"], g["label"], pixels.std(axis=0))
                checked += 1
    assert checked >= 2 * len(records)


def test_links_spans_and_phrases_are_exact(bench):
    _, records = bench
    for r in records:
        region_ids = {g["id"] for g in r["regions"]}
        for caption, links in zip(r["captions"], r["links"], strict=True):
            assert 4 <= len(links) <= 8, caption
            assert any(not s["region_ids"] and not s["phrases"] for s in links), caption
            prev_end = 0
            for i, s in enumerate(links):
                a, b = s["span"]
                assert prev_end <= a < b <= len(caption)
                # sentences are separated by whitespace only and carry no outer whitespace
                assert caption[prev_end:a].strip() == "" and (i == 0) == (a == 0)
                assert caption[a:b] == caption[a:b].strip()
                prev_end = b
                assert s["region_ids"] == sorted({p["region_id"] for p in s["phrases"]})
                for p in s["phrases"]:
                    pa, pb = p["span"]
                    assert a <= pa < pb <= b and p["region_id"] in region_ids
                    # a phrase is whole words: no padding, punctuation or cut words at its ends
                    phrase = caption[pa:pb]
                    assert phrase == phrase.strip(" .,") and phrase[0].isalpha() and phrase[-1].isalpha(), (
                        phrase
                    )
                    assert not caption[pa - 1 : pa].isalnum() and not caption[pb : pb + 1].isalnum(), phrase
            assert prev_end == len(caption)


def test_phrases_name_their_part_and_its_true_colour(bench):
    out, records = bench
    attrs = {
        d["id"]: person_from_json(d["attributes"]) for d in json.loads((out / IDENTITIES_FILE).read_text())
    }
    for r in records:
        person = attrs[r["id"]]
        label_of = {g["id"]: g["label"] for g in r["regions"]}
        for caption, links in zip(r["captions"], r["links"], strict=True):
            for s in links:
                for p in s["phrases"]:
                    text = caption[p["span"][0] : p["span"][1]].lower()
                    label = label_of[p["region_id"]]
                    garment = {
                        "upper": person.upper,
                        "lower": person.lower,
                        "feet": person.shoes,
                        "bag": person.bag,
                    }.get(label)
                    if garment is None:  # head: hair or hat phrase
                        assert any(w in text for w in ("hair", "ponytail", "bun", "cap", "hat", "beanie")), (
                            text
                        )
                        continue
                    words = _COLOUR_WORDS.get(garment.colour, (garment.colour,))
                    # "the jacket"/"his jacket" phrases carry no colour; the others must name the true one
                    if not text.startswith(("the ", "his ", "her ")):
                        assert any(w in text for w in words), (text, garment)


def test_ungroundable_sentences_and_unmentioned_bag(bench):
    out, records = bench
    attrs = {
        d["id"]: person_from_json(d["attributes"]) for d in json.loads((out / IDENTITIES_FILE).read_text())
    }
    for r in records:
        has_bag = any(g["label"] == "bag" for g in r["regions"])
        assert has_bag == (attrs[r["id"]].bag is not None)
        for caption in r["captions"]:
            if not has_bag:
                assert not any(w in caption for w in ("bag", "backpack", "rucksack", "purse", "satchel"))


def test_splits_are_by_identity_and_identities_are_consistent(bench):
    out, records = bench
    by_id: dict[int, set[str]] = defaultdict(set)
    labels_by_id: dict[int, set[tuple]] = defaultdict(set)
    for r in records:
        by_id[r["id"]].add(r["split"])
        labels_by_id[r["id"]].add(tuple(sorted(g["label"] for g in r["regions"])))
    assert all(len(splits) == 1 for splits in by_id.values())
    train = {i for i, s in by_id.items() if s == {"train"}}
    test = {i for i, s in by_id.items() if s == {"test"}}
    assert train and test and not train & test and len(test) == round(0.25 * N_IDS)
    # same identity → same visible parts; different identities → different clothing
    assert all(len(v) == 1 for v in labels_by_id.values())
    people = [person_from_json(d["attributes"]) for d in json.loads((out / IDENTITIES_FILE).read_text())]
    assert len({p.signature() for p in people}) == len(people)
    config = json.loads((out / CONFIG_FILE).read_text())
    assert config["identities"] == N_IDS and config["images_per_id"] == K_IMGS and config["seed"] == 7


def test_same_identity_captions_share_clothing_vocabulary(bench):
    _, records = bench
    colours = set(PALETTE_RGB) | {w for ws in _COLOUR_WORDS.values() for w in ws}
    upper_colours: dict[int, list[set[str]]] = defaultdict(list)
    for r in records:
        upper_id = next(g["id"] for g in r["regions"] if g["label"] == "upper")
        for caption, links in zip(r["captions"], r["links"], strict=True):
            for s in links:
                for p in s["phrases"]:
                    if p["region_id"] == upper_id:
                        words = set(processed_tokens(caption[p["span"][0] : p["span"][1]])) & colours
                        if words:
                            upper_colours[r["id"]].append(words)
    for pid, sets in upper_colours.items():
        canonical = [
            {w.replace("gray", "grey").replace("crimson", "red").replace("violet", "purple") for w in s}
            for s in sets
        ]
        assert all(c == canonical[0] for c in canonical), pid


def test_ungroundable_templates_mention_no_part():
    part_words = (
        "hair",
        "hat",
        "jacket",
        "shirt",
        "trousers",
        "pants",
        "shoe",
        "bag",
        "head",
        "face ",
        "feet",
    )
    for template, _ in _UNGROUNDED:
        assert not any(w in template.lower() for w in part_words), template


def test_refuses_non_empty_dir_and_overwrites_previous_output(bench, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        generate(foreign, 1, 1, seed=0, workers=1)
    with pytest.raises(FileExistsError, match="not a synthetic benchmark"):
        generate(foreign, 1, 1, seed=0, workers=1, overwrite=True)
    prev = tmp_path / "prev"
    generate(prev, 3, 2, seed=0, workers=1)
    summary = generate(prev, 2, 1, seed=1, workers=1, overwrite=True)
    assert summary["images"] == 2
    assert len(list((prev / "imgs").rglob("*.png"))) == 2  # no stale images from the first run


@pytest.mark.parametrize(
    "args, message",
    [
        (["--identities", "0", "--images-per-id", "2"], "identities must be >= 1"),
        (["--identities", "2", "--images-per-id", "0"], "images-per-id"),
        (["--identities", "2", "--images-per-id", "2", "--test-fraction", "1.0"], "test-fraction"),
    ],
)
def test_cli_rejects_bad_arguments(tmp_path, capsys, args, message):
    rc = main(["--out", str(tmp_path / "o"), "--seed", "0", *args])
    assert rc == 2 and message in capsys.readouterr().err


def test_cli_writes_dataset(tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(
        [
            "--out",
            str(out),
            "--identities",
            "2",
            "--images-per-id",
            "2",
            "--seed",
            "3",
            "--workers",
            "1",
            "--width",
            "64",
            "--height",
            "128",
        ]
    )
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 4 and summary["train_identities"] == 1 and summary["test_identities"] == 1
    records = json.loads((out / "pvlg.json").read_text())
    with Image.open(out / "imgs" / records[0]["file_path"]) as img:
        assert img.size == (64, 128)
