"""Bootstrap a tiny CLIP from scratch on a manifest's image–caption pairs (global contrastive).

Consumes a manifest (train split to fit, test split to report); produces a model folder in the
`from_pretrained` layout (config.json, model.safetensors, tokenizer, processor_config.json) that the
scorer loads exactly like a real CLIP checkpoint, plus `DIR/bootstrap.json` (metrics, training time,
fingerprints) and `DIR/training/` (the trainer's run folder: checkpoint, history, curves).

    python -m miners.training.bootstrap --manifest M --out DIR [--epochs 12] [--seed 0]

A second call with the same manifest and settings reuses the finished model (prints "reusing").
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

from miners.bank import BANK_ARRAYS, BANK_META
from miners.calibration import CALIBRATOR_FILENAME
from miners.training.config import TrainConfig, training_settings


def manifest_fingerprint(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m miners.training.bootstrap", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--manifest", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path, help="model folder to write (from_pretrained layout)")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--text-mode", choices=["sentence-pool", "truncate"], default="sentence-pool")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--eval-every", type=int, default=4, help="evaluate every N epochs (and after the last)")
    ap.add_argument("--force", action="store_true", help="retrain even if a matching model exists")
    ap.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a model in --out trained on another manifest or settings (its bank and calibrator "
        "are removed with it); without it such an --out is refused",
    )
    return ap.parse_args(argv)


# What other commands write beside a model, for that model only (miners.bank, fit_calibrator)
COMPANIONS = (BANK_META, BANK_ARRAYS, CALIBRATOR_FILENAME)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # the model code is imported once the arguments are read: `--help` answers without torch
    from miners.training.data import build_clip_data
    from miners.training.tiny_clip import TinyClipConfig, build_model, build_processor, build_tokenizer
    from miners.training.trainer import Trainer

    if not args.manifest.is_file():
        print(f"error: manifest {args.manifest} does not exist")
        return 2
    model_cfg = TinyClipConfig()
    train_cfg = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        text_mode=args.text_mode,
        device=args.device,
        eval_every_epochs=args.eval_every,
        weight_decay_exempt=False,  # the tiny CLIP's recipe: decay on every parameter (config.py says why)
    )
    # What the model depends on; not where it ran or how often it was evaluated.
    train_settings = training_settings(train_cfg)
    settings = {"model": asdict(model_cfg), "train": train_settings}
    fingerprint = {"manifest": manifest_fingerprint(args.manifest), "settings": settings}
    report_path = args.out / "bootstrap.json"
    if report_path.exists() and not args.force:
        previous = json.loads(report_path.read_text())
        if previous.get("fingerprint") == fingerprint:
            print(
                f"reusing tiny CLIP at {args.out} (text→image R1 {previous['metrics'].get('R1', float('nan')):.1f}%)"
            )
            return 0

    if (args.out / "config.json").is_file() and not (args.force or args.overwrite):
        companions = [n for n in COMPANIONS if (args.out / n).is_file()]
        print(
            f"error: --out {args.out} already holds a CLIP model, trained on another manifest or settings "
            f"({'see its bootstrap.json' if report_path.exists() else 'not by this command'}); pass "
            "--overwrite to replace it"
            + (f" (its {', '.join(companions)}, built for that model, are removed)" if companions else "")
            + ", or another --out"
        )
        return 2

    table = pq.read_table(args.manifest)
    train_rows = table.filter(pc.equal(table["split"], "train"))
    test_rows = table.filter(pc.equal(table["split"], "test"))
    if train_rows.num_rows == 0:
        print(f"error: {args.manifest} has no train split rows to fit on")
        return 2
    tokenizer = build_tokenizer(train_rows["caption"].to_pylist(), model_cfg)
    processor = build_processor(tokenizer, model_cfg)
    model = build_model(len(tokenizer), model_cfg, seed=args.seed)

    t0 = time.perf_counter()
    train = build_clip_data(train_rows, processor)
    test = build_clip_data(test_rows, processor) if test_rows.num_rows else None
    load_s = time.perf_counter() - t0
    for iid, msg in {**train.skipped, **(test.skipped if test else {})}.items():
        print(f"warning: skipped image {iid}: {msg}")
    print(
        f"bootstrap: {len(train)} train captions / {train.images_u8.shape[0]} images; "
        f"{len(test) if test else 0} test captions; data loaded in {load_s:.1f}s"
    )
    t1 = time.perf_counter()
    trainer = Trainer(model, processor, train_cfg, args.out / "training")
    metrics = trainer.fit(train, test)
    train_s = time.perf_counter() - t1

    # The model folder itself is the from_pretrained directory. What was built for a model it replaces
    # (bank, calibrator) is stale: removed, so nothing mines with it.
    for name in COMPANIONS:
        if (args.out / name).is_file():
            (args.out / name).unlink()
            print(f"removed {args.out / name} (built for the replaced model)")
    model.save_pretrained(args.out)
    processor.save_pretrained(args.out)
    report = {
        "fingerprint": fingerprint,
        "metrics": metrics,
        "train_seconds": round(train_s, 1),
        "data_seconds": round(load_s, 1),
        "device": str(trainer.device),
        "parameters": sum(p.numel() for p in model.parameters()),
        "skipped_images": {**train.skipped, **(test.skipped if test else {})},
    }
    report_path.write_text(json.dumps(report, indent=2, sort_keys=True, default=str))
    shutil.rmtree(args.out / "training" / "checkpoint", ignore_errors=True)  # the model is at args.out
    r1 = metrics.get("R1", float("nan"))
    print(
        f"tiny CLIP saved to {args.out}: text→image R1 {r1:.1f}% on the test split, trained in {train_s:.0f}s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
