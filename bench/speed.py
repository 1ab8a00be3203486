"""Speed and scale of mining, measured as a user runs it; writes bench/results.json and a dated section of
bench/RESULTS.md ("## Speed and scale").

    python bench/speed.py [--clip-model DIR] [--images 2048] [--naive-images 1000]
        [--real-images 1000,3000,10000] [--scale-rows 10000,100000,1000000] [--work DIR] [--quick]

Data: the synthetic benchmark at seed 23 (used for no fitting anywhere), 256 x 128 images, 2 captions
each. Model: --clip-model (default the demo's bootstrapped tiny CLIP, outputs/demo/models/tiny-clip,
with its bank and calibrator); without one, an untrained tiny CLIP of the same shape is built (speed
does not depend on the weights; the results say which was used). Every mining figure is the wall time
of a whole command in a fresh process (start to exit), as a user runs it:

- `speedup_vs_naive`: bench/naive_loop.py (one CLIP call per crop and per text, no batching, no text
  de-duplication, the same models and outputs) ÷ `python -m flows.mine_rsm --no-prefect` on the same
  `--naive-images` images; the outputs are compared (same pairs, reliability within float noise).
- `orchestration_overhead`: (flow with 1 Ray worker − the library alone) / the library alone, on the
  same `--images` images; the library alone is `RSMMiner.mine` over the same shards in one process
  with the worker's thread count, writing the same Parquet (this file's `--library-run`).
- `scaling_2_workers`: the flow's fan-out images/s with 2 workers ÷ with 1.
- `driver_scale`: planning, then per-shard dispatch (slice the sorted manifest) + commit of a tiny
  worker's output, at 10k / 100k / 1M manifest rows, each in a fresh process (peak RSS of it).
- `real_scale`: the flow (2 workers) at 1k / 3k / 10k real images: images/s, ms per image, peak RSS
  per worker (from the shards' stats files).
- `stage_profile`: where the 2-worker run's time went (the summary's stage seconds).
- `prior_ms_per_image`: the `prior` proposer alone, in-process, on 400 of the images.
- `startup_s`: seconds from the process start of `python -m flows.mine_rsm` (the default path: Prefect's
  temporary API server, a local Ray) to its first shard sent to a loaded worker, median of
  `--startup-reps` runs on a warm PREFECT_HOME of the bench's own; `startup_parts` the phases of that run
  (the CLI's "start-up" line: driver = imports + preflight, ray, prefect, first_shard, each in seconds
  since the start); `startup_s_fresh_home` the same on an empty PREFECT_HOME (its first server start
  migrates a new database) and `startup_s_no_prefect` with `--no-prefect`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from flows.env import apply_offline_defaults  # noqa: E402

apply_offline_defaults()

from qa_scale import _manifest, peak_rss_mb  # noqa: E402  (bench/qa_scale.py: synthetic manifest, VmHWM)

from storage.plan import plan_shards, read_sorted_manifest  # noqa: E402

SEED = 23  # held out: no model, calibrator or threshold was fitted on it
DEMO_CLIP = ROOT / "outputs/demo/models/tiny-clip"
HEADING = "## Speed and scale"
GOALS = {
    "speedup_vs_naive": ">= 10",
    "orchestration_overhead": "<= 0.10",
    "scaling_2_workers": ">= 1.7",
    "driver_ms_per_shard_at_1M": "<= 5",
    "plan_s_at_1M": "<= 30",
    "prior_ms_per_image": "<= 2",
    "startup_s": "<= 8",
}
ENV = os.environ | {"PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}


def log(msg: str) -> None:
    print(f"[speed {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def timed(cmd: list[str], what: str) -> tuple[float, str]:
    """Wall seconds of `cmd` from process start to exit, and its stdout (it must succeed)."""
    log(f"{what}: {' '.join(cmd)}")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{what} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    log(f"{what}: {wall:.1f} s")
    return wall, proc.stdout


# ---------------------------------------------------------------------------------------------- data


def dataset(work: Path, n_images: int) -> Path:
    """The held-out synthetic set with at least n_images images and its manifest (reused)."""
    root = work / f"synth-{SEED}-{n_images}"
    manifest = root / "manifest.parquet"
    if not manifest.is_file():
        per_id = 4
        subprocess.run(
            [sys.executable, "-m", "storage.synth", "--out", str(root), "--identities",
             str(-(-n_images // per_id)), "--images-per-id", str(per_id), "--seed", str(SEED), "--overwrite"],
            check=True, env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        subprocess.run(
            [sys.executable, "-m", "storage.manifest", "--format", "pvlg", "--root", str(root), "--out",
             str(manifest)],
            check=True, env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL,
        )  # fmt: skip
    return manifest


def first_images(manifest: Path, n_images: int, out: Path) -> Path:
    """A manifest of the first n_images images (plan order) of `manifest`, metadata kept."""
    if out.is_file():
        return out
    table = read_sorted_manifest(manifest)
    keep = pa.array(list(dict.fromkeys(table["image_id"].to_pylist()))[:n_images])
    pq.write_table(table.filter(pc.is_in(table["image_id"], value_set=keep)), out)
    return out


def clip_model(arg: str | None, manifest: Path, work: Path) -> tuple[Path, str]:
    if arg:
        return Path(arg), f"given ({arg})"
    if (DEMO_CLIP / "config.json").is_file():
        return DEMO_CLIP, "the demo's bootstrapped tiny CLIP (with its bank and calibrator)"
    out = work / "untrained-tiny-clip"
    if not (out / "config.json").is_file():
        from miners.training.tiny_clip import TinyClipConfig, build_model, build_processor, build_tokenizer

        cfg = TinyClipConfig()
        tokenizer = build_tokenizer(pq.read_table(manifest, columns=["caption"])["caption"].to_pylist(), cfg)
        build_model(len(tokenizer), cfg, seed=0).save_pretrained(out)
        build_processor(tokenizer, cfg).save_pretrained(out)
    return out, "an untrained tiny CLIP of the demo's shape (no demo run here; speed does not need weights)"


# ---------------------------------------------------------------------------------------------- runs


def flow_run(manifest: Path, clip: Path, out: Path, workers: int, what: str) -> dict:
    """`python -m flows.mine_rsm --no-prefect` from scratch: wall, fan-out images/s, stages, RSS."""
    subprocess.run(["rm", "-rf", str(out)], check=True)
    cmd = [sys.executable, "-m", "flows.mine_rsm", "--manifest", str(manifest), "--out", str(out),
           "--clip-model", str(clip), "--no-prefect", "--max-workers", str(workers)]  # fmt: skip
    wall, stdout = timed(cmd, what)
    match = re.search(r"([\d.]+) images/s", stdout)
    stats = [json.loads(p.read_text()) for p in sorted(out.glob("*.stats.json"))]
    stages: dict[str, float] = {}
    for s in stats:
        for k, v in s["worker"]["stage_s"].items():
            stages[k] = stages.get(k, 0.0) + v
        stages["write"] = stages.get("write", 0.0) + s["commit_s"]
    n_images = sum(s["worker"]["n_images"] for s in stats)
    return {
        "command": " ".join(["python", *cmd[1:]]),
        "wall_s": round(wall, 2),
        "images": n_images,
        "fanout_images_per_s": float(match.group(1)) if match else None,
        "images_per_s_end_to_end": round(n_images / wall, 2),
        "stage_s": {k: round(v, 3) for k, v in stages.items()},
        "worker_peak_rss_mb": max((s["worker"].get("peak_rss_mb", 0.0) for s in stats), default=None),
        "shards": len(stats),
    }


STARTUP_LINE = re.compile(
    r"^start-up ([\d.]+) s to the first shard \(seconds since the command started: (.*)\)$"
)


def startup_run(manifest: Path, clip: Path, out: Path, prefect_home: Path, *extra: str) -> dict:
    """One mining command in a fresh process, its start-up phases from the line it prints."""
    subprocess.run(["rm", "-rf", str(out)], check=True)
    cmd = [sys.executable, "-m", "flows.mine_rsm", "--manifest", str(manifest), "--out", str(out),
           "--clip-model", str(clip), *extra]  # fmt: skip
    env = {k: v for k, v in ENV.items() if k != "PREFECT_API_URL"} | {"PREFECT_HOME": str(prefect_home)}
    log(f"start-up ({' '.join(extra) or 'default'}; PREFECT_HOME {prefect_home}): {' '.join(cmd)}")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"start-up run failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    match = next(filter(None, map(STARTUP_LINE.match, proc.stdout.splitlines())), None)
    if match is None:
        raise SystemExit(f"no start-up line in:\n{proc.stdout}")
    parts = {k: float(v) for k, v in (item.rsplit(" ", 1) for item in match.group(2).split(", "))}
    return {"startup_s": float(match.group(1)), "parts": parts, "wall_s": round(wall, 2)}


def startup_figures(manifest: Path, clip: Path, work: Path, reps: int) -> dict:
    """startup_s (median of `reps` default runs, warm PREFECT_HOME), its parts, and the fresh-home and
    --no-prefect variants."""
    home = work / "prefect-home-warm"
    fresh = work / "prefect-home-fresh"
    subprocess.run(["rm", "-rf", str(fresh)], check=True)
    fresh_run = startup_run(manifest, clip, work / "startup-out", fresh)  # an empty PREFECT_HOME of its own
    startup_run(manifest, clip, work / "startup-out", home)  # a first run migrates the warm home's database
    runs = sorted((startup_run(manifest, clip, work / "startup-out", home) for _ in range(reps)),
                  key=lambda r: r["startup_s"])  # fmt: skip
    median = runs[len(runs) // 2]
    no_prefect = startup_run(manifest, clip, work / "startup-out", home, "--no-prefect")
    return {
        "startup_s": median["startup_s"],
        "startup_parts": median["parts"],
        "startup_runs_s": [r["startup_s"] for r in runs],
        "startup_s_fresh_home": fresh_run["startup_s"],
        "startup_parts_fresh_home": fresh_run["parts"],
        "startup_s_no_prefect": no_prefect["startup_s"],
        "startup_parts_no_prefect": no_prefect["parts"],
    }


def library_run(manifest: str, clip: str, out: str) -> int:
    """The library alone, as `--library-run`: RSMMiner.mine over the flow's shards, one process, one
    torch thread (what one Ray actor gets), each shard's tables written as Parquet."""
    import torch

    from miners.rsm import RSMConfig, RSMMiner
    from miners.run_config import run_config_for

    torch.set_num_threads(1)
    cfg = RSMConfig(clip_model=clip)
    plan = plan_shards(manifest, 256, run_config_for(cfg).to_dict())
    table = read_sorted_manifest(manifest)
    miner = RSMMiner(cfg)
    Path(out).mkdir(parents=True, exist_ok=True)
    root = plan.manifest_root
    for spec in plan.shards:
        result = miner.mine(plan.rows_for(spec.shard_id, table), root)
        pq.write_table(result.pairs, Path(out) / f"pairs-{spec.shard_id:05d}.parquet")
        pq.write_table(result.status, Path(out) / f"status-{spec.shard_id:05d}.parquet")
    return 0


