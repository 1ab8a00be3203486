"""miners.bank: the reference bank is deterministic, bound to its model and crop mode, and its content
features are the hand-computable z-scores, the same whatever the shard or batch a pair is mined in."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pytest

from miners.attribute_probe import garment_words
from miners.bank import BANK_ARRAYS, BANK_META, BankError, PartBank, ReferenceBank, build_bank, judged_part
from miners.bank import main as bank_main
from miners.calibration import fit_calibrator
from miners.rsm import RSMConfig, RSMMiner, matches_from_pairs
from miners.run_config import run_config_for
from storage.manifest import read_manifest


@pytest.fixture(scope="module")
def banked_clip(tiny_dataset, tiny_clip_dir, tmp_path_factory):
    """A copy of the tiny CLIP with a bank built by the command line, on the whole tiny dataset."""
    folder = tmp_path_factory.mktemp("banked") / "clip"
    shutil.copytree(tiny_clip_dir, folder)
    argv = ["--manifest", str(tiny_dataset / "manifest.parquet"), "--clip-model", str(folder), "--split", ""]
    assert bank_main([*argv, "--per-part", "16"]) == 0
    return folder


def test_the_bank_is_deterministic_and_counts_each_part(banked_clip, tiny_dataset):
    meta = json.loads((banked_clip / BANK_META).read_text())
    again = build_bank(tiny_dataset / "manifest.parquet", banked_clip, split=None, per_part=16)
    again_dir = banked_clip.parent / "again"
    again_dir.mkdir()
    again.save(again_dir)
    assert (again_dir / BANK_ARRAYS).read_bytes() == (banked_clip / BANK_ARRAYS).read_bytes()
    assert json.loads((again_dir / BANK_META).read_text())["sha256"] == meta["sha256"]
    bank = ReferenceBank.load(banked_clip)
    for part, counts in meta["counts"].items():
        pb = bank.parts[part]
        assert 0 < counts["regions"] <= 16 and counts["sentences"] <= 16
        assert pb.region_emb.shape == (counts["regions"], 64)
        np.testing.assert_allclose(np.linalg.norm(pb.region_emb, axis=1), 1.0, atol=1e-5)
        assert len(set(pb.region_person.tolist())) > 1  # drawn from several people
    assert meta["model_fingerprint"] == RSMMiner(RSMConfig(clip_model=str(banked_clip))).clip_fingerprint


def test_the_bank_refuses_another_model_another_crop_mode_and_damage(banked_clip, tmp_path):
    with pytest.raises(BankError, match="built with CLIP model"):
        ReferenceBank.load(banked_clip, expect_fingerprint="0" * 16)
    with pytest.raises(BankError, match="--crop-mode 'box', not 'mask'.*--crop-mode mask"):
        ReferenceBank.load(banked_clip, crop_mode="mask")
    damaged = tmp_path / "damaged"
    shutil.copytree(banked_clip, damaged)
    data = bytearray((damaged / BANK_ARRAYS).read_bytes())
    data[-9] ^= 0xFF
    (damaged / BANK_ARRAYS).write_bytes(bytes(data))
    with pytest.raises(BankError, match="sha256 differs"):
        ReferenceBank.load(damaged)
    with pytest.raises(BankError, match="sha256 differs"):  # and so does a miner using it
        RSMMiner(RSMConfig(clip_model=str(damaged)))


def test_content_features_are_z_scores_against_other_people():
    rng = np.random.default_rng(0)

    def unit(v):
        return v / np.linalg.norm(v, axis=-1, keepdims=True)

    regions, sentences = unit(rng.normal(size=(20, 4))), unit(rng.normal(size=(20, 4)))
    persons = np.arange(20) % 5  # person 3 owns entries 3, 8, 13, 18
    bank = ReferenceBank({"upper": PartBank(regions, persons, sentences, persons)})
    text, region = unit(rng.normal(size=(2, 4))), unit(rng.normal(size=(2, 4)))
    z_region, z_sentence = bank.content_features(text, region, ["upper", None], person=3)
    own = float(text[0] @ region[0])
    others = persons != 3
    ref_r, ref_s = regions[others] @ text[0], sentences[others] @ region[0]
    assert z_region[0] == pytest.approx((own - ref_r.mean()) / ref_r.std(), rel=1e-5)
    assert z_sentence[0] == pytest.approx((own - ref_s.mean()) / ref_s.std(), rel=1e-5)
    assert z_region[1] == z_sentence[1] == 0.0  # no part: neutral
    # Too few entries of other people to have a spread: neutral, not noise.
    small = ReferenceBank({"upper": PartBank(regions[:5], persons[:5], sentences[:5], persons[:5])})
    assert small.content_features(text, region, ["upper", "upper"], person=3)[0].tolist() == [0.0, 0.0]


@pytest.mark.parametrize(
    ("tags", "label", "part"),
    [(("upper",), "upper", "upper"), (("upper",), "lower", "upper"), ((), "bag", "bag"), ((), None, None)],
)
def test_a_pair_is_judged_as_the_part_its_text_names(tags, label, part):
    assert judged_part(tags, label) == part


def test_the_same_pair_gets_the_same_content_features_in_any_shard_or_batch(banked_clip, tiny_dataset):
    table, meta = read_manifest(tiny_dataset / "manifest.parquet")
    cfg = RSMConfig(clip_model=str(banked_clip))
    miner = RSMMiner(cfg)
    whole = miner.mine(table, meta["root"]).pairs
    assert whole["bank_region_z"].null_count == 0 and whole["bank_sentence_z"].null_count == 0
    for probe in ("colour_logit", "garment_logit"):
        assert whole[probe].null_count == 0 and np.abs(whole[probe].to_numpy()).max() > 0
    # The garment probe fires exactly where the unit names a garment kind (0 elsewhere)
    named = np.array([bool(garment_words(t)) for t in whole["sentence"].to_pylist()])
    assert named.any() and not np.any(whole["garment_logit"].to_numpy()[~named])
    assert np.abs(whole["bank_region_z"].to_numpy()).max() > 0.1  # features that say something
    miner.cfg = replace(cfg, images_per_batch=2)
    pieces = [miner.mine(table.slice(k, 8), meta["root"]).pairs for k in range(0, table.num_rows, 8)]
    sharded = pa.concat_tables(pieces)
    key = ["sample_id", "sentence_index"]
    whole, sharded = (
        whole.sort_by([(k, "ascending") for k in key]),
        sharded.sort_by([(k, "ascending") for k in key]),
    )
    for name in ("bank_region_z", "bank_sentence_z", "colour_logit", "garment_logit", "reliability"):
        np.testing.assert_allclose(sharded[name].to_numpy(), whole[name].to_numpy(), atol=1e-4)


def test_a_content_calibrator_needs_a_bank_and_the_bank_is_part_of_the_run(
    banked_clip, tiny_dataset, tmp_path
):
    table, meta = read_manifest(tiny_dataset / "manifest.parquet")
    pairs = RSMMiner(RSMConfig(clip_model=str(banked_clip))).mine(table, meta["root"]).pairs
    matches = matches_from_pairs(pairs)
    labels = np.arange(pairs.num_rows) % 2 == 0
    cal = fit_calibrator(matches, labels)
    assert cal.uses_content and {"bank_region_z", "bank_sentence_z", "bank_sentence_z*label_bag"} <= set(
        cal.features
    )
    assert not fit_calibrator(matches, labels, content=False).uses_content
    # The garment probe is a feature of its own, per part too; a miner with it off refuses such a calibrator
    assert cal.uses_garment and {"garment_logit", "garment_logit*label_lower"} <= set(cal.features)
    with pytest.raises(ValueError, match="garment_probe=False does not compute"):
        RSMMiner(RSMConfig(clip_model=str(banked_clip), garment_probe=False), calibrator=cal)
    bankless = tmp_path / "bankless"
    shutil.copytree(banked_clip, bankless)
    (bankless / BANK_META).unlink()
    with pytest.raises(ValueError, match="no reference bank"):
        cal.predict(
            matches_from_pairs(RSMMiner(RSMConfig(clip_model=str(bankless))).mine(table, meta["root"]).pairs)
        )
    cal.save(bankless)
    with pytest.raises(BankError, match="has no reference bank; build one with `python -m miners.bank"):
        RSMMiner(RSMConfig(clip_model=str(bankless)))
    with_bank = run_config_for(RSMConfig(clip_model=str(banked_clip))).fingerprints
    assert with_bank["bank"] == json.loads((banked_clip / BANK_META).read_text())["sha256"][:16]
    assert (
        with_bank["clip_model"]
        == run_config_for(RSMConfig(clip_model=str(bankless))).fingerprints["clip_model"]
    )
