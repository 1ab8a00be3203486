"""Training throughput of the one trainer: steps/s, samples/s and peak memory of `Trainer.train_step`.

Consumes nothing but the code: a random-init CLIP of the real architecture (throughput does not depend on
the weights' values) and synthetic batches; produces a JSON report (`--out`, default bench/train_gpu.json)
and, with `--results FILE`, a dated section appended to that Markdown file.

    python bench/train_gpu.py [--tiny] [--method irra] [--preset irra-b16] [--batch-sizes 64 128] [--steps 10]
                              [--world-sizes 1 2 4]
                              [--local-pairs 2] [--out bench/train_gpu.json] [--results bench/RESULTS.md]

Modes. real (where CUDA is available): CLIP ViT-B/16 with OpenAI's shapes (vision 768 x 12 layers, patch
16; text 512 x 12 layers, vocab 49,408, 77 tokens; projection 512) at 384 x 128 pixels (24 x 8 patches,
position embeddings interpolated), the step under bf16 autocast as `train_rogle` runs it. tiny (`--tiny`,
chosen automatically without CUDA): a 2-layer 64-wide CLIP at 64 x 32 pixels on the CPU, so that a test can
run the whole script; its figures say nothing about a GPU.

What one step is: the method's whole objective through `Trainer.train_step` — `--method irra --preset
irra-b16` (the defaults): SDM + ID + MLM (IRRA's fusion), IRRA's image augmentation, truncated captions of
60 tokens — plus, with `--local-pairs K`,
ROGLE's local branch on K region–sentence pairs per caption (sentences of 14 tokens, random boxes).
Captions come 2 per person, so the identity-aware losses see positives. The token ids are random: a
tokenizer is not needed to time a step, and the processor is a stand-in holding CLIP's normalisation.
Several processes (`--world-sizes 1 2 4`): each size above 1 runs this script again under `torchrun
--standalone` (one GPU per process; gloo processes on a CPU, one thread each), the global batch split over
the processes as `train_rogle` does; the table gives samples/s in all and per process, and the speed-up and
efficiency against one process at the same global batch. A size larger than the machine's GPU count is
skipped and said so.
Timing: `--warmup` steps (allocator, cuDNN autotuning) are run first and not counted; then `--steps` steps
between two CUDA synchronisations. Peak memory: torch.cuda.max_memory_allocated over the timed steps (GPU),
or the process's peak RSS (CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from miners.training.data import ClipData, LocalPair
from miners.training.recipes import resolve_config
from miners.training.trainer import Trainer

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def build_clip(tiny: bool):
    from transformers import CLIPConfig, CLIPModel

    if tiny:
        text = dict(vocab_size=1000, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                    num_attention_heads=2, max_position_embeddings=77)  # fmt: skip
        vision = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                      image_size=32, patch_size=8)  # fmt: skip
        size_hw, projection = (64, 32), 64
    else:
        text = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                    num_attention_heads=8, max_position_embeddings=77)  # fmt: skip
        vision = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                      image_size=224, patch_size=16)  # fmt: skip
        size_hw, projection = (384, 128), 512
    config = CLIPConfig(
        text_config=text | {"hidden_act": "quick_gelu", "bos_token_id": text["vocab_size"] - 2,
                            "eos_token_id": text["vocab_size"] - 1, "pad_token_id": 0},
        vision_config=vision | {"hidden_act": "quick_gelu"},
        projection_dim=projection,
    )  # fmt: skip
    torch.manual_seed(0)
    model = CLIPModel(config)
    vocab = text["vocab_size"]
    tokenizer = SimpleNamespace(
        pad_token_id=0,
        # OpenAI's vocabulary: IRRA's mask id 49405; the tiny one: its last ordinary id
        mask_token_id=vocab - 3,
        all_special_ids=[0, vocab - 2, vocab - 1],
    )
    processor = SimpleNamespace(
        image_processor=SimpleNamespace(
            image_mean=list(CLIP_MEAN),
            image_std=list(CLIP_STD),
            size={"height": size_hw[0], "width": size_hw[1]},
        ),
        tokenizer=tokenizer,
    )
    return model, processor, size_hw, vocab


def synthetic_data(n: int, size_hw, vocab: int, local_pairs: int, seed: int = 0) -> ClipData:
    rng = np.random.default_rng(seed)
    bos, eos = vocab - 2, vocab - 1

    def tokens(length: int) -> list[int]:
        return [bos, *rng.integers(1, vocab - 3, length - 2).tolist(), eos]

    h, w = size_hw
    pairs = []
    for _ in range(n):
        row = []
        for r in range(local_pairs):
            x0, y0 = rng.uniform(0, w * 0.6), rng.uniform(0, h * 0.7)
            box = np.array([x0, y0, x0 + w * 0.35, y0 + h * 0.25], dtype=np.float32)
            row.append(LocalPair(tokens(14), box, float(rng.uniform(0.5, 1.0)), r))
        pairs.append(row)
    return ClipData(
        images_u8=torch.from_numpy(rng.integers(0, 256, (n, 3, h, w), dtype=np.uint8)),
        image_ids=[f"i{k}" for k in range(n)],
        image_pids=np.arange(n) // 2,
        cap_image_index=np.arange(n),
        cap_pids=np.arange(n) // 2,
        sample_ids=[f"s{k}" for k in range(n)],
        captions=[""] * n,
        cap_tokens=[tokens(60) for _ in range(n)],
        cap_sentence_tokens=[[tokens(14) for _ in range(5)] for _ in range(n)],
        cap_n_sentences=np.full(n, 5),
        cap_gt_links=[None] * n,
        image_gt_regions=[None] * n,
        image_scale_xy=np.ones((n, 2), dtype=np.float32),
        local_pairs=pairs,
    )


def measure(model, processor, cfg, data: ClipData, warmup: int, steps: int, device, dist=None) -> dict:
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(model, processor, cfg, run_dir, dist=dist)
        trainer.prepare(data, total_steps=warmup + steps)
        params = trainer.trainable_parameters()
        use_amp = cfg.amp and device.type == "cuda"
        clip = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
        order = np.random.default_rng(1).permutation(len(data))
        batches = [order[(k * cfg.batch_size) % len(data) :][: cfg.batch_size] for k in range(warmup + steps)]
        for idx in batches[:warmup]:
            logs, _ = trainer.train_step(data, idx, params, clip, use_amp)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for idx in batches[warmup:]:
            logs, _ = trainer.train_step(data, idx, params, clip, use_amp)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        peak_mib = (
            torch.cuda.max_memory_allocated() / 2**20
            if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        )
    world = dist.world_size if dist else 1
    return {
        "world_size": world,
        "batch_size": cfg.batch_size,
        "per_process_batch": cfg.batch_size // world,
        "steps": steps,
        "seconds": round(seconds, 3),
        "steps_per_s": round(steps / seconds, 3),
        "samples_per_s": round(steps * cfg.batch_size / seconds, 1),
        "samples_per_s_per_process": round(steps * cfg.batch_size / seconds / world, 1),
        "peak_memory_mib": round(peak_mib, 1),
        "losses": sorted(k for k in logs if k.startswith("loss")),
    }


def _time_batches(args, tiny: bool, batch_sizes: list[int], device, dist) -> list[dict]:
    model, processor, size_hw, vocab = build_clip(tiny)
    rows = []
    for bs in batch_sizes:
        flags = {"batch_size": bs, "device": str(device), "log_every_steps": 0, "method": args.method}
        flags["local"] = "rsm" if args.local_pairs else "none"
        cfg, _ = resolve_config(args.preset, None, flags)
        data = synthetic_data(max(2 * bs, 4), size_hw, vocab, args.local_pairs)
        model_copy = build_clip(tiny)[0] if rows else model  # each batch size from the same start
        row = measure(model_copy, processor, cfg, data, args.warmup, args.steps, device, dist)
        if dist is None or dist.is_main:
            print(
                f"{row['world_size']} process(es), batch {bs}: {row['steps_per_s']:.2f} steps/s, "
                f"{row['samples_per_s']:.1f} samples/s ({row['samples_per_s_per_process']:.1f} per process), "
                f"peak {row['peak_memory_mib']:.0f} MiB ({', '.join(row['losses'])})",
                flush=True,
            )
        rows.append(row)
        del model_copy
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _worker(args, tiny: bool, batch_sizes: list[int]) -> int:
    from miners.training.distributed import init_from_env, process_device, shutdown

    info = init_from_env("cpu" if tiny else "auto")
    try:
        device = torch.device(process_device(info, "cpu" if tiny else "cuda"))
        rows = _time_batches(args, tiny, batch_sizes, device, info)
        if info.is_main:
            args.worker_out.write_text(json.dumps(rows))
    finally:
        shutdown()
    return 0


def _launch(world: int, argv: list[str], tiny: bool) -> list[dict]:
    """This script again under torchrun with `world` processes; their rank 0's rows."""
    import subprocess

    if not tiny and torch.cuda.device_count() < world:
        print(f"{world} processes: skipped, this machine has {torch.cuda.device_count()} GPU(s)", flush=True)
        return []
    keep, skip = [], False
    for word in argv:  # the same settings, without the world sizes
        if word == "--world-sizes":
            skip = True
            continue
        if skip and word.isdigit():
            continue
        skip = False
        keep.append(word)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
               str(Path(__file__).resolve()), *keep, "--worker-out", str(out)]  # fmt: skip
        env = dict(os.environ)
        if tiny:  # processes sharing the CPU cores: one thread each (torchrun's own default)
            env.setdefault("OMP_NUM_THREADS", "1")
        subprocess.run(cmd, check=True, env=env)
        return json.loads(out.read_text())