def compare_outputs(naive: Path, flow_out: Path) -> dict:
    """Do the naive loop and the flow give the same pairs? (keys, chosen region, reliability, kept)"""
    import polars as pl

    from storage.reader import read_pairs

    cols = ["sample_id", "sentence_index", "region_id", "reliability", "kept"]
    a = pl.from_arrow(pq.read_table(naive, columns=cols))
    b = pl.from_arrow(read_pairs(flow_out).select(cols))
    joined = a.join(b, on=["sample_id", "sentence_index"], how="inner", suffix="_flow")
    out = {"pairs_naive": a.height, "pairs_flow": b.height, "pairs_in_both": joined.height}
    if joined.height:
        out["same_region"] = round(float((joined["region_id"] == joined["region_id_flow"]).mean()), 4)
        out["same_kept"] = round(float((joined["kept"] == joined["kept_flow"]).mean()), 4)
        diff = (joined["reliability"] - joined["reliability_flow"]).abs().max()
        out["max_abs_reliability_diff"] = float(f"{diff:.3g}")
    return out


def prior_ms_per_image(manifest: Path, n: int = 400) -> float:
    from miners.images import load_rgb
    from miners.regions.prior import PriorProposer

    table = read_sorted_manifest(manifest)
    root = Path(table.schema.metadata[b"rsm.root"].decode())
    paths = list(dict.fromkeys(table["image_path"].to_pylist()))[:n]
    images = [load_rgb(root / p) for p in paths]
    proposer = PriorProposer()
    t0 = time.perf_counter()
    for image in images:
        proposer.propose(image)
    return round(1000 * (time.perf_counter() - t0) / len(images), 3)


