"""The training methods side by side: every method alone and with `--local rsm`, clean and under injected
caption-unit noise, mean ± sd over training seeds, on a held-out synthetic benchmark.

Consumes the demo's tiny CLIP (`outputs/demo/models/tiny-clip`, made by `python -m flows.demo`, with the
reference bank and reliability calibrator beside it) and nothing else; produces, under `--out`:

    seed<S>-<ids>x<images>/                 the held-out benchmark (storage.synth) and its manifest
    seed<S>-<ids>x<images>/clip-<fp>/shards the benchmark mined with that CLIP (flows.mine_rsm --no-prefect)
        .../manifest-noise<F>.parquet, shards-noise<F>   the same with F of the train units shuffled
        .../runs/<method>-<row>-seed<s>/    one `python -m miners.train_rogle` run folder per table cell

a dated section of `--results` (bench/RESULTS.md: machine, command, settings, the table) and `--json`
(bench/methods.json: settings and every run's raw figures).

    python bench/methods.py [--methods rogle irra park scmm ivt] [--seeds 0 1 2] [--epochs N]
        [--batch-size B] [--noise 0.3] [--identities N] [--bench-seed 13] [--clip-model DIR] [--tiny]

Seeds, so that no figure is measured on data anything was fitted on: the demo generates its benchmark with
seed 0 (the tiny CLIP is bootstrapped on its train split, the demo mines and trains on it) and its
calibration set with seed 1000 (the calibrator is fitted there); bench/rsm_quality.py and
bench/content_reliability.py measure on seed 7. This table uses `--bench-seed` 13 by default: its train
split trains every method, its test split evaluates them.

Rows, per method: "alone" (`--local none`), "+ rsm" (`--local rsm`, reliability-weighted), and on the
noisy benchmark "+ rsm, noisy pairs, reliability on" and "… reliability off" (`--no-reliability`). The
noise is injected before mining (`bench/train_ablation.noisy_pairs`, the ablation's own helper): a
fraction of the train captions' text units is replaced by other people's, and the noisy manifest is mined
with the same CLIP and calibrator, so each injected pair carries the reliability the RSM gives it. The
noise draw is fixed (seed 0) across training seeds: the seeds vary training, not the data.

Every run is one argv template (`train_argv`): the same start model, epochs, batch size and evaluation;
only the method, the local-branch flags, the data (clean or noisy) and the seed differ, and the image size
is the start model's. After training the script checks each run's saved config against the template.
Finished runs are reused when they were made by the same argv (`bench_argv.json` in the run folder).

Columns: test text→image R1, R5, mAP, mINP, long-query R1 (captions of >= 5 sentences), local grounding
accuracy (sentence→region on ground-truth regions), train seconds (the sum of the epochs' `epoch_seconds`:
training only, no data loading or evaluation). Each is mean ± sd over the seeds; sd is the sample standard
deviation (ddof 1, the project's own choice; "—" with one seed).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

# Defaults sized so the whole table (5 methods x 4 rows x 3 seeds = 60 runs) takes about 30–40 minutes on
# a 2-core CPU: measured (2026-12-04, rogle and irra, seed 0, the 2 cores shared with other jobs) 24–153 s
# wall per run, 6 min of CPU for 8 runs with the benchmark's generation and its two minings (~1 min); a
# quiet machine does a run in ~30 s. --tiny is the test's: seconds per run
FULL = {"identities": 100, "images_per_id": 2, "epochs": 2, "batch_size": 32, "seeds": [0, 1, 2]}
TINY = {"identities": 8, "images_per_id": 2, "epochs": 1, "batch_size": 8, "seeds": [0]}
ALL_METHODS = ["rogle", "irra", "park", "scmm", "ivt"]
DEFAULT_CLIP = Path("outputs/demo/models/tiny-clip")

# (row label, data: clean | noisy, train_rogle flags); ROW_SLUGS name the run folders
ROWS = [
    ("alone", "clean", ["--local", "none"]),
    ("+ rsm", "clean", ["--local", "rsm"]),
    ("+ rsm, noisy pairs, reliability on", "noisy", ["--local", "rsm"]),
    ("+ rsm, noisy pairs, reliability off", "noisy", ["--local", "rsm", "--no-reliability"]),
]
ROW_SLUGS = {
    "alone": "alone",
    "+ rsm": "rsm",
    "+ rsm, noisy pairs, reliability on": "rsm-noisy-reliability-on",
    "+ rsm, noisy pairs, reliability off": "rsm-noisy-reliability-off",
}
# (figure key in a run's record, column heading)
COLUMNS = [
    ("R1", "R1"),
    ("R5", "R5"),
    ("mAP", "mAP"),
    ("mINP", "mINP"),
    ("long_R1", "long-query R1"),
    ("local_grounding_acc", "local grounding"),
    ("train_seconds", "train seconds"),
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python bench/methods.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", nargs="+", default=ALL_METHODS, help=f"default: {' '.join(ALL_METHODS)}")
    ap.add_argument("--seeds", type=int, nargs="+", help=f"training seeds (default {FULL['seeds']})")
    ap.add_argument("--epochs", type=int, help=f"every run's epochs (default {FULL['epochs']})")
    ap.add_argument("--batch-size", type=int, help=f"every run's batch size (default {FULL['batch_size']})")
    ap.add_argument("--noise", type=float, default=0.3, help="fraction of train text units shuffled (0.3)")
    ap.add_argument("--identities", type=int, help=f"held-out benchmark size (default {FULL['identities']})")
    ap.add_argument(
        "--images-per-id", type=int, help=f"images per identity (default {FULL['images_per_id']})"
    )
    ap.add_argument(
        "--bench-seed",
        type=int,
        default=13,
        help="synthetic seed of the held-out benchmark (not the demo's 0, the calibrator's 1000, or the "
        "other benches' 7)",
    )
    ap.add_argument(
        "--clip-model", type=Path, default=DEFAULT_CLIP, help=f"start model (default {DEFAULT_CLIP})"
    )
    ap.add_argument("--out", type=Path, default=Path("outputs/bench/methods"), help="work folder")
    ap.add_argument("--results", type=Path, default=Path("bench/RESULTS.md"))
    ap.add_argument("--json", type=Path, default=Path("bench/methods.json"), help="raw per-run figures")
    ap.add_argument("--tiny", action="store_true", help=f"tiny settings for the test: {TINY}")
    args = ap.parse_args(argv)
    sizes = TINY if args.tiny else FULL
    for name, value in sizes.items():  # a flag given wins over the size preset
        if getattr(args, name) is None:
            setattr(args, name, value)
    problems = [
        f"--{n.replace('_', '-')} must be >= 1" for n in sizes if n != "seeds" and getattr(args, n) < 1
    ]
    if not 0.0 < args.noise < 1.0:
        problems.append("--noise must lie in (0, 1): the noisy rows are part of the table")
    unknown = sorted(set(args.methods) - set(ALL_METHODS))
    if unknown:
        problems.append(f"--methods: unknown {', '.join(unknown)} (choose from {', '.join(ALL_METHODS)})")
    if len(set(args.methods)) != len(args.methods) or len(set(args.seeds)) != len(args.seeds):
        problems.append("--methods and --seeds must not repeat a value")
    if problems:
        ap.error("; ".join(problems))
    return args


def missing_methods(names: list[str]) -> dict[str, str]:
    """{method: why it cannot be built} for the methods whose module or class is not there (yet)."""
    from miners.training.methods import method_class

    missing = {}
    for name in names:
        try:
            method_class(name)
        except (ImportError, AttributeError) as exc:
            missing[name] = f"{type(exc).__name__}: {exc}"
    return missing


def held_out_benchmark(folder: Path, seed: int, identities: int, images_per_id: int) -> Path:
    """The manifest of the synthetic benchmark in `folder` (generated and imported once)."""
    from storage.manifest import main as manifest_main
    from storage.synth import generate

    data, manifest = folder / "data", folder / "manifest.parquet"
    if not manifest.is_file():
        generate(data, identities=identities, images_per_id=images_per_id, seed=seed, overwrite=data.exists())
        if manifest_main(["--format", "pvlg", "--root", str(data), "--out", str(manifest)]) != 0:
            raise SystemExit(f"manifest import failed for {data}")
    return manifest


def mine(manifest: Path, shards: Path, clip: Path) -> Path:
    """`shards` committed: the manifest mined with `clip` and the bank and calibrator beside it."""
    from flows.mine_rsm import main as mine_main

    if not (shards / "_SUCCESS").is_file():  # an unfinished run there is resumed by the flow
        argv = ["--manifest", str(manifest), "--out", str(shards), "--clip-model", str(clip), "--no-prefect"]
        if mine_main(argv) != 0:
            raise SystemExit(f"mining {manifest} failed")
    return shards


def train_argv(
    template: dict, method: str, flags: list[str], pairs: Path, manifest: Path, seed: int, run: Path
) -> list[str]:
    """The one argv every cell of the table trains with; `template` holds what is the same for all."""
    return [
        "--init", str(template["init"]),
        "--epochs", str(template["epochs"]),
        "--batch-size", str(template["batch_size"]),
        "--eval-every", str(template["epochs"]),  # one evaluation, after the last epoch
        "--log-every", "0",
        "--method", method,
        *flags,
        "--pairs", str(pairs),
        "--manifest", str(manifest),
        "--seed", str(seed),
        "--out", str(run),
    ]  # fmt: skip


# Every row is reported under one evaluation text mode, whatever mode the method trains with (rogle and irra
# train with sentence-pool under the tiny preset, park/scmm/ivt with truncate): the field's protocol (IRRA)
# truncates queries at 77 tokens. metrics.json has both modes; the JSON keeps both
EVAL_TEXT_MODE = "truncate"


def run_figures(run: Path, eval_mode: str = EVAL_TEXT_MODE) -> dict:
    """A finished run's figures: the test metrics (percent) under `eval_mode`, train seconds and the
    settings it ran with."""
    m = json.loads((run / "metrics.json").read_text())
    history = [json.loads(ln) for ln in (run / "history.jsonl").read_text().splitlines() if ln.strip()]
    cfg = json.loads((run / "config.json").read_text())
    lq = m.get("long_query") or {}
    mode = (m.get("text_modes") or {}).get(eval_mode)
    if mode is None:
        raise SystemExit(f"{run}/metrics.json has no {eval_mode!r} figures (text_modes)")
    return {
        "eval_text_mode": eval_mode,
        "R1": mode["R1"],
        "R5": mode["R5"],
        "mAP": mode["mAP"],
        "mINP": mode["mINP"],
        "long_R1": mode.get("long_query_R1"),
        "long_queries": lq.get("num_queries"),
        "local_grounding_acc": m.get("local_grounding_acc"),
        "local_sentences": m.get("local_sentences"),
        "num_queries": m.get("num_queries"),
        "num_gallery": m.get("num_gallery"),
        "text_mode": m.get("text_mode"),  # the mode the method trained with
        "text_modes": m.get("text_modes"),
        "train_seconds": sum(r["epoch_seconds"] for r in history if "epoch_seconds" in r),
        "epochs_run": sum(1 for r in history if "epoch_seconds" in r),
        "config": {
            k: cfg.get(k) for k in ("method", "local", "use_reliability", "epochs", "batch_size", "seed")
        },
        "init": json.loads((run / "run_args.json").read_text()).get("init_resolved"),
    }


def train_one(argv: list[str], run: Path) -> dict:
    """Train (or reuse the run folder made by the same argv) and return its figures."""
    from miners.train_rogle import main as train_main

    stamp = run / "bench_argv.json"
    finished = (run / "metrics.json").is_file() and json.loads((run / "metrics.json").read_text())
    if not (finished and stamp.is_file() and json.loads(stamp.read_text()) == argv):
        t0 = time.perf_counter()
        rc = train_main([*argv, "--overwrite"])  # a run of other settings, or left unfinished, starts again
        if rc != 0:
            raise SystemExit(f"training failed (rc {rc}): python -m miners.train_rogle {shlex.join(argv)}")
        (run / "wall_seconds.txt").write_text(f"{time.perf_counter() - t0:.1f}\n")
        stamp.write_text(json.dumps(argv))
    figures = run_figures(run)
    wall = run / "wall_seconds.txt"
    figures["wall_seconds"] = float(wall.read_text()) if wall.is_file() else None
    return figures


def check_template(record: dict, template: dict) -> None:
    """Refuse a table whose runs did not all train with the template's settings (a method's defaults or
    a config layer must never change epochs, batch size or the start model)."""
    cfg = record["config"]
    wrong = [
        f"{k} {cfg[k]!r} (template {template[k]!r})"
        for k in ("epochs", "batch_size")
        if cfg[k] != template[k]
    ]
    if Path(record["init"]).resolve() != Path(template["init"]).resolve():
        wrong.append(f"init {record['init']} (template {template['init']})")
    if record["epochs_run"] != template["epochs"]:
        wrong.append(f"{record['epochs_run']} epochs in history.jsonl")
    if cfg["method"] != record["method"] or cfg["seed"] != record["seed"]:
        wrong.append(f"method/seed {cfg['method']}/{cfg['seed']} in config.json")
    if wrong:
        raise SystemExit(f"run {record['run_dir']} broke the template: {'; '.join(wrong)}")


def summarize(values: list[float | None]) -> dict:
    """{mean, sd, n}: n counts the seeds with a figure; sd is the sample sd (None below two values)."""
    v = np.array([x for x in values if x is not None], dtype=float)
    return {
        "mean": float(v.mean()) if v.size else None,
        "sd": float(v.std(ddof=1)) if v.size > 1 else None,
        "n": int(v.size),
    }


def cell(s: dict, digits: int) -> str:
    if s["mean"] is None:
        return "—"
    sd = "—" if s["sd"] is None else f"{s['sd']:.{digits}f}"
    return f"{s['mean']:.{digits}f} ± {sd}"


def image_size(clip: Path) -> str:
    """The start model's input size, height x width pixels (every run trains at it)."""
    size = json.loads((clip / "processor_config.json").read_text())["image_processor"]["size"]
    return f"{size['height']}x{size['width']}" if "height" in size else json.dumps(size)


