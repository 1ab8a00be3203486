"""Peak memory and time of text→image retrieval metrics at ICFG-PEDES size, as the training evaluation
computes them: Q x G float32 similarities of L2-normalised random embeddings as a torch tensor (on --device),
then `miners.metrics.retrieval_metrics` on that tensor (torch, queries ranked `QUERY_CHUNK` rows at a time on
the tensor's device). Appends a dated section to bench/RESULTS.md.

    python bench/eval_memory.py [--queries 19848] [--gallery 19848] [--dim 512] [--device cpu]
        [--results bench/RESULTS.md]

ICFG-PEDES's test split: 19,848 captions and 19,848 images (one caption each). Peak memory is this process's
VmHWM (imports included); the goal of issue 24 is 4 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from qa_scale import peak_rss_mb  # noqa: E402  (bench/qa_scale.py: VmHWM)

from miners.metrics import QUERY_CHUNK, retrieval_metrics  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queries", type=int, default=19848)
    ap.add_argument("--gallery", type=int, default=19848)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--ids", type=int, default=3102, help="persons in the test split (ICFG-PEDES: 1,000+)")
    ap.add_argument("--device", default="cpu", help="where the similarities live and are ranked (cpu, cuda)")
    ap.add_argument("--results", default=str(ROOT / "bench" / "RESULTS.md"))
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    gallery_pids = rng.integers(0, args.ids, args.gallery)
    query_pids = gallery_pids[rng.integers(0, args.gallery, args.queries)]  # every query has a match
    t0 = time.perf_counter()
    queries = rng.standard_normal((args.queries, args.dim), dtype=np.float32)
    gallery = rng.standard_normal((args.gallery, args.dim), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    device = torch.device(args.device)
    # A tensor, as the evaluation's embeddings are: ranked where it lives, never copied to numpy
    sim = torch.from_numpy(queries).to(device) @ torch.from_numpy(gallery).to(device).T
    _synchronize(device)
    t_sim = time.perf_counter() - t0
    t1 = time.perf_counter()
    metrics = retrieval_metrics(sim, query_pids, gallery_pids)
    _synchronize(device)
    t_metrics = time.perf_counter() - t1
    result = {
        "date": date.today().isoformat(),
        "machine": f"{os.cpu_count()}-core CPU, Python {platform.python_version()}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads)"
        + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""),
        "command": "python bench/eval_memory.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "queries": args.queries,
        "gallery": args.gallery,
        "query_chunk": QUERY_CHUNK,
        "similarity_mb": round(sim.numel() * sim.element_size() / 2**20, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "similarity_s": round(t_sim, 1),
        "metrics_s": round(t_metrics, 1),
        "metrics": {k: round(v, 3) for k, v in metrics.items()},
    }
    print(json.dumps(result))
    with open(args.results, "a") as fh:
        fh.write(
            f"\n## Retrieval metrics at ICFG-PEDES size: memory (issue 24) ({result['date']})\n\n"
            f"Machine: {result['machine']}. Command: `{result['command']}`. Random L2-normalised embeddings, "
            f"{args.queries:,} queries x {args.gallery:,} gallery images, float32 similarities "
            f"({result['similarity_mb']} MiB) as a torch tensor on {args.device}, `retrieval_metrics` (torch) ranking "
            f"{QUERY_CHUNK} queries at a time.\n\n"
            "| peak RSS MiB (goal 4,096) | similarities s | metrics s | R1 (chance level) |\n"
            "| --- | --- | --- | --- |\n"
            f"| {result['peak_rss_mb']} | {result['similarity_s']} | {result['metrics_s']} | "
            f"{result['metrics']['R1']} |\n"
        )
    return 0


def _synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a CUDA time covers the work and not just its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    raise SystemExit(main())
