"""qa.inject: the estimator check swaps a known fraction of units for other people's and re-scores them;
the re-scoring config is the run's own (read through miners.run_config). Per mode ("any", "same-part",
"attribute"): each one's block from one shared clean re-mine, same-part donors, attribute swaps that
name what the person does not wear."""

from __future__ import annotations

import re

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from miners.caption_noise import attribute_perturbations
from miners.captions import CaptionSplitter
from miners.rsm import RSMConfig
from miners.run_config import RunConfig, read_run_config
from qa.config import INJECT_MODES, parse_inject_modes
from qa.inject import injection_rsm_config
from qa.render import _mode_blocks
from qa.report import build_report
from storage.reader import read_pairs
from storage.synth.identities import attribute_vocabulary, read_identity_attributes


def test_rescoring_uses_the_runs_settings(tiny_run, tmp_path):
    run = read_run_config(tiny_run)
    assert injection_rsm_config(run, None) == run.rsm
    other = injection_rsm_config(
        RunConfig(rsm=RSMConfig(clip_model="a", calibrator="a/cal.json", crop_mode="mask")), "b"
    )
    assert (other.clip_model, other.calibrator, other.crop_mode) == (
        "b",
        None,
        "mask",
    )  # calibrator is bound to "a"
    with pytest.raises(ValueError, match="--clip-model"):
        injection_rsm_config(None, None)


def test_injected_noise_is_reported_at_the_requested_rate(tiny_run, tiny_clip_dir, tmp_path):
    fraction = 0.25
    qa = build_report(
        tiny_run,
        tmp_path / "qa",
        sheet_samples=0,
        inject_noise=fraction,
        clip_model=str(tiny_clip_dir),
        inject_max_samples=12,
        seed=7,
    )
    inj = qa["injection"]
    assert inj["captions"] == 12 and inj["lost"] <= 1
    assert abs(inj["injected"] - fraction * inj["units"]) <= 1
    assert inj["injected_rate"] == pytest.approx(fraction, abs=1 / inj["units"])
    assert 0.0 <= inj["auroc_clean_vs_injected"] <= 1.0
    assert 0.0 <= inj["injected_kept_fraction"] <= 1.0
    assert inj["recovered_rate"] == pytest.approx(inj["estimated_noise_mixed"] - inj["estimated_noise_clean"])
    assert "true_noise_rise" in inj
    assert "injected rate" in (tmp_path / "qa" / "report.md").read_text()


# ------------------------------------------------------------------------------------ injection modes

MODE_KEYS = (
    "mode",
    "available",
    "units",
    "injected",
    "injected_rate",
    "auroc_clean_vs_injected",
    "auroc_tagged_clean_vs_injected",
    "injected_kept_fraction",
    "clean_kept_fraction",
    "recovered_rate",
    "true_noise_rise",
    "recovery_ratio",
    "examples",
)


@pytest.fixture(scope="module")
def all_modes(tiny_run, tiny_clip_dir, tmp_path_factory) -> dict:
    """One report with every mode (parsed from the CLI spelling "all")."""
    return build_report(
        tiny_run,
        tmp_path_factory.mktemp("qa_modes"),
        sheet_samples=0,
        inject_noise=0.25,
        clip_model=str(tiny_clip_dir),
        inject_max_samples=12,
        inject_modes=parse_inject_modes("all"),
        seed=7,
    )


def test_every_mode_reports_its_block(all_modes, tiny_run, tiny_clip_dir, tmp_path):
    inj = all_modes["injection"]
    assert list(inj["modes"]) == list(INJECT_MODES)
    for mode, block in inj["modes"].items():
        assert all(k in block for k in MODE_KEYS), (mode, set(MODE_KEYS) - set(block))
        assert block["mode"] == mode and block["available"] is True
        assert block["injected"] > 0 and block["captions"] == 12
        assert block["injected_rate"] == pytest.approx(block["injected"] / block["units"])
        for k in ("auroc_clean_vs_injected", "auroc_tagged_clean_vs_injected"):
            assert 0.0 <= block[k] <= 1.0
        assert block["recovered_rate"] == pytest.approx(
            block["estimated_noise_mixed"] - block["estimated_noise_clean"]
        )
        assert 0.0 < block["true_noise_rise"] <= block["injected_rate"]
    # The top-level block is the first mode's, as before the modes existed
    assert {k: v for k, v in inj.items() if k != "modes"} == inj["modes"]["any"]
    # "any" is what it was alone: the other modes do not shift its random stream
    alone = build_report(
        tiny_run,
        tmp_path / "qa_any",
        sheet_samples=0,
        inject_noise=0.25,
        clip_model=str(tiny_clip_dir),
        inject_max_samples=12,
        seed=7,
    )["injection"]
    assert list(alone["modes"]) == ["any"]
    for k, v in inj["modes"]["any"].items():
        assert alone[k] == (pytest.approx(v, rel=1e-9) if isinstance(v, float) else v), k
    assert "injection_modes" in all_modes["figures"]