def _scaling(rows: list[dict]) -> None:
    """Per row: samples/s relative to one process at the same global batch, and that over the processes."""
    single = {r["batch_size"]: r["samples_per_s"] for r in rows if r["world_size"] == 1}
    for r in rows:
        base = single.get(r["batch_size"])
        r["speedup_vs_1"] = round(r["samples_per_s"] / base, 3) if base else None
        r["scaling_efficiency"] = round(r["samples_per_s"] / base / r["world_size"], 3) if base else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (automatic without CUDA)")
    ap.add_argument("--preset", default="irra-b16")
    ap.add_argument("--method", default="irra", help="the training method (miners.training.methods)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default 64 128 (tiny: 8 16)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument(
        "--local-pairs", type=int, default=2, help="pairs per caption for the local branch (0: off)"
    )
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "train_gpu.json")
    ap.add_argument("--results", type=Path, help="append a dated section to this Markdown file")
    ap.add_argument(
        "--world-sizes",
        type=int,
        nargs="+",
        default=[1],
        help="processes to time, e.g. 1 2 4 (each > 1 through torchrun: one GPU each, or gloo on a CPU)",
    )
    ap.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)  # set for the torchrun workers
    args = ap.parse_args(argv)
    tiny = args.tiny or not torch.cuda.is_available()
    batch_sizes = args.batch_sizes or ([8, 16] if tiny else [64, 128])
    if args.worker_out is not None:  # one of the torchrun processes: time, rank 0 writes its rows
        return _worker(args, tiny, batch_sizes)
    device = torch.device("cpu" if tiny else "cuda")
    size_hw = (64, 32) if tiny else (384, 128)
    rows = []
    for world in args.world_sizes:
        if world > 1:
            rows += _launch(world, argv if argv is not None else sys.argv[1:], tiny)
        else:
            rows += _time_batches(args, tiny, batch_sizes, device, None)
    _scaling(rows)
    report = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "mode": "tiny" if tiny else "real",
        "device": torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"CPU ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "preset": args.preset,
        "method": args.method,
        "image_size_hw": list(size_hw),
        "local_pairs_per_caption": args.local_pairs,
        "amp": "bf16 autocast" if device.type == "cuda" else "fp32",
        "world_sizes": sorted({r["world_size"] for r in rows}),
        "command": "python bench/train_gpu.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "rows": rows,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    if args.results:
        lines = [
            f"\n## Training throughput ({report['mode']}), {report['date']}\n",
            f"Machine: {report['device']}, torch {report['torch']}, {report['amp']}, "
            f"{'/'.join(str(w) for w in report['world_sizes'])} process(es). "
            f"Command: `{report['command']}`. Method {args.method}, preset {args.preset}, {size_hw[0]}x{size_hw[1]} px, "
            f"{args.local_pairs} local pairs per caption; {args.steps} timed steps after {args.warmup}.\n",
            "| processes | global batch | steps/s | samples/s | samples/s per process | speed-up vs 1 | "
            "efficiency | peak memory per process (MiB) | losses |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        lines += [
            f"| {r['world_size']} | {r['batch_size']} | {r['steps_per_s']} | {r['samples_per_s']} | "
            f"{r['samples_per_s_per_process']} | {r['speedup_vs_1']} | {r['scaling_efficiency']} | "
            f"{r['peak_memory_mib']} | {', '.join(r['losses'])} |"
            for r in rows
        ]
        with args.results.open("a") as fh:
            fh.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
