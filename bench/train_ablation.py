"""ROGLE ablation: global-only vs global+local vs global+local without reliability, with and without
injected noise, mean ± std over seeds.

Noise is injected *before mining*: a known fraction of the train captions' sentences are replaced by
sentences of other people (`miners.caption_noise.shuffle_caption_units`), the noisy manifest is mined with the
same CLIP and calibrator (`flows.mine_rsm --no-prefect`), and training reads those pairs — so each
injected pair carries the reliability the RSM itself gives it, which is what weighting is tested on.

    python bench/train_ablation.py --pairs outputs/demo/shards [--seeds 0 1 2] [--epochs 2] [--noise 0.3]

Each run is `python -m miners.train_rogle` (in-process) into outputs/bench/ablation/<run>/; finished runs
are reused. Appends a markdown table with date, machine and command to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from rsm_quality import machine  # bench/ is on sys.path when this file runs as a script

from flows.mine_rsm import main as mine_main
from miners.caption_noise import shuffle_caption_units
from miners.run_config import read_run_config
from miners.train_rogle import main as train_main
from storage.manifest import read_manifest
from storage.shards import load_run_plan

VARIANTS = {
    "global-only": ["--no-local"],
    "global+local": [],
    "global+local, no reliability": ["--no-reliability"],
}
KEYS = ("R1", "mAP", "long_R1", "local_grounding_acc")


def noisy_pairs(clean_pairs: Path, out: Path, fraction: float, seed: int = 0) -> tuple[Path, Path, int]:
    """(shards, manifest, injected units): the clean run's manifest with `fraction` of its train units
    shuffled across people, mined with the clean run's CLIP and settings."""
    plan = load_run_plan(clean_pairs)
    manifest, _ = read_manifest(plan.manifest_path)
    noisy_manifest = out / f"manifest-noise{fraction}.parquet"
    shards = out / f"shards-noise{fraction}"
    noisy, injected = shuffle_caption_units(manifest, fraction, seed)
    if not noisy_manifest.is_file():
        out.mkdir(parents=True, exist_ok=True)
        pq.write_table(noisy, noisy_manifest)  # keeps the schema metadata, rsm.root included
    if not (shards / "_SUCCESS").is_file():
        cfg = read_run_config(clean_pairs).rsm
        argv = ["--manifest", str(noisy_manifest), "--out", str(shards), "--clip-model", cfg.clip_model]
        argv += ["--proposer", cfg.proposer, "--crop-mode", cfg.crop_mode, "--no-prefect"]
        if mine_main(argv):
            raise SystemExit("mining the noisy manifest failed")
    return shards, noisy_manifest, len(injected)


def run_one(pairs: Path, manifest: Path | None, out: Path, flags: list[str], seed: int, epochs: int) -> dict:
    metrics_path = out / "metrics.json"
    if not metrics_path.is_file() or not json.loads(metrics_path.read_text()):
        argv = ["--pairs", str(pairs), "--out", str(out), "--epochs", str(epochs), "--seed", str(seed)]
        argv += ["--eval-every", str(epochs), "--overwrite", *flags]  # a run left unfinished starts again
        if manifest is not None:
            argv += ["--manifest", str(manifest)]
        t0 = time.perf_counter()
        if train_main(argv) != 0:
            raise SystemExit(f"training failed: {argv}")
        (out / "wall_seconds.txt").write_text(f"{time.perf_counter() - t0:.1f}\n")
    m = json.loads(metrics_path.read_text())
    return {
        "R1": m["R1"],
        "mAP": m["mAP"],
        "long_R1": m["long_query"].get("R1", float("nan")),
        "local_grounding_acc": m.get("local_grounding_acc") or float("nan"),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=Path, default=Path("outputs/demo/shards"))
    ap.add_argument("--out", type=Path, default=Path("outputs/bench/ablation"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--noise", type=float, default=0.3)
    ap.add_argument("--results", type=Path, default=Path("bench/RESULTS.md"))
    args = ap.parse_args(argv)

    table: dict[tuple[str, float], list[dict]] = {}
    sources: dict[float, tuple[Path, Path | None]] = {0.0: (args.pairs, None)}
    n_injected = 0
    if args.noise > 0:
        shards, manifest, n_injected = noisy_pairs(args.pairs, args.out, args.noise)
        sources[args.noise] = (shards, manifest)
    for noise, (pairs, manifest) in sources.items():
        for name, flags in VARIANTS.items():
            if noise > 0 and name == "global-only":
                continue  # the question under noise is how the local branch copes with it
            for seed in args.seeds:
                slug = name.replace(" ", "").replace(",", "-").replace("+", "plus")
                tag = f"{slug}-noise{noise}-seed{seed}"
                m = run_one(pairs, manifest, args.out / tag, flags, seed, args.epochs)
                table.setdefault((name, noise), []).append(m)
                print(tag, json.dumps(m), flush=True)

    command = "python bench/train_ablation.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    lines = [
        "",
        f"## ROGLE training ablation ({date.today().isoformat()})",
        "",
        f"Machine: {machine()}. Command: `{command}`. Pairs: `{args.pairs}` (train split), initialised from the "
        f"mining run's CLIP (`{read_run_config(args.pairs).rsm.clip_model}`), {args.epochs} epochs, seeds {args.seeds}; mean ± std over seeds. Test split "
        "text→image retrieval (R1, mAP), long queries (≥ 5 sentences) R1, and sentence→region grounding "
        f"accuracy on ground-truth regions. Injected noise: {args.noise:.0%} of the train captions' text units "
        f"({n_injected}) replaced by another person's before mining; the noisy runs train on those captions "
        "and their mined pairs.",
        "",
        "| variant | injected noise | R1 | mAP | long-query R1 | local grounding acc |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for (name, noise), runs in table.items():
        cells = []
        for k in KEYS:
            v = np.array([r[k] for r in runs], dtype=float)
            cells.append(f"{np.nanmean(v):.1f} ± {np.nanstd(v):.1f}")
        lines.append(f"| {name} | {noise:.0%} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    with args.results.open("a") as fh:
        fh.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