def machine_line() -> str:
    import torch
    from rsm_quality import machine  # bench/ is on sys.path when this file runs as a script

    if torch.cuda.is_available():
        return machine().replace("no GPU", torch.cuda.get_device_name(0))
    return machine()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    clip = args.clip_model
    if not (clip / "config.json").is_file():
        print(
            f"error: no start model at {clip}: every run starts from the demo's tiny CLIP; run "
            "`python -m flows.demo` first (make demo), or pass --clip-model DIR"
        )
        return 2
    missing = missing_methods(args.methods)
    if missing:  # honest tables only: a method asked for is trained, or the table is not written
        for name, why in missing.items():
            print(f"error: method {name} cannot be built ({why})")
        print("error: finish those methods, or pass --methods without them")
        return 2

    from train_ablation import noisy_pairs

    from miners.model_folder import model_fingerprint

    fingerprint = model_fingerprint(clip)
    bench_dir = args.out / f"seed{args.bench_seed}-{args.identities}x{args.images_per_id}"
    manifest = held_out_benchmark(bench_dir, args.bench_seed, args.identities, args.images_per_id)
    work = bench_dir / f"clip-{fingerprint}"  # mined pairs and runs belong to one start model
    clean_shards = mine(manifest, work / "shards", clip)
    noisy_shards, noisy_manifest, n_injected = noisy_pairs(clean_shards, work, args.noise)
    sources = {"clean": (clean_shards, manifest), "noisy": (noisy_shards, noisy_manifest)}
    template = {"init": str(clip.resolve()), "epochs": args.epochs, "batch_size": args.batch_size}

    records = []
    for method in args.methods:
        for row, data, flags in ROWS:
            pairs, rows_manifest = sources[data]
            for seed in args.seeds:
                run = work / "runs" / f"{method}-{ROW_SLUGS[row]}-seed{seed}"
                run_argv = train_argv(template, method, flags, pairs, rows_manifest, seed, run)
                record = {"method": method, "row": row, "data": data, "seed": seed, "run_dir": str(run)}
                record |= train_one(run_argv, run)
                record["argv"] = run_argv
                check_template(record, template)
                records.append(record)
                shown = {k: record[k] for k, _ in COLUMNS}
                print(f"[methods] {method} | {row} | seed {seed}: {json.dumps(shown)}", flush=True)

    table = []
    for method in args.methods:
        for row, _, _ in ROWS:
            runs = [r for r in records if r["method"] == method and r["row"] == row]
            entry = {"method": method, "row": row, "n": len(runs)}
            entry |= {key: summarize([r[key] for r in runs]) for key, _ in COLUMNS}
            table.append(entry)

    from storage.manifest import read_manifest

    rows_table, _ = read_manifest(manifest)
    splits = rows_table["split"].to_pylist()
    command = "python bench/methods.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    now = datetime.now(UTC)
    total_s = time.perf_counter() - t_start
    settings = {
        "methods": args.methods,
        "seeds": args.seeds,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "image_size": image_size(clip),
        "start_model": str(clip),
        "start_model_fingerprint": fingerprint,
        "bench_seed": args.bench_seed,
        "identities": args.identities,
        "images_per_id": args.images_per_id,
        "train_captions": splits.count("train"),
        "test_captions": splits.count("test"),
        "noise": args.noise,
        "noise_units_injected": n_injected,
        "argv_template": train_argv(
            template, "METHOD", ["LOCAL-FLAGS"], Path("PAIRS"), Path("MANIFEST"), 0, Path("RUN")
        ),
        "tiny": args.tiny,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "date": now.isoformat(timespec="seconds"),
                "machine": machine_line(),
                "command": command,
                "total_seconds": round(total_s, 1),
                "settings": settings,
                "table": table,
                "runs": records,
            },
            indent=2,
        )
        + "\n"
    )
    section = results_section(now, command, settings, table, records, total_s)
    print(section)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    with args.results.open("a") as fh:
        fh.write(section)
    return 0