# ---------------------------------------------------------------------------------------------- driver scale


def driver_scale_run(n_rows: int, work: str, sample_shards: int) -> int:
    """As `--driver-scale-run`: plan a synthetic manifest of n_rows, then dispatch + commit
    `sample_shards` shards spread over it with a tiny worker's output; prints one JSON line."""
    from storage.schemas import PAIRS_SCHEMA, STATUS_SCHEMA
    from storage.shards import begin_run, commit_shard

    work_dir = Path(work)
    work_dir.mkdir(parents=True, exist_ok=True)
    manifest = _manifest(work_dir / f"manifest-{n_rows}.parquet", n_rows)
    rss_before = peak_rss_mb()
    t0 = time.perf_counter()
    plan = plan_shards(manifest, 256, {"bench": "driver_scale"})
    plan_s = time.perf_counter() - t0
    out = work_dir / f"run-{n_rows}"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    t0 = time.perf_counter()
    begin_run(out, plan)
    begin_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    sorted_table = read_sorted_manifest(plan.manifest_path)
    read_sort_s = time.perf_counter() - t0
    picks = np.unique(np.linspace(0, len(plan.shards) - 1, min(sample_shards, len(plan.shards))).astype(int))
    dispatch, commit = [], []
    for sid in picks.tolist():
        t = time.perf_counter()
        rows = plan.rows_for(sid, sorted_table)
        t_mid = time.perf_counter()
        status = pa.table(
            {
                "sample_id": rows["sample_id"],
                "image_id": rows["image_id"],
                "status": pa.array(["ok"] * rows.num_rows),
                "error_message": pa.nulls(rows.num_rows, pa.string()),
                **{k: pa.array(np.zeros(rows.num_rows, np.int32)) for k in
                   ("n_regions", "n_sentences", "n_pairs", "n_kept")},
            }
        ).cast(STATUS_SCHEMA)  # fmt: skip
        commit_shard(out, plan, sid, PAIRS_SCHEMA.empty_table(), status, stats={"bench": True})
        dispatch.append(t_mid - t)
        commit.append(time.perf_counter() - t_mid)
    print(
        json.dumps(
            {
                "rows": n_rows,
                "shards": len(plan.shards),
                "plan_s": round(plan_s, 2),
                "begin_run_s": round(begin_s, 2),
                "read_and_sort_once_s": round(read_sort_s, 2),
                "sampled_shards": len(picks),
                "dispatch_ms_per_shard": round(1000 * float(np.median(dispatch)), 3),
                "commit_ms_per_shard": round(1000 * float(np.median(commit)), 3),
                "driver_ms_per_shard": round(1000 * float(np.median(np.add(dispatch, commit))), 3),
                "driver_ms_per_shard_p95": round(
                    1000 * float(np.percentile(np.add(dispatch, commit), 95)), 3
                ),
                "driver_peak_rss_mb": round(peak_rss_mb(), 1),
                "rss_before_plan_mb": round(rss_before, 1),
            }
        )
    )
    return 0


