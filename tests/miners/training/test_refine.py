"""miners.refine_clip: a tiny CPU run fine-tunes the mining CLIP on its own kept pairs; the refined folder
loads like any CLIP, carries its bank, calibrator and refine.json, and scores its own pairs higher."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.compute as pc
import pytest
import torch

from miners.bank import BANK_META
from miners.clip_scorer import ClipScorer, ScorerConfig, load_clip
from miners.refine_clip import REFINE_FILENAME, is_refined
from miners.refine_clip import main as refine_main
from miners.rsm import RSMConfig, RSMMiner
from miners.training.refine import RegionSentenceObjective, build_refine_data, own_vs_other_sentence
from miners.training.trainer import TrainConfig, Trainer
from storage.manifest import read_manifest
from storage.reader import read_pairs


@pytest.fixture(scope="module")
def refined(tiny_run, tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("refined") / "clip"
    argv = [
        "--pairs",
        str(tiny_run),
        "--out",
        str(out),
        "--epochs",
        "6",
        "--batch-size",
        "32",
        "--lr",
        "2e-3",
    ]
    argv += [
        "--held-out",
        "0.0",
        "--bank-per-part",
        "16",
        "--calibration-manifest",
        str(tiny_dataset / "manifest.parquet"),
    ]
    assert refine_main(argv) == 0
    return out


def _data(tiny_run, tiny_dataset, clip_dir):
    pairs = read_pairs(tiny_run)
    pairs = pairs.filter(pc.and_(pc.equal(pairs["split"], "train"), pairs["kept"]))
    table, meta = read_manifest(tiny_dataset / "manifest.parquet")
    paths = dict(zip(table["image_id"].to_pylist(), table["image_path"].to_pylist(), strict=True))
    model, processor = load_clip(clip_dir, "cpu")
    scorer = ClipScorer(clip_dir, ScorerConfig(device="cpu"))
    return model, processor, build_refine_data(pairs, paths, meta["root"], scorer, processor)


def test_the_refined_model_scores_its_own_pairs_higher(
    refined, tiny_run, tiny_dataset, tiny_clip_dir, tmp_path
):
    summary = json.loads((refined / REFINE_FILENAME).read_text())
    assert (
        is_refined(refined)
        and (refined / BANK_META).is_file()
        and (refined / "rsm-calibrator.json").is_file()
    )
    assert summary["train_pairs"] > 20 and summary["start_model"] == str(tiny_clip_dir.resolve())
    assert summary["model_fingerprint"] != summary["start_model_fingerprint"]
    # Judged here, independently of the command's own figures: the same pairs, both models.
    figures = {}
    for name, folder in (("start", tiny_clip_dir), ("refined", refined)):
        model, processor, data = _data(tiny_run, tiny_dataset, folder)
        trainer = Trainer(model, processor, TrainConfig(device="cpu"), tmp_path / name)
        figures[name] = own_vs_other_sentence(model, trainer, data)
    assert figures["refined"]["own_beats_other_rate"] > figures["start"]["own_beats_other_rate"] + 0.1
    # The garment negatives teach garment kinds: its own sentence beats itself with "jeans" -> "shorts"
    assert figures["refined"]["own_beats_garment_rate"] > figures["start"]["own_beats_garment_rate"]
    # And the miner loads it like any CLIP, with its content features and refit calibrator.
    table, meta = read_manifest(tiny_dataset / "manifest.parquet")
    miner = RSMMiner(RSMConfig(clip_model=str(refined)))
    assert miner.calibrator.uses_content and miner.bank is not None
    pairs = miner.mine(table.slice(0, 6), meta["root"]).pairs
    assert pairs.num_rows > 0 and pairs["bank_region_z"].null_count == 0


def test_identity_aware_negatives_leave_the_same_persons_same_part_out(
    tiny_run, tiny_dataset, tiny_clip_dir, tmp_path
):
    model, processor, data = _data(tiny_run, tiny_dataset, tiny_clip_dir)
    trainer = Trainer(model, processor, TrainConfig(device="cpu"), tmp_path)
    idx = np.arange(min(len(data), 24))
    with torch.no_grad():
        base, _ = RegionSentenceObjective(hard_weight=0.0).loss(trainer, data, idx)
    # Give every region of the batch the first pair's person and part: all but the own region become
    # "another image of the same person", ignored rather than negatives, so the loss must fall.
    same = data.__class__(**{**data.__dict__})
    same.pair_person = np.full_like(data.pair_person, data.pair_person[0])
    same.region_person = np.full_like(data.region_person, data.pair_person[0])
    same.pair_part = np.full_like(data.pair_part, data.pair_part[0])
    with torch.no_grad():
        ignored, _ = RegionSentenceObjective(hard_weight=0.0).loss(trainer, same, idx)
    assert torch.isfinite(base) and ignored.item() < base.item()


def test_refine_refuses_what_it_cannot_use(tiny_run, tiny_clip_dir, tmp_path, capsys):
    assert refine_main(["--pairs", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "cannot read committed pairs" in capsys.readouterr().err
    assert refine_main(["--pairs", str(tiny_run), "--out", str(tiny_clip_dir)]) == 2
    assert "is the start model itself" in capsys.readouterr().err
    # A calibrated start model whose calibration manifest is gone from here: refused, never the prior
    start = tmp_path / "start"
    shutil.copytree(tiny_clip_dir, start)
    (start / "rsm-calibrator.json").write_text(json.dumps({"fit_info": {"manifest": "no/such/m.parquet"}}))
    argv = ["--pairs", str(tiny_run), "--init", str(start), "--out", str(tmp_path / "o")]
    assert refine_main(argv) == 2
    err = capsys.readouterr().err
    assert "no/such/m.parquet not found" in err and "pass --calibration-manifest" in err
    assert not (tmp_path / "o").exists()


def test_the_garment_negative_is_the_own_sentence_with_one_garment_kind_changed(
    tiny_run, tiny_dataset, tiny_clip_dir, tmp_path
):
    model, processor, data = _data(tiny_run, tiny_dataset, tiny_clip_dir)
    has = [i for i, t in enumerate(data.pair_garment_tokens) if t is not None]
    assert has and len(data.pair_garment_tokens) == len(data)
    i = has[0]
    own = processor.tokenizer.decode(data.pair_tokens[i], skip_special_tokens=True)
    altered = processor.tokenizer.decode(data.pair_garment_tokens[i], skip_special_tokens=True)
    assert own != altered and len(set(altered.split()) - set(own.split())) >= 1
    trainer = Trainer(model, processor, TrainConfig(device="cpu"), tmp_path)
    idx = np.asarray(has[:16])
    with torch.no_grad():
        with_g, logs = RegionSentenceObjective(hard_weight=0.0, colour_weight=0.0).loss(trainer, data, idx)
        without, logs0 = RegionSentenceObjective(hard_weight=0.0, colour_weight=0.0, garment_weight=0.0).loss(
            trainer, data, idx
        )
    assert "loss_garment" in logs and "loss_garment" not in logs0
    assert with_g.item() == pytest.approx(without.item() + logs["loss_garment"], rel=1e-5)
