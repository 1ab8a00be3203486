"""Training throughput of the one trainer: steps/s, samples/s and peak memory of `Trainer.train_step`.

Consumes nothing but the code: a random-init CLIP of the real architecture (throughput does not depend on
the weights' values) and synthetic batches; produces a JSON report (`--out`, default bench/train_gpu.json)
and, with `--results FILE`, a dated section appended to that Markdown file.

    python bench/train_gpu.py [--tiny] [--method irra] [--preset irra-b16] [--batch-sizes 64 128] [--steps 10]
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
Timing: `--warmup` steps (allocator, cuDNN autotuning) are run first and not counted; then `--steps` steps
between two CUDA synchronisations. Peak memory: torch.cuda.max_memory_allocated over the timed steps (GPU),
or the process's peak RSS (CPU).
"""

from __future__ import annotations

import argparse
import json
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


def measure(model, processor, cfg, data: ClipData, warmup: int, steps: int, device) -> dict:
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(model, processor, cfg, run_dir)
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
    return {
        "batch_size": cfg.batch_size,
        "steps": steps,
        "seconds": round(seconds, 3),
        "steps_per_s": round(steps / seconds, 3),
        "samples_per_s": round(steps * cfg.batch_size / seconds, 1),
        "peak_memory_mib": round(peak_mib, 1),
        "losses": sorted(k for k in logs if k.startswith("loss")),
    }


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
    args = ap.parse_args(argv)
    tiny = args.tiny or not torch.cuda.is_available()
    device = torch.device("cpu" if tiny else "cuda")
    batch_sizes = args.batch_sizes or ([8, 16] if tiny else [64, 128])
    model, processor, size_hw, vocab = build_clip(tiny)
    rows = []
    for bs in batch_sizes:
        flags = {"batch_size": bs, "device": str(device), "log_every_steps": 0, "method": args.method}
        flags["local"] = "rsm" if args.local_pairs else "none"
        cfg, _ = resolve_config(args.preset, None, flags)
        data = synthetic_data(max(2 * bs, 4), size_hw, vocab, args.local_pairs)
        model_copy = build_clip(tiny)[0] if rows else model  # each batch size from the same start
        row = measure(model_copy, processor, cfg, data, args.warmup, args.steps, device)
        print(
            f"batch {bs}: {row['steps_per_s']:.2f} steps/s, {row['samples_per_s']:.1f} samples/s, "
            f"peak {row['peak_memory_mib']:.0f} MiB ({', '.join(row['losses'])})",
            flush=True,
        )
        rows.append(row)
        del model_copy
        if device.type == "cuda":
            torch.cuda.empty_cache()
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
        "world_size": 1,
        "command": "python bench/train_gpu.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "rows": rows,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    if args.results:
        lines = [
            f"\n## Training throughput ({report['mode']}), {report['date']}\n",
            f"Machine: {report['device']}, torch {report['torch']}, {report['amp']}, 1 process. "
            f"Command: `{report['command']}`. Method {args.method}, preset {args.preset}, {size_hw[0]}x{size_hw[1]} px, "
            f"{args.local_pairs} local pairs per caption; {args.steps} timed steps after {args.warmup}.\n",
            "| batch | steps/s | samples/s | peak memory (MiB) | losses |",
            "| --- | --- | --- | --- | --- |",
        ]
        lines += [
            f"| {r['batch_size']} | {r['steps_per_s']} | {r['samples_per_s']} | {r['peak_memory_mib']} | "
            f"{', '.join(r['losses'])} |"
            for r in rows
        ]
        with args.results.open("a") as fh:
            fh.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
