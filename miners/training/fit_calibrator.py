"""Fit the reliability calibrator on ground-truth links and save it beside its CLIP model.

Consumes a manifest with ground truth (pvlg / synthetic) and a CLIP folder; runs the RSM on the chosen
split with the label-free default, judges every pair against the ground truth, fits a logistic
calibrator on the matching features, and writes `<clip-model>/rsm-calibrator.json` (versioned, tied
to the model's fingerprint). Prints the in-sample precision / coverage / ECE; held-out figures come
from `make bench`.

    python -m miners.training.fit_calibrator --manifest M --clip-model DIR [--split train] [--mode combined]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from miners.calibration import CALIBRATOR_FILENAME, default_calibrator, fit_calibrator
from miners.matching import MatchConfig
from miners.metrics import expected_calibration_error
from miners.rsm import RSMConfig, RSMMiner, matches_from_pairs
from storage.manifest import read_manifest
from storage.truth import judge_pairs, pair_quality


def first_images(table, max_images: int | None):
    """Rows of the first `max_images` distinct images (manifest order), all their captions."""
    if not max_images:
        return table
    seen: dict[str, None] = {}
    for iid in table["image_id"].to_pylist():
        if iid not in seen:
            if len(seen) == max_images:
                break
            seen[iid] = None
    return table.filter(pc.is_in(table["image_id"], value_set=pa.array(list(seen))))


def fit_on_manifest(manifest_path: Path, cfg: RSMConfig, split: str | None, max_images: int | None):
    """(calibrator, report): mine `split` with the default prior, judge, fit."""
    table, meta = read_manifest(manifest_path)
    if split:
        table = table.filter(pc.equal(table["split"], split))
    table = table.filter(pc.is_valid(table["gt_links"]))
    table = first_images(table, max_images)
    if table.num_rows == 0:
        raise ValueError(f"{manifest_path}: no rows with ground truth in split {split!r}")
    miner = RSMMiner(cfg, calibrator=default_calibrator(cfg.match.mode))
    result = miner.mine(table, meta["root"])
    has_truth, groundable, correct = judge_pairs(result.pairs, table)
    matches = matches_from_pairs(result.pairs)
    calibrator = fit_calibrator(matches, correct, mode=cfg.match.mode)
    calibrator.model_fingerprint = miner.clip_fingerprint
    reliability = calibrator.predict(matches)
    kept = reliability >= cfg.match.keep_threshold
    ece, _ = expected_calibration_error(reliability, correct)
    report = pair_quality(kept, groundable, correct)
    report.update(ece_in_sample=ece, samples=table.num_rows, images=len(set(table["image_id"].to_pylist())))
    calibrator.fit_info.update(
        {
            "manifest": str(manifest_path),
            "split": split,
            "samples": table.num_rows,
            "proposer": cfg.proposer,
            "crop_mode": cfg.crop_mode,
            "in_sample": {k: v for k, v in report.items() if isinstance(v, float)},
        }
    )
    assert has_truth.all()
    return calibrator, report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m miners.training.fit_calibrator", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--manifest", required=True, type=Path)
    ap.add_argument("--clip-model", required=True, type=Path)
    ap.add_argument("--split", default="train", help="split to fit on ('' for all)")
    ap.add_argument("--mode", choices=["combined", "clip", "lexical"], default="combined")
    ap.add_argument("--proposer", default="prior")
    ap.add_argument("--crop-mode", default="box", choices=["box", "mask", "blur"])
    ap.add_argument("--max-images", type=int, default=1500)
    ap.add_argument("--out", type=Path, help=f"default: <clip-model>/{CALIBRATOR_FILENAME}")
    args = ap.parse_args(argv)
    cfg = RSMConfig(
        clip_model=str(args.clip_model),
        proposer=args.proposer,
        crop_mode=args.crop_mode,
        match=MatchConfig(mode=args.mode),
    )
    try:
        calibrator, report = fit_on_manifest(args.manifest, cfg, args.split or None, args.max_images)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}")
        return 2
    out = calibrator.save(args.out or args.clip_model / CALIBRATOR_FILENAME)
    shown = {k: (round(v, 4) if isinstance(v, float) and np.isfinite(v) else v) for k, v in report.items()}
    print(f"calibrator ({args.mode}) saved to {out}\nin-sample: {json.dumps(shown)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
