"""ROGLE training: global identity-aware contrastive + reliability-weighted region–sentence alignment.

Consumes committed pair shards (read through their run manifest, never a glob), the manifest they were
mined from (images, captions, person ids, splits, ground truth), and a CLIP folder to start from (the
tiny bootstrapped CLIP by default; a real CLIP such as ViT-B/16 when given); produces a run folder
(see miners/training/trainer.py): resolved config, resumable checkpoint, history, `metrics.json` with R1, R5,
R10, mAP, mINP, local_grounding_acc and a `long_query` block, and `curves.png`.

    python -m miners.train_rogle --pairs SHARDS [--manifest M] [--init DIR] [--out RUN_DIR]
        [--epochs N] [--no-local] [--no-reliability] [--seed S]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pyarrow.compute as pc

from miners.clip_scorer import load_clip
from miners.run_config import read_run_config
from miners.training.data import build_clip_data
from miners.training.trainer import TrainConfig, Trainer
from storage.manifest import read_manifest
from storage.reader import read_pairs
from storage.shards import load_run_plan


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m miners.train_rogle", description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", required=True, type=Path, help="committed shard folder (has _SUCCESS)")
    ap.add_argument("--manifest", type=Path, help="default: the manifest the shards were mined from")
    ap.add_argument("--init", type=Path, help="CLIP folder to start from (default: the mining run's CLIP)")
    ap.add_argument("--out", type=Path, default=Path("outputs/train"), help="run folder")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=None, help="default 1e-4 (fine-tuning the bootstrapped CLIP)")
    ap.add_argument("--no-local", action="store_true", help="global branch only")
    ap.add_argument("--no-reliability", action="store_true", help="uniform weights for the local pairs")
    ap.add_argument("--local-weight", type=float, default=0.5)
    ap.add_argument("--reliability-threshold", type=float, default=0.5)
    ap.add_argument("--text-mode", choices=["sentence-pool", "truncate"], default="sentence-pool")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=1, help="evaluate every N epochs (and after the last)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoint")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        plan = load_run_plan(args.pairs)
        run_config = read_run_config(args.pairs)
        pairs = read_pairs(args.pairs)
    except Exception as exc:
        print(f"error: cannot read committed pairs from {args.pairs}: {exc}")
        return 2
    manifest_path = args.manifest or Path(plan.manifest_path)
    init = args.init or Path(run_config.rsm.clip_model)
    if not manifest_path.is_file():
        print(f"error: manifest {manifest_path} not found (pass --manifest)")
        return 2
    if not (init / "config.json").is_file():
        print(f"error: CLIP folder {init} not found (pass --init)")
        return 2
    table, meta = read_manifest(manifest_path)
    pairs = pairs.filter(pc.equal(pairs["split"], "train"))

    cfg = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr if args.lr is not None else 1e-4,
        text_mode=args.text_mode,
        local_weight=0.0 if args.no_local else args.local_weight,
        use_reliability=not args.no_reliability,
        reliability_threshold=args.reliability_threshold,
        seed=args.seed,
        eval_every_epochs=args.eval_every,
        device=args.device,
    )
    model, processor = load_clip(init, "cpu")
    t0 = time.perf_counter()
    train_rows = table.filter(pc.equal(table["split"], "train"))
    test_rows = table.filter(pc.equal(table["split"], "test"))
    train = build_clip_data(
        train_rows,
        processor,
        root=meta["root"],
        pairs=None if args.no_local else pairs,
        use_reliability=cfg.use_reliability,
        reliability_threshold=cfg.reliability_threshold,
    )
    test = build_clip_data(test_rows, processor, root=meta["root"]) if test_rows.num_rows else None
    weights = [pair.weight for caption_pairs in train.local_pairs for pair in caption_pairs]
    n_local = len(weights)
    print(
        f"train_rogle: {len(train)} train captions, {n_local} local pairs "
        f"({'reliability-weighted' if cfg.use_reliability else 'uniform'}"
        f"{', local branch off' if args.no_local else ''}), "
        f"{len(test) if test else 0} test captions; data in {time.perf_counter() - t0:.1f}s"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "run_args.json").write_text(
        json.dumps(
            {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
            | {
                "manifest_resolved": str(manifest_path),
                "init_resolved": str(init),
                "local_pairs": n_local,
                "local_weight_mean": sum(weights) / n_local if n_local else None,
            },
            indent=2,
        )
    )
    trainer = Trainer(model, processor, cfg, args.out)
    metrics = trainer.fit(train, test, resume=args.resume)
    if metrics:
        lq = metrics.get("long_query", {})
        print(
            f"R1 {metrics['R1']:.1f}  R5 {metrics['R5']:.1f}  R10 {metrics['R10']:.1f}  mAP {metrics['mAP']:.1f}  "
            f"mINP {metrics['mINP']:.1f}  long-query R1 {lq.get('R1', float('nan')):.1f}  "
            f"local grounding {metrics.get('local_grounding_acc') or float('nan'):.1f}%  → {args.out}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