def test_same_part_donors_name_the_same_part_and_are_another_persons(all_modes, tiny_dataset):
    splitter = CaptionSplitter()
    rows = pq.read_table(tiny_dataset / "manifest.parquet").to_pylist()
    examples = all_modes["injection"]["modes"]["same-part"]["examples"]
    assert examples
    for e in examples:
        (orig,), (donor,) = splitter.split(e["original"]), splitter.split(e["injected"])
        assert orig.part_tags == donor.part_tags
        owners = {r["person_id"] for r in rows if e["injected"] in r["caption"]}
        assert owners - {e["person_id"]}, e


def test_attribute_mode_alters_units_with_words_the_person_does_not_wear(all_modes, tiny_run, tiny_dataset):
    identities = read_identity_attributes(tiny_dataset)
    vocabulary = attribute_vocabulary()
    block = all_modes["injection"]["modes"]["attribute"]
    assert 0 < block["injected"] <= block["alterable_units"]
    # Per slot: the two kinds of change add up to the whole, each with its own AUROC
    by_slot = block["by_slot"]
    assert set(by_slot) <= {"colour", "garment"} and by_slot
    assert sum(b["injected"] for b in by_slot.values()) == block["injected"]
    for b in by_slot.values():
        assert 0 <= b["injected_kept_fraction"] <= 1 and 0 <= b["auroc_tagged_clean_vs_injected"] <= 1
    (table,) = [b for b in _mode_blocks(all_modes["injection"]["modes"]) if b[0] == "table"][:1]
    assert {f"attribute: {slot}" for slot in by_slot} <= {row[0] for row in table[2]}
    # Every perturbation of the whole tiny run: the unit really altered, the new word false
    clean = pl.from_arrow(read_pairs(tiny_run))
    rows = pl.read_parquet(tiny_dataset / "manifest.parquet")
    n = clean.height
    targets, perturbed, alterable = attribute_perturbations(
        clean, rows, identities, np.random.default_rng(0), n
    )
    assert len(perturbed) == len(targets) == alterable > n // 2
    captions = dict(rows.select("sample_id", "caption").iter_rows())
    examples = [(e["person_id"], e["original"], e["injected"]) for e in block["examples"]]
    pid_of = dict(zip(clean["sample_id"], clean["person_id"], strict=False))
    for p in perturbed:
        unit = clean.row(p.target, named=True)
        caption = captions[unit["sample_id"]]
        assert p.original == caption[unit["char_start"] : unit["char_end"]] != p.injected
        assert p.row["caption"] == caption[: unit["char_start"]] + p.injected + caption[unit["char_end"] :]
        assert p.row["caption"][p.span[0] : p.span[1]] == p.injected
        examples.append((pid_of[unit["sample_id"]], p.original, p.injected))
    slot_of = {(p.original, p.injected): p.slot for p in perturbed}
    assert set(slot_of.values()) == {"colour", "garment"}
    phrases = {w for slots in vocabulary.values() for words in slots.values() for w in words}
    splitter = CaptionSplitter()
    for pid, original, injected in examples:
        # The colour or garment phrases the injected unit says and the clean one did not
        new = {w for w in phrases if _says(injected, w) and not _says(original, w)}
        new = {
            w for w in new if not any(w != v and _says(v, w) for v in new)
        }  # "button-up shirt", not "shirt"
        assert len(new) == 1, (original, injected, new)
        (w,) = new
        if (original, injected) in slot_of:  # the slot recorded is the kind of word that changed
            assert w in {c for slots in vocabulary.values() for c in slots[slot_of[original, injected]]}
        person, tags = identities[pid], splitter.split(original)[0].part_tags
        # ... of a part the unit names, and not worn there by this person
        assert any(
            w in vocabulary[part][s] and w not in person[part][s]
            for part in tags
            if part in person
            for s in ("colour", "garment")
        ), (w, original, injected)


def _says(text: str, phrase: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(phrase)}(?![\w-])", text.lower()) is not None


def test_parse_inject_modes():
    assert parse_inject_modes("all") == INJECT_MODES
    assert parse_inject_modes("attribute, any,attribute") == ("attribute", "any")
    with pytest.raises(ValueError, match="same-part"):
        parse_inject_modes("any,colour")
    with pytest.raises(ValueError):
        parse_inject_modes("")
