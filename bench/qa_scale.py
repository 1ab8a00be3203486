"""Scale benchmark of the QA report: ~1M synthetic pairs in committed shards → `qa.report.build_report`.

Consumes nothing but its arguments; produces (under --work) a generated manifest and run folders of
synthetic pairs committed through `storage.shards` (the real plan of the generated manifest:
`plan_shards` / `begin_run` / `commit_shard` / `finalize_run`), times `build_report` on them in a fresh
process each (peak RSS of that process from `resource.getrusage`), prints one Markdown table row and
appends it to bench/RESULTS.md under "## QA report scale" (append only; the file is never rewritten).

    python bench/qa_scale.py [--pairs 1000000] [--shards 100] [--small-pairs 100000] [--work DIR]

What is timed: data checks (sha256 of every file included), label-free figures, the mixture, all
breakdowns and histograms, the plots, the audit sheets' sampling and drawing (the synthetic pairs have
no images, so tiles are placeholders) and the three output files. Not timed: ground truth (the
generated manifest has none). Peak RSS is the report process's own (VmHWM), measured in a fresh process. Generated runs are reused
when --work already holds them. Values: reliability from a 70/30 mixture of Beta(7, 2) and Beta(2, 5),
CLIP cosine / softmax / margin correlated with it, 3–7 units per caption, 0.5% rejected samples.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from storage.plan import plan_shards, read_sorted_manifest  # noqa: E402
from storage.schemas import BODY_PARTS, PAIRS_SCHEMA, STATUS_SCHEMA, with_version  # noqa: E402
from storage.shards import SUCCESS_FILE, begin_run, commit_shard, finalize_run  # noqa: E402

HEADING = "## QA report scale"
TABLE_HEAD = (
    "| date | machine | command | data | build_report | peak RSS |\n| --- | --- | --- | --- | --- | --- |\n"
)
UNITS_MIN, UNITS_MAX = 3, 7  # units per caption: mean 5
COLOURS = ("red", "blue", "black", "white", "grey", "green", "brown", "pink", "yellow", "navy")
THINGS = {"head": "cap", "upper": "jacket", "lower": "trousers", "feet": "sneakers", "bag": "backpack"}


def _manifest(path: Path, n_captions: int) -> Path:
    ids = [f"imgs/{k // 1000:04d}/{k:07d}.jpg" for k in range(n_captions)]
    table = pa.table(
        {
            "sample_id": [f"{i}#0" for i in ids],
            "image_id": ids,
            "person_id": np.arange(n_captions, dtype=np.int64) // 4 + 1,
            "split": np.where(np.arange(n_captions) % 10 < 8, "train", "test"),
            "image_path": ids,
            "caption_index": np.zeros(n_captions, np.int32),
            "caption": ["A person in a red jacket and black trousers. He carries a backpack."] * n_captions,
            "gt_regions": pa.nulls(n_captions, pa.string()),
            "gt_links": pa.nulls(n_captions, pa.string()),
        }
    )
    pq.write_table(table.cast(with_version("manifest", {"rsm.root": str(path.parent / "images")})), path)
    return path


def _shard_tables(rows: pa.Table, rng: np.random.Generator) -> tuple[pa.Table, pa.Table]:
    n = rows.num_rows
    ok = rng.random(n) >= 0.005
    units = np.where(ok, rng.integers(UNITS_MIN, UNITS_MAX + 1, n), 0)
    sample = np.repeat(np.arange(n), units)
    m = sample.size
    unit_idx = np.arange(m) - np.repeat(np.cumsum(units) - units, units)
    clean = rng.random(m) < 0.7
    rel = np.where(clean, rng.beta(7, 2, m), rng.beta(2, 5, m)).astype(np.float32)
    cos = (0.22 + 0.06 * clean + rng.normal(0, 0.03, m)).astype(np.float32)
    parts = np.array(BODY_PARTS)
    label = parts[rng.integers(0, len(parts), m)]
    has_tag = rng.random(m) < 0.8
    tag = np.where(clean, label, parts[rng.integers(0, len(parts), m)])
    offsets = np.concatenate([[0], np.cumsum(has_tag)]).astype(np.int32)
    colour = np.array(COLOURS)[rng.integers(0, len(COLOURS), m)]
    sentence = [
        f"{c} {THINGS[t]}" if h else "walking along the street"
        for c, t, h in zip(colour, tag, has_tag, strict=True)
    ]
    y0 = rng.uniform(0, 180, m).astype(np.float32)
    x0 = rng.uniform(0, 60, m).astype(np.float32)
    boxes = np.stack([x0, y0, x0 + rng.uniform(20, 60, m), y0 + rng.uniform(20, 70, m)], axis=1).astype(
        np.float32
    )
    take = lambda col: rows.column(col).take(pa.array(sample))  # noqa: E731
    starts = (unit_idx * 30).astype(np.int32)
    pairs = pa.table(
        {
            "sample_id": take("sample_id"),
            "image_id": take("image_id"),
            "person_id": take("person_id"),
            "split": take("split"),
            "caption_index": take("caption_index"),
            "sentence_index": unit_idx.astype(np.int32),
            "sentence": sentence,
            "char_start": starts,
            "char_end": starts + 25,
            "part_tags": pa.ListArray.from_arrays(pa.array(offsets), pa.array(tag[has_tag])),
            "region_id": unit_idx.astype(np.int32),
            "region_source": np.full(m, "prior"),
            "region_label": label,
            "bbox_xyxy": pa.FixedSizeListArray.from_arrays(pa.array(boxes.reshape(-1)), 4),
            "mask_rle": pa.nulls(m, pa.string()),
            "region_quality": rng.uniform(0.5, 1, m).astype(np.float32),
            "clip_cosine": cos,
            "softmax_prob": np.clip(rel * 0.6 + rng.uniform(0, 0.3, m), 0, 1).astype(np.float32),
            "margin": (cos - 0.2 + rng.normal(0, 0.02, m)).astype(np.float32),
            "mutual_best": rng.random(m) < 0.6,
            "part_agreement": np.where(has_tag, (label == tag).astype(np.float32), 0.5).astype(np.float32),
            "reliability": rel,
            "kept": rel >= 0.5,
            "clip_fingerprint": np.full(m, "synthetic-clip"),
            "config_fingerprint": np.full(m, "synthetic-config"),
        }
    )
    kept_per_sample = np.bincount(sample, weights=(rel >= 0.5), minlength=n).astype(np.int32)
    status = pa.table(
        {
            "sample_id": rows.column("sample_id"),
            "image_id": rows.column("image_id"),
            "status": np.where(ok, "ok", "corrupt_image"),
            "error_message": pa.array(
                [
                    None if k else f"{p}: truncated JPEG"
                    for k, p in zip(ok, rows.column("image_path").to_pylist(), strict=True)
                ],
                pa.string(),
            ),
            "n_regions": np.where(ok, 5, 0).astype(np.int32),
            "n_sentences": units.astype(np.int32),
            "n_pairs": units.astype(np.int32),
            "n_kept": kept_per_sample,
        }
    )
    return pairs.cast(PAIRS_SCHEMA), status.cast(STATUS_SCHEMA)


def generate(work: Path, n_pairs: int, n_shards: int, seed: int = 0) -> Path:
    """A finalized run folder of about `n_pairs` synthetic pairs in `n_shards` shards (reused if present)."""
    out = work / f"run-{n_pairs}-{n_shards}"
    if (out / SUCCESS_FILE).is_file():
        return out
    mean_units = (UNITS_MIN + UNITS_MAX) / 2 * 0.995
    n_captions = round(n_pairs / mean_units)
    manifest = _manifest(work / f"manifest-{n_captions}.parquet", n_captions)
    plan = plan_shards(manifest, -(-n_captions // n_shards), {"bench": "qa_scale", "keep_threshold": 0.5})
    begin_run(out, plan)
    table = read_sorted_manifest(manifest)
    t0 = time.perf_counter()
    for spec in plan.shards:
        rows = plan.rows_for(spec.shard_id, table)
        pairs, status = _shard_tables(rows, np.random.default_rng([seed, spec.shard_id]))
        commit_shard(out, plan, spec.shard_id, pairs, status)
    finalize_run(out, plan)
    print(f"generated {out} ({len(plan.shards)} shards) in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return out


def peak_rss_mb() -> float:
    """Peak RSS of this process. VmHWM first: on Linux getrusage's ru_maxrss survives exec, so a child
    started by a big parent would report the parent's size; VmHWM belongs to this process image."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(run: Path, report: Path, sheet_samples: int) -> dict:
    """build_report on `run` in this process; peak RSS of this process (it should be fresh)."""
    from qa.report import build_report

    rss0 = peak_rss_mb()
    t0 = time.perf_counter()
    qa = build_report(run, report, sheet_samples=sheet_samples)
    seconds = time.perf_counter() - t0
    return {
        "seconds": seconds,
        "stages": qa["seconds"],
        "pairs": qa["pairs_total"],
        "kept": qa["pairs_kept"],
        "noise_rate_estimated": qa["noise_rate_estimated"],
        "noise_rate_mixture": qa["noise_rate_mixture"],
        "checks_failed": [k for k, v in qa["checks"].items() if v != "pass"],
        "rss_after_imports_mb": rss0,
        "peak_rss_mb": peak_rss_mb(),
    }