def results_section(
    now: datetime, command: str, settings: dict, table: list[dict], records: list[dict], total_s: float
) -> str:
    s = settings
    per_run = [r["wall_seconds"] for r in records if r.get("wall_seconds") is not None]
    text_modes = {}
    for r in records:
        text_modes.setdefault(r["method"], set()).add(str(r["text_mode"]))
    modes = ", ".join(f"{m} {'/'.join(sorted(v))}" for m, v in text_modes.items())
    lines = [
        "",
        f"## Training methods compared ({now.date().isoformat()}{', tiny mode' if s['tiny'] else ''})",
        "",
        f"Machine: {machine_line()}. Command: `{command}`. Held-out synthetic benchmark: seed {s['bench_seed']} "
        f"(the demo's CLIP was bootstrapped on seed 0, its calibrator fitted on seed 1000), "
        f"{s['identities']} identities × {s['images_per_id']} images, {s['train_captions']} train / "
        f"{s['test_captions']} test captions; mined with the start model's bank and calibrator "
        f"(`flows.mine_rsm --no-prefect`). Every run: `python -m miners.train_rogle` from `{s['start_model']}` "
        f"(fingerprint {s['start_model_fingerprint']}), {s['epochs']} epoch(s), batch {s['batch_size']}, "
        f"images {s['image_size']} px, each method's own losses; seeds {s['seeds']}, mean ± sd (sample sd) "
        f"over seeds, n = runs. Noisy rows: {s['noise']:.0%} of the train captions' text units "
        f"({s['noise_units_injected']}) replaced by another person's before mining; reliability on = "
        "pairs weighted by the RSM's reliability, off = `--no-reliability`. Test split text→image R1, R5, mAP, "
        "mINP (%); long-query R1 on captions of ≥ 5 sentences; local grounding = sentence→region accuracy on "
        "ground-truth regions (%); train seconds = the sum of the epochs' training time. Every row is "
        f"evaluated with queries truncated at 77 tokens ({EVAL_TEXT_MODE}, the field's protocol); the methods "
        f"train in their own text mode ({modes}); bench/methods.json has both evaluation modes. "
        f"Whole table: {total_s / 60:.1f} min"
        + (f" ({np.mean(per_run):.0f} s per run trained here)." if per_run else " (every run reused)."),
        "",
        "| method | variant | n | " + " | ".join(h for _, h in COLUMNS) + " |",
        "| --- | --- | --- | " + " | ".join("---" for _ in COLUMNS) + " |",
    ]
    for e in table:
        cells = [cell(e[key], 1) for key, _ in COLUMNS]
        lines.append(f"| {e['method']} | {e['row']} | {e['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
