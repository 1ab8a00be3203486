"""`make bench`: every benchmark, in order, each appending its dated figures to bench/RESULTS.md.

1. `python -m flows.demo` — the demo's outputs are the benchmarks' inputs (reused when present);
2. `bench/rsm_quality.py` — pseudo-label precision / coverage / ECE on a held-out synthetic seed;
3. `bench/content_reliability.py` — the QA content test per refine round, on the demo and a held-out seed;
4. `bench/train_ablation.py` — ROGLE global vs global+local vs unweighted, clean and with injected noise;
5. `bench/methods.py` — every training method alone and with `--local rsm`, clean and under 30% injected
   caption-unit noise (reliability on / off), 3 seeds, on a held-out synthetic seed → bench/methods.json;
6. `bench/qa_scale.py` — the QA report on 1M generated pairs;
7. `bench/audit.py` — the audit loop on the demo run: interval coverage over 100 seeded 300-label audits,
   interval width, held-out ECE of the refit calibrator;
8. `bench/audit_ui.py` — the labelling page in headless Chromium: key press → next pair rendered (ms);
9. `bench/speed.py` — speed and scale (speedup vs a naive loop, orchestration overhead, 2-worker scaling,
   driver scale to 1M manifest rows, real-image scale, stage profile) → bench/results.json;
10. `bench/eval_memory.py` — retrieval metrics at ICFG-PEDES size (19,848 x 19,848): peak memory and time;
11. `bench/gpu.py` — SAM / CLIP throughput and FLOP/s fraction (real sizes on CUDA, tiny shapes on a CPU)
   → bench/gpu.json;
12. `bench/train_gpu.py` — training steps/s, samples/s and peak memory at batch 64 and 128 (CLIP ViT-B/16
   at 384 x 128, `--preset irra-b16`, bf16 on CUDA; tiny shapes on a CPU) → bench/train_gpu.json;
13. the real-size CPU path (pytest marker `realsize`): random-init CLIP ViT-B/16 and SAM vit_b in their
   on-disk formats mined through the flow CLI → bench/realsize.json (seconds per image), and one training
   step of a random-init OpenAI-layout ViT-B/16 `.pt` with `--preset irra-b16` through `train_rogle`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
DEMO = Path("outputs/demo")

STEPS = [
    [sys.executable, "-m", "flows.demo"],
    [
        sys.executable,
        str(BENCH / "rsm_quality.py"),
        "--clip-model",
        str(DEMO / "models/tiny-clip"),
        "--calib-manifest",
        str(DEMO / "calib/manifest.parquet"),
    ],
    [sys.executable, str(BENCH / "content_reliability.py"), "--demo", str(DEMO)],
    [sys.executable, str(BENCH / "train_ablation.py"), "--pairs", str(DEMO / "shards")],
    [sys.executable, str(BENCH / "methods.py"), "--clip-model", str(DEMO / "models/tiny-clip")],
    [sys.executable, str(BENCH / "qa_scale.py")],
    [sys.executable, str(BENCH / "audit.py"), "--pairs", str(DEMO / "shards")],
    [
        sys.executable,
        str(BENCH / "audit_ui.py"),
        "--pairs",
        str(DEMO / "shards"),
        "--db",
        str(DEMO / "bench-ui.sqlite"),
        "--sample-n",
        "300",
        "--screenshot",
        "docs/audit-page.png",
        "--results",
        "bench/RESULTS.md",
    ],
    [sys.executable, str(BENCH / "speed.py")],
    [sys.executable, str(BENCH / "eval_memory.py")],
    [
        sys.executable,
        str(BENCH / "gpu.py"),
        "--out",
        str(BENCH / "gpu.json"),
        "--results",
        "bench/RESULTS.md",
    ],
    [
        sys.executable,
        str(BENCH / "train_gpu.py"),
        "--out",
        str(BENCH / "train_gpu.json"),
        "--results",
        "bench/RESULTS.md",
    ],
    [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-s",
        "-m",
        "realsize",
        "tests/miners/test_real_size.py",
        "tests/miners/training/test_real_size_train.py",
    ],
]


def main() -> int:
    env = os.environ | {"RSM_REALSIZE_RESULTS": str(BENCH / "realsize.json")}
    for cmd in STEPS:
        print("+", " ".join(cmd), flush=True)
        rc = subprocess.call(cmd, env=env)
        if rc:
            print(f"benchmark step failed (rc {rc}): {' '.join(cmd)}", file=sys.stderr)
            return rc
    print("figures appended to bench/RESULTS.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