def _measure_fresh(run: Path, report: Path, sheet_samples: int) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--measure",
        str(run),
        "--report",
        str(report),
        "--sheet-samples",
        str(sheet_samples),
    ]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(done.stdout.strip().splitlines()[-1])


def append_result(line: str, path: Path) -> None:
    """Append `line` under our heading: a new heading + table head unless ours is the file's last section."""
    text = path.read_text() if path.is_file() else ""
    headings = [ln for ln in text.splitlines() if ln.startswith("## ")]
    with path.open("a") as f:
        if not text:
            f.write("# Benchmark results\n")
        if not headings or headings[-1].strip() != HEADING:
            f.write(f"\n{HEADING}\n\n{TABLE_HEAD}")
        elif not text.endswith("\n"):
            f.write("\n")
        f.write(line + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=1_000_000)
    p.add_argument("--shards", type=int, default=100)
    p.add_argument("--small-pairs", type=int, default=100_000, help="a smaller run, to show memory is flat")
    p.add_argument("--work", type=Path, default=Path("/tmp/rsm-qa-scale"))
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "RESULTS.md")
    p.add_argument("--sheet-samples", type=int, default=24, help="per band; the tiles say 'no such file'")
    p.add_argument("--no-append", action="store_true")
    p.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--report", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure, args.report, args.sheet_samples)))
        return 0

    args.work.mkdir(parents=True, exist_ok=True)
    small_shards = max(1, args.shards * args.small_pairs // args.pairs)
    small = _measure_fresh(
        generate(args.work, args.small_pairs, small_shards), args.work / "qa-small", args.sheet_samples
    )
    big = _measure_fresh(
        generate(args.work, args.pairs, args.shards), args.work / "qa-big", args.sheet_samples
    )
    for name, r in (("small", small), ("big", big)):
        print(f"{name}: {json.dumps(r)}", file=sys.stderr)
    ram_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    machine = (
        f"{os.cpu_count()} cores, {ram_gb:.0f} GiB RAM, {platform.machine()} (CPU shared with other jobs)"
    )
    command = (
        f"`python bench/qa_scale.py --pairs {args.pairs} --shards {args.shards} --small-pairs {args.small_pairs} "
        f"--sheet-samples {args.sheet_samples}`"
    )
    what = "no ground truth; " + (
        f"{args.sheet_samples} sheet samples per band (placeholder tiles: no images)"
        if args.sheet_samples
        else "no sheets"
    )
    stages = ", ".join(f"{k} {v:.1f} s" for k, v in big["stages"].items() if k != "total")
    line = (
        f"| {date.today().isoformat()} | {machine} | {command} | {big['pairs']:,} pairs in {args.shards} shards "
        f"(and {small['pairs']:,} in {small_shards}); {what} | {big['seconds']:.1f} s ({stages}); "
        f"{small['pairs']:,} pairs: {small['seconds']:.1f} s | {big['peak_rss_mb']:.0f} MB "
        f"({small['peak_rss_mb']:.0f} MB at {small['pairs']:,} pairs; {big['rss_after_imports_mb']:.0f} MB after imports) |"
    )
    print(line)
    if big["checks_failed"] or small["checks_failed"]:
        print(f"warning: checks failed: {big['checks_failed']} {small['checks_failed']}", file=sys.stderr)
    if not args.no_append:
        append_result(line, args.results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
