"""Fine-tune the mining CLIP on a run's own kept pairs, and save it as a CLIP the miner loads.

    python -m miners.refine_clip --pairs SHARDS --out DIR [--epochs 2] [--batch-size 128] [--lr 2e-4]
        [--calibration-manifest M] [--bank-manifest M] [--init DIR] [--device auto]

Consumes a committed mining run (its pairs, its run config: which CLIP, crop mode and proposer it
used, and its manifest); takes the train split's kept pairs, holds out 10% of their images, and
fine-tunes the run's CLIP on region crop ↔ sentence (miners.training.refine: reliability-weighted,
identity-aware, with same-part hard negatives from other people, colour negatives: the sentence
itself with one colour word changed, and garment negatives: with one garment noun changed to another
kind of its part) on the one Trainer (bf16 autocast on
CUDA). Produces DIR as a `from_pretrained` folder with, beside the weights:
- `rsm-bank.json` / `rsm-bank.npz`: its reference bank, rebuilt with the refined model (miners.bank);
- `rsm-calibrator.json`: refit on `--calibration-manifest` (a manifest with ground truth; default: the
  one the start model's calibrator was fitted on), since every feature moved with the model;
- `refine.json` (written last: a folder without it is unfinished and is redone): the source run, the
  start model, the pairs used, and the held-out figures before and after (`own_beats_other_rate`: how
  often a region scores its own sentence above another person's same-part sentence;
  `own_beats_altered_rate` / `own_beats_garment_rate`: above itself with a colour / garment changed).
A real ViT-B/16 fine-tunes the same way on a GPU: `--device cuda --batch-size 256 --lr 1e-5`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import pyarrow.compute as pc

REFINE_FILENAME = "refine.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m miners.refine_clip", description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", required=True, type=Path, help="a committed mining run (shard folder)")
    ap.add_argument("--out", required=True, type=Path, help="the refined CLIP folder to write")
    ap.add_argument("--init", type=Path, help="CLIP to start from (default: the one the run mined with)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-4, help="2e-4 suits the tiny CLIP; ~1e-5 a real one")
    ap.add_argument("--hard-weight", type=float, default=1.0, help="weight of the same-part hard negatives")
    ap.add_argument(
        "--colour-weight",
        type=float,
        default=1.0,
        help="weight of the colour negatives (each sentence with one colour word changed); 0: none",
    )
    ap.add_argument(
        "--garment-weight",
        type=float,
        default=1.0,
        help="weight of the garment negatives (each sentence with one garment noun changed to another "
        "kind of its body part, e.g. jeans -> shorts); 0: none",
    )
    ap.add_argument("--no-reliability", action="store_true", help="uniform pair weights")
    ap.add_argument("--held-out", type=float, default=0.1, help="fraction of images held out for figures")
    ap.add_argument("--max-pairs", type=int, default=40000, help="at most this many kept pairs (seeded)")
    ap.add_argument("--calibration-manifest", type=Path, help="manifest with ground truth to refit on")
    ap.add_argument(
        "--bank-manifest", type=Path, help="manifest whose train split feeds the bank (default: the run's)"
    )
    ap.add_argument("--bank-per-part", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    return ap.parse_args(argv)


def is_refined(folder: Path) -> bool:
    """A finished refine folder (refine.json is written last)."""
    return (folder / REFINE_FILENAME).is_file() and (folder / "config.json").is_file()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from miners.run_config import read_committed_run

    try:
        plan, run_config, pairs = read_committed_run(args.pairs)
    except Exception as exc:
        print(f"error: cannot read committed pairs from {args.pairs}: {exc}", file=sys.stderr)
        return 2
    rsm = run_config.rsm
    init = args.init or Path(rsm.clip_model)
    manifest_path = Path(plan.manifest_path)
    calib_manifest = args.calibration_manifest or _calibration_manifest_of(init)
    problems = []
    if not (init / "config.json").is_file():
        problems.append(f"CLIP folder {init} not found (pass --init)")
    if not manifest_path.is_file():
        problems.append(f"manifest {manifest_path} not found")
    if calib_manifest is not None and not Path(calib_manifest).is_file():
        # Never fall back to the uncalibrated prior quietly: the start model was calibrated
        problem = f"calibration manifest {calib_manifest} not found"
        if not args.calibration_manifest:
            problem += (
                f" (the start model's calibrator was fitted on it; from {Path.cwd()} it is not there: "
                "pass --calibration-manifest)"
            )
        problems.append(problem)
    if args.out.resolve() == init.resolve():
        problems.append(f"--out {args.out} is the start model itself; write the refined model elsewhere")
    if problems:
        print("error: " + "; ".join(problems), file=sys.stderr)
        return 2
    try:
        summary = refine(args, rsm, init, manifest_path, pairs, calib_manifest)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    before, after = summary["held_out_before"], summary["held_out_after"]
    print(
        f"refine_clip: {summary['train_pairs']} pairs, {args.epochs} epochs in {summary['seconds']:.0f}s; held out "
        f"own-beats-other {before.get('own_beats_other_rate', float('nan')):.3f} → "
        f"{after.get('own_beats_other_rate', float('nan')):.3f}, AUROC "
        f"{before.get('own_vs_other_auroc', float('nan')):.3f} → {after.get('own_vs_other_auroc', float('nan')):.3f}"
        f"  → {args.out}"
    )
    return 0


def _calibration_manifest_of(model_dir: Path) -> Path | None:
    """The manifest the model's calibrator was fitted on, if it says so (as written then: a relative
    path is relative to the directory it was fitted from; the caller checks that it exists)."""
    from miners.calibration import CALIBRATOR_FILENAME

    try:
        info = json.loads((model_dir / CALIBRATOR_FILENAME).read_text()).get("fit_info", {})
    except (OSError, ValueError):
        return None
    path = info.get("manifest")
    return Path(path) if path else None


def refine(args, rsm, init: Path, manifest_path: Path, pairs, calib_manifest: Path | None) -> dict:
    import numpy as np

    from miners.bank import build_bank
    from miners.clip_scorer import ClipScorer, ScorerConfig, model_fingerprint
    from miners.training.refine import (
        RegionSentenceObjective,
        build_refine_data,
        own_vs_other_sentence,
        split_by_image,
        write_json,
    )
    from miners.training.trainer import TrainConfig, Trainer
    from storage.manifest import read_manifest

    t0 = time.perf_counter()
    table, meta = read_manifest(manifest_path)
    kept = pairs.filter(pc.and_(pc.equal(pairs["split"], "train"), pc.equal(pairs["kept"], True)))
    if kept.num_rows > args.max_pairs:
        pick = np.sort(np.random.default_rng(args.seed).choice(kept.num_rows, args.max_pairs, replace=False))
        kept = kept.take(pick)
    if kept.num_rows < 2:
        raise ValueError(f"{args.pairs}: only {kept.num_rows} kept train-split pairs; nothing to refine on")
    image_paths = dict(zip(table["image_id"].to_pylist(), table["image_path"].to_pylist(), strict=True))
    train_pairs, held_pairs = split_by_image(kept, args.held_out, args.seed)
    cropper = ClipScorer(init, ScorerConfig(crop_mode=rsm.crop_mode, device="cpu"))
    model, processor = cropper.model, cropper.processor  # one load: the scorer's model is the one trained
    train = build_refine_data(
        train_pairs, image_paths, meta["root"], cropper, processor, not args.no_reliability
    )
    held = build_refine_data(
        held_pairs, image_paths, meta["root"], cropper, processor, not args.no_reliability
    )
    del cropper
    print(
        f"refine_clip: {len(train)} train pairs ({len(train.crops_u8)} regions), {len(held)} held out; "
        f"{len(train.skipped) + len(held.skipped)} images skipped; data in {time.perf_counter() - t0:.1f}s",
        flush=True,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / REFINE_FILENAME).unlink(missing_ok=True)  # unfinished until written again, last
    cfg = TrainConfig(
        epochs=args.epochs,
        batch_size=min(args.batch_size, max(2, len(train))),
        lr=args.lr,
        seed=args.seed,
        device=args.device,
        warmup_fraction=0.1,
        weight_decay_exempt=False,  # decay on every parameter, as this fine-tune was measured with
    )
    objective = RegionSentenceObjective(
        hard_weight=args.hard_weight, colour_weight=args.colour_weight, garment_weight=args.garment_weight
    )
    run_dir = args.out / ".refine-run"  # checkpoints and curves; not part of the model's fingerprint
    trainer = Trainer(model, processor, cfg, run_dir, objective=objective)
    before = own_vs_other_sentence(model, trainer, held)
    after = trainer.fit(train, held)
    model.save_pretrained(args.out)
    processor.save_pretrained(args.out)
    if (run_dir / "curves.png").is_file():
        shutil.copy(run_dir / "curves.png", args.out / "refine-curves.png")
    shutil.rmtree(run_dir / "checkpoint", ignore_errors=True)  # the weights are in args.out now

    bank_manifest = args.bank_manifest or manifest_path
    print(f"refine_clip: building the reference bank from {bank_manifest} (train split)", flush=True)
    build_bank(
        bank_manifest, args.out, "train", args.bank_per_part, args.seed, rsm.proposer, rsm.crop_mode
    ).save(args.out)
    calibration = None
    if calib_manifest is not None:
        from miners.rsm import RSMConfig
        from miners.training.fit_calibrator import fit_on_manifest

        print(f"refine_clip: refitting the calibrator on {calib_manifest}", flush=True)
        cal_cfg = RSMConfig(
            clip_model=str(args.out), proposer=rsm.proposer, crop_mode=rsm.crop_mode, match=rsm.match
        )
        calibrator, report = fit_on_manifest(Path(calib_manifest), cal_cfg, None, 1500)
        calibrator.save(args.out)
        calibration = {"manifest": str(calib_manifest), "in_sample": report}
    else:
        print(
            "refine_clip: no calibration manifest: the miner uses the uncalibrated default prior", flush=True
        )
    summary = {
        "source_run": str(Path(args.pairs).resolve()),
        "start_model": str(init.resolve()),
        "start_model_fingerprint": model_fingerprint(init),
        "model_fingerprint": model_fingerprint(args.out),
        "crop_mode": rsm.crop_mode,
        "train_pairs": len(train),
        "held_out_pairs": len(held),
        "images_skipped": {**train.skipped, **held.skipped},
        "train_config": {k: getattr(cfg, k) for k in ("epochs", "batch_size", "lr", "seed")},
        "hard_weight": args.hard_weight,
        "colour_weight": args.colour_weight,
        "garment_weight": args.garment_weight,
        "reliability_weighted": not args.no_reliability,
        "held_out_before": before,
        "held_out_after": after,
        "calibration": calibration,
        "bank_manifest": str(bank_manifest),
        "seconds": time.perf_counter() - t0,
    }
    write_json(args.out / REFINE_FILENAME, summary)
    return summary


if __name__ == "__main__":
    raise SystemExit(main())
