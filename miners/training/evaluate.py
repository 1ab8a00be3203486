"""Evaluate a training run's checkpoint on a split of its manifest, under either text mode.

    python -m miners.training.evaluate --run RUN_DIR [--split val|test] [--checkpoint best|last]
        [--text-mode truncate|sentence-pool] [--device auto]

Consumes a run folder written by `python -m miners.train_rogle` (its run_args.json names the manifest,
config.json the text mode it trained with) and the checkpoint chosen: `last` is RUN_DIR/checkpoint, `best`
RUN_DIR/checkpoint-best (the best epoch on the val split; only runs whose manifest has one). Produces the
same figures as the run's metrics.json — text→image R1/R5/R10/mAP/mINP, image→text ("i2t"), the long-query
subset, local grounding where the split has ground truth, and both text modes ("text_modes") — printed as
one line and written to RUN_DIR/eval/<split>-<checkpoint>-<text mode>.json. Exit 2 with one line for a
missing run, checkpoint or split.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

CHECKPOINTS = {"last": "checkpoint", "best": "checkpoint-best"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m miners.training.evaluate", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--run", required=True, type=Path, help="a train_rogle run folder")
    ap.add_argument("--split", choices=["val", "test"], default="test")
    ap.add_argument(
        "--checkpoint",
        choices=sorted(CHECKPOINTS),
        default="last",
        help="last: RUN_DIR/checkpoint; best: RUN_DIR/checkpoint-best (the best epoch on val)",
    )
    ap.add_argument(
        "--text-mode",
        choices=["truncate", "sentence-pool"],
        help="the headline figures' text mode (default: the run's); both are in the output",
    )
    ap.add_argument("--manifest", type=Path, help="default: the run's manifest (run_args.json)")
    ap.add_argument("--device", default="auto")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run = args.run
    problem = None
    if not (run / "run_args.json").is_file():
        problem = f"{run} is not a training run folder (no run_args.json)"
    ckpt = run / CHECKPOINTS[args.checkpoint]
    if problem is None and not (ckpt / "config.json").is_file():
        problem = f"{run} has no {ckpt.name}/" + (
            " (the best epoch is kept only when the manifest has a val split; use --checkpoint last)"
            if args.checkpoint == "best"
            else " (the run saved no checkpoint yet)"
        )
    if problem:
        print(f"error: {problem}")
        return 2
    run_args = json.loads((run / "run_args.json").read_text())
    config = json.loads((run / "config.json").read_text()) if (run / "config.json").is_file() else {}
    manifest_path = args.manifest or Path(run_args.get("manifest_resolved", ""))
    text_mode = args.text_mode or config.get("text_mode", "sentence-pool")
    if not manifest_path.is_file():
        print(f"error: manifest {manifest_path} not found (pass --manifest)")
        return 2

    import pyarrow.compute as pc

    from miners.clip_scorer import load_clip
    from miners.encoders import pick_device
    from miners.training.data import build_clip_data
    from miners.training.evaluation import evaluate_global, evaluate_local
    from miners.training.rogle import metrics_line
    from storage.manifest import read_manifest

    table, meta = read_manifest(manifest_path)
    rows = table.filter(pc.equal(table["split"], args.split))
    if rows.num_rows == 0:
        present = sorted(set(table["split"].to_pylist()))
        print(f"error: {manifest_path} has no {args.split!r} split (it has {', '.join(present)})")
        return 2
    model, processor = load_clip(ckpt, "cpu")
    model.to(pick_device(args.device))
    data = build_clip_data(rows, processor, root=meta["root"])
    if data.skipped:
        print(
            f"evaluate: {len(data.skipped)} {args.split} image(s) unreadable, left out: {sorted(data.skipped)[:5]}"
        )
    metrics = evaluate_global(model, data, processor, text_mode)
    metrics.update(evaluate_local(model, data, processor))
    epoch = _epoch_of(ckpt)
    metrics["evaluated"] = {
        "run": str(run),
        "checkpoint": ckpt.name,
        "epoch": epoch,
        "split": args.split,
        "manifest": str(manifest_path),
        "skipped_images": data.skipped,
    }
    out = run / "eval" / f"{args.split}-{args.checkpoint}-{text_mode}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(metrics, indent=2, sort_keys=True))
    where = f"{ckpt.name}" + (f" (epoch {epoch})" if epoch is not None else "")
    print(f"{args.split}, {where}, {text_mode}: {metrics_line(metrics)}  → {out}")
    return 0


def _epoch_of(ckpt: Path) -> int | None:
    """The epoch a checkpoint holds: best.json for checkpoint-best, trainer_state.pt's for the last."""
    if (ckpt / "best.json").is_file():
        return json.loads((ckpt / "best.json").read_text()).get("epoch")
    if (ckpt / "trainer_state.pt").is_file():
        import torch

        return int(torch.load(ckpt / "trainer_state.pt", weights_only=False, map_location="cpu")["epoch"])
    return None


if __name__ == "__main__":
    sys.exit(main())
