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
import dataclasses
import json
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from miners.calibration import CALIBRATOR_FILENAME, default_calibrator, fit_calibrator
from miners.matching import MatchConfig
from miners.metrics import expected_calibration_error
from miners.rsm import RSMConfig, RSMMiner, matches_from_pairs
from storage.manifest import read_manifest
from storage.synth.identities import read_identity_attributes
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


# Text noise the calibrator learns from (see `noisy_pairs`): both keep the part words of the unit, so
# only the pixels can tell the pair is wrong.
TEXT_NOISE_MODES = ("same-part", "attribute")


def noisy_pairs(
    miner: RSMMiner,
    table: pa.Table,
    root: str,
    clean: pa.Table,
    fraction: float,
    modes: tuple[str, ...],
    seed: int,
) -> tuple[pa.Table | None, dict]:
    """Pairs of known-wrong text units: a `fraction` of `clean`'s units (split over `modes`) made wrong
    (miners.caption_noise: another person's same-part unit swapped in, or a colour / garment word the
    person does not wear where the dataset has the synthetic identity file), re-mined in their
    captions and found by span. Returns (their pairs or None, what was made per mode)."""
    # here, not at the top: the caption splitter imports spaCy and torch, which `--help` need not wait for
    from miners.caption_noise import (
        NoiseUnavailable,
        attribute_perturbations,
        locate_injected,
        swap_perturbations,
    )

    clean_df, rows_df = pl.from_arrow(clean), pl.from_arrow(table)
    n_target = round(fraction * clean_df.height / max(1, len(modes)))
    made: dict[str, object] = {}
    perturbed: dict[str, list] = {}
    rng = np.random.default_rng(seed)
    for mode in modes:
        try:
            if mode == "attribute":
                identities = read_identity_attributes(root)
                if identities is None:
                    raise NoiseUnavailable("no synthetic identity file in the dataset folder")
                _, made_mode, _ = attribute_perturbations(clean_df, rows_df, identities, rng, n_target)
            elif mode == "same-part":
                _, made_mode = swap_perturbations(clean_df, rows_df, rng, n_target, same_part=True)
            else:
                raise ValueError(f"unknown text noise mode {mode!r}; use {', '.join(TEXT_NOISE_MODES)}")
        except NoiseUnavailable as exc:
            made[mode] = f"unavailable: {exc}"
            continue
        # Two modes may pick the same unit: give each mode's captions their own sample ids
        perturbed[mode] = [
            dataclasses.replace(
                p, sample_id=f"{p.sample_id}-{mode}", row={**p.row, "sample_id": f"{p.sample_id}-{mode}"}
            )
            for p in made_mode
        ]
    rows = [p.row for ps in perturbed.values() for p in ps]
    if not rows:
        return None, made
    mined = pl.from_arrow(miner.mine(pa.Table.from_pylist(rows, schema=table.schema), root).pairs)
    found_rows = []
    for mode, ps in perturbed.items():
        ids = [p.sample_id for p in ps]
        found = locate_injected(mined.filter(pl.col("sample_id").is_in(ids)), ps)
        made[mode] = len(found)
        found_rows += list(found.values())
    if not found_rows:
        return None, made
    return pa.Table.from_pylist(found_rows, schema=clean.schema), made


def fit_on_manifest(
    manifest_path: Path,
    cfg: RSMConfig,
    split: str | None,
    max_images: int | None,
    text_noise: float = 0.2,
    text_noise_modes: tuple[str, ...] = TEXT_NOISE_MODES,
    seed: int = 0,
):
    """(calibrator, report): mine `split` with the default prior, judge against the ground truth, add
    `text_noise` known-wrong units (`noisy_pairs`; 0 for none), fit. The report's figures are on the
    clean pairs only."""
    table, meta = read_manifest(manifest_path)
    if pc.sum(pc.is_valid(table["gt_links"])).as_py() in (None, 0):
        raise ValueError(
            f"{manifest_path} ({meta.get('format') or 'unknown format'}) holds no region ground truth: the "
            "calibrator is fitted on ground-truth region-sentence links, which only a pvlg manifest (the "
            "synthetic benchmark's, `python -m storage.manifest --format pvlg`) has. For your own data, "
            "use the calibrator of a model fitted on such a manifest (`--calibrator` on the flow), or "
            "refit it on hand labels with `python -m qa.audit` (README, 'Auditing a sample by hand')"
        )
    splits = sorted(set(table["split"].to_pylist()))
    if split:
        table = table.filter(pc.equal(table["split"], split))
    table = table.filter(pc.is_valid(table["gt_links"]))
    if table.num_rows == 0:
        raise ValueError(
            f"{manifest_path}: no rows with ground truth in split {split!r} (its splits: "
            f"{', '.join(map(str, splits))}; --split '' fits on all)"
        )
    table = first_images(table, max_images)
    miner = RSMMiner(cfg, calibrator=default_calibrator(cfg.match.mode))
    result = miner.mine(table, meta["root"])
    has_truth, groundable, correct = judge_pairs(result.pairs, table)
    fit_pairs, fit_correct, made = result.pairs, correct, {}
    if text_noise > 0:
        wrong, made = noisy_pairs(
            miner, table, meta["root"], result.pairs, text_noise, text_noise_modes, seed
        )
        if wrong is not None:
            fit_pairs = pa.concat_tables([result.pairs, wrong])
            fit_correct = np.concatenate([correct, np.zeros(wrong.num_rows, dtype=bool)])
    calibrator = fit_calibrator(matches_from_pairs(fit_pairs), fit_correct, mode=cfg.match.mode)
    calibrator.model_fingerprint = miner.clip_fingerprint
    matches = matches_from_pairs(result.pairs)
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
            "text_noise": {
                "fraction": text_noise,
                "modes": list(text_noise_modes),
                "made": made,
                "seed": seed,
            },
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
    ap.add_argument(
        "--text-noise",
        type=float,
        default=0.2,
        help="fraction of units made wrong (known negatives) for the fit, so reliability learns what wrong text looks like; 0: none",
    )
    ap.add_argument(
        "--text-noise-modes", default=",".join(TEXT_NOISE_MODES), help="comma list of same-part, attribute"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help=f"default: <clip-model>/{CALIBRATOR_FILENAME}")
    args = ap.parse_args(argv)
    cfg = RSMConfig(
        clip_model=str(args.clip_model),
        proposer=args.proposer,
        crop_mode=args.crop_mode,
        match=MatchConfig(mode=args.mode),
    )
    try:
        modes = tuple(m.strip() for m in args.text_noise_modes.split(",") if m.strip())
        calibrator, report = fit_on_manifest(
            args.manifest, cfg, args.split or None, args.max_images, args.text_noise, modes, args.seed
        )
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}")
        return 2
    out = calibrator.save(args.out or args.clip_model / CALIBRATOR_FILENAME)
    shown = {k: (round(v, 4) if isinstance(v, float) and np.isfinite(v) else v) for k, v in report.items()}
    print(f"calibrator ({args.mode}) saved to {out}\nin-sample: {json.dumps(shown)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