# ---------------------------------------------------------------------------------------------- report


def machine() -> str:
    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
         if ln.startswith("model name")), platform.processor(),
    )  # fmt: skip
    return f"{os.cpu_count()}-core CPU ({cpu}), no GPU, Python {platform.python_version()}"


def markdown(r: dict) -> str:
    rs = r["real_scale"]
    ds = r["driver_scale"]
    sp = r["stage_profile"]
    total = sum(sp["stage_s"].values()) or 1.0
    lines = [
        f"\n{HEADING} ({r['date']})\n",
        f"Machine: {r['machine']}. Command: `{r['command']}`. Model: {r['clip_model']}. Data: synthetic seed "
        f"{SEED} (held out). Every mining figure is a whole command's wall time in a fresh process. Load "
        f"average at the start: {r.get('load_average_at_start')}.\n",
        "| figure | value | goal |\n| --- | --- | --- |",
        f"| speedup_vs_naive ({r['naive']['images']} images: naive {r['naive']['naive_wall_s']} s (by torch "
        f"threads: {r['naive'].get('naive_wall_s_by_threads')}), flow "
        f"{r['naive']['flow_wall_s']} s) | {r['speedup_vs_naive']} | {GOALS['speedup_vs_naive']} |",
        f"| orchestration_overhead ({r['overhead']['images']} images: flow 1 worker "
        f"{r['overhead']['flow_wall_s']} s, library {r['overhead']['library_wall_s']} s) | "
        f"{r['orchestration_overhead']} | {GOALS['orchestration_overhead']} |",
        f"| scaling_2_workers (fan-out images/s {r['scaling']['images_per_s_2']} / "
        f"{r['scaling']['images_per_s_1']}) | {r['scaling_2_workers']} | {GOALS['scaling_2_workers']} |",
        f"| prior proposer, ms / image | {r['prior_ms_per_image']} | {GOALS['prior_ms_per_image']} |",
        f"| startup_s (default command, warm PREFECT_HOME, median of {len(r['startup_runs_s'])}: "
        f"{r['startup_runs_s']}; phases {r['startup_parts']}) | {r['startup_s']} | {GOALS['startup_s']} |",
        f"| start-up on an empty PREFECT_HOME (phases {r['startup_parts_fresh_home']}) | "
        f"{r['startup_s_fresh_home']} | |",
        f"| start-up with --no-prefect (phases {r['startup_parts_no_prefect']}) | {r['startup_s_no_prefect']} | |",
        "",
        f"Naive vs flow outputs: {json.dumps(r['naive']['outputs'])}.\n",
        "Driver (plan once; per shard: slice the sorted manifest + commit a tiny worker's output; "
        "median over sampled shards):\n",
        "| manifest rows | shards | plan s | driver ms / shard (p95) | dispatch ms | commit ms | peak RSS MiB |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        *[
            f"| {d['rows']:,} | {d['shards']:,} | {d['plan_s']} | {d['driver_ms_per_shard']} "
            f"({d['driver_ms_per_shard_p95']}) | {d['dispatch_ms_per_shard']} | {d['commit_ms_per_shard']} | "
            f"{d['driver_peak_rss_mb']} |"
            for d in ds
        ],
        "",
        "Real images (flow, 2 workers):\n",
        "| images | wall s | fan-out images/s | ms / image (wall) | peak RSS per worker MiB |",
        "| --- | --- | --- | --- | --- |",
        *[
            f"| {x['images']:,} | {x['wall_s']} | {x['fanout_images_per_s']} | "
            f"{round(1000 * x['wall_s'] / max(1, x['images']), 2)} | {x['worker_peak_rss_mb']} |"
            for x in rs
        ],
        "",
        f"Stage profile ({sp['images']} images, 2 workers, seconds summed over shards):\n",
        "| stage | s | share | ms / image |\n| --- | --- | --- | --- |",
        *[
            f"| {k} | {v:.2f} | {100 * v / total:.0f}% | {1000 * v / max(1, sp['images']):.2f} |"
            for k, v in sp["stage_s"].items()
        ],
        "",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clip-model", default=None)
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--naive-images", type=int, default=1000)
    ap.add_argument("--real-images", default="1000,3000,10000")
    ap.add_argument("--scale-rows", default="10000,100000,1000000")
    ap.add_argument("--sample-shards", type=int, default=200)
    ap.add_argument("--work", default="outputs/bench-speed")
    ap.add_argument("--results", default=str(BENCH / "results.json"))
    ap.add_argument("--markdown", default=str(BENCH / "RESULTS.md"))
    ap.add_argument("--startup-reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks the script, figures mean little")
    ap.add_argument("--library-run", nargs=3, metavar=("MANIFEST", "CLIP", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--driver-scale-run", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.library_run:
        return library_run(*args.library_run)
    if args.driver_scale_run:
        return driver_scale_run(args.driver_scale_run, args.work, args.sample_shards)
    if args.quick:
        args.images, args.naive_images, args.real_images, args.scale_rows = 64, 8, "32,64", "2000,10000"
        args.sample_shards = 20

    work = (ROOT / args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    real_sizes = [int(x) for x in args.real_images.split(",")]
    manifest_all = dataset(work, max([args.images, args.naive_images, *real_sizes]))
    clip, clip_what = clip_model(args.clip_model, manifest_all, work)
    subset = {n: first_images(manifest_all, n, work / f"manifest-{n}.parquet") for n in
              sorted({args.images, args.naive_images, *real_sizes})}  # fmt: skip

    results: dict = {
        "date": date.today().isoformat(),
        "machine": machine(),
        "command": "python bench/speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "clip_model": clip_what,
        "goals": GOALS,
        # Other work on the machine skews every figure here; this says how busy it was at the start
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    results["prior_ms_per_image"] = prior_ms_per_image(manifest_all)
    # start-up of one command: the smallest subset (start-up does not depend on the images behind it)
    results |= startup_figures(subset[min(subset)], clip, work, args.startup_reps)

    # speedup_vs_naive: the same images through both whole commands
    # The naive loop at 1 and at 2 torch threads (2 is torch's default here, 1 avoids OpenMP barriers on
    # single-crop forwards): the faster one is the baseline, so the speedup is not flattered by either
    naive_pairs = work / "naive-pairs.parquet"
    naive_by_threads = {}
    for threads in (1, 2):
        naive_cmd = [sys.executable, str(BENCH / "naive_loop.py"), "--manifest", str(subset[args.naive_images]),
                     "--clip-model", str(clip), "--out", str(naive_pairs), "--threads", str(threads)]  # fmt: skip
        naive_by_threads[threads], _ = timed(naive_cmd, f"naive loop, {threads} thread(s)")
    naive_wall = min(naive_by_threads.values())
    flow_small = flow_run(
        subset[args.naive_images], clip, work / "flow-naive-set", 2, "flow on the naive set"
    )
    results["naive"] = {
        "images": args.naive_images,
        "naive_wall_s": round(naive_wall, 2),
        "naive_wall_s_by_threads": {str(k): round(v, 2) for k, v in naive_by_threads.items()},
        "flow_wall_s": flow_small["wall_s"],
        "outputs": compare_outputs(naive_pairs, work / "flow-naive-set"),
    }
    results["speedup_vs_naive"] = round(naive_wall / flow_small["wall_s"], 2)

    # orchestration overhead and scaling on the same >= 2,000 images
    lib_wall, _ = timed(
        [sys.executable, str(Path(__file__).resolve()), "--library-run", str(subset[args.images]), str(clip),
         str(work / "library-out")],
        "library alone",
    )  # fmt: skip
    flow1 = flow_run(subset[args.images], clip, work / "flow-1w", 1, "flow, 1 worker")
    flow2 = flow_run(subset[args.images], clip, work / "flow-2w", 2, "flow, 2 workers")
    results["overhead"] = {
        "images": args.images,
        "flow_wall_s": flow1["wall_s"],
        "library_wall_s": round(lib_wall, 2),
    }
    results["orchestration_overhead"] = round((flow1["wall_s"] - lib_wall) / lib_wall, 3)
    results["scaling"] = {
        "images_per_s_1": flow1["fanout_images_per_s"],
        "images_per_s_2": flow2["fanout_images_per_s"],
    }
    results["scaling_2_workers"] = round(flow2["fanout_images_per_s"] / flow1["fanout_images_per_s"], 3)
    results["stage_profile"] = {"images": flow2["images"], "stage_s": flow2["stage_s"]}
    results["flow_runs"] = {"1_worker": flow1, "2_workers": flow2, "naive_set": flow_small}

    # driver scale, each size in a fresh process
    results["driver_scale"] = []
    for n_rows in [int(x) for x in args.scale_rows.split(",")]:
        _, stdout = timed(
            [sys.executable, str(Path(__file__).resolve()), "--driver-scale-run", str(n_rows), "--work",
             str(work / "driver"), "--sample-shards", str(args.sample_shards)],
            f"driver at {n_rows:,} rows",
        )  # fmt: skip
        results["driver_scale"].append(json.loads(stdout.strip().splitlines()[-1]))
    big = results["driver_scale"][-1]
    results["driver_ms_per_shard_at_max_rows"] = big["driver_ms_per_shard"]
    results["plan_s_at_max_rows"] = big["plan_s"]

    # real images at growing sizes
    results["real_scale"] = [
        flow_run(subset[n], clip, work / f"flow-real-{n}", 2, f"flow on {n:,} images") for n in real_sizes
    ]

    Path(args.results).write_text(json.dumps(results, indent=2) + "\n")
    with open(args.markdown, "a") as f:
        f.write(markdown(results))
    log(f"figures in {args.results} and {args.markdown}")
    print(json.dumps({k: results[k] for k in ("speedup_vs_naive", "orchestration_overhead", "scaling_2_workers",
                                              "prior_ms_per_image", "startup_s", "driver_ms_per_shard_at_max_rows",
                                              "plan_s_at_max_rows")}))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
