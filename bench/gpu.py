"""GPU throughput of the mining models: the SAM proposers, the CLIP ViT-B/16 image tower, and the
fraction of the GPU's peak FLOP/s they reach.

Consumes nothing but the code (random-weight models of the real architectures: throughput does not depend
on the values; drawn synthetic pedestrians as inputs); produces a JSON report (`--out`, default
bench/gpu.json) and, with `--results FILE`, a dated section appended to that Markdown file.

    python bench/gpu.py [--tiny] [--out bench/gpu.json] [--results bench/RESULTS.md] [--peak-tflops T]
                        [--pack-images 3] [--images 96] [--auto-images 16] [--clip-batch 256] [--repeats 3]

Modes. real (where CUDA is available): SAM vit_b and vit_h from segment_anything's registry with
checkpoint=None, CLIP ViT-B/16 from a CLIPConfig with the openai shapes (vision 768 x 12 layers, patch 16,
224 px; text 512 x 12 layers, vocab 49,408; projection 512), bf16 autocast inside the SAM image encoder
and mask decoder (their outputs handed back in fp32, as the proposers' numpy conversions need) and around
the CLIP tower. tiny (`--tiny`, chosen automatically without CUDA): the project's tiny SAM on a 128-px
canvas and a 2-layer 64-wide CLIP at 32 px on the CPU, so that a test can run the whole script; its figures
say nothing about a GPU.

Figures (per GPU, one process):
- sam-prompted: images/s of `SamPromptedProposer.propose_batch` (prior zones: 6 box prompts per image),
  `--pack-images` pedestrians per encoder canvas, and unpacked (one per canvas) for comparison;
- sam-auto: images/s of `SamAutoProposer.propose` with the project's sam-auto settings (12 x 12 grid);
- CLIP: crops/s of the image tower (`miners.encoders.image_embeddings`) on batches of 224 x 224 crops;
- pipeline: sam-prompted then CLIP on its regions on the same GPU in turn,
  1 / (1 / sam + regions_per_image / clip) images/s (the issue's goal: >= 500 on one H100/H200);
- FLOPs counted with `torch.utils.flop_counter.FlopCounterMode` over one call (matmuls, convolutions,
  attention kernels; 2 FLOPs per multiply-add), printed next to the published references (SAM vit_b
  image encoder ~972 GFLOP at 1024 x 1024, CLIP B/16 ~33.7 GFLOP per 224 x 224 crop);
  flops_fraction_X = counted FLOPs per item x items/s / peak. Peak: `--peak-tflops`, else a table of
  bf16 dense figures matched against torch.cuda.get_device_name (H100/H200 SXM 989 TFLOP/s), else a
  nominal CPU figure (cores x 64 GFLOP/s, fp32 FMA).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import nullcontext
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from miners.encoders import image_embeddings, to_pixel_values
from miners.regions.sam import (
    SamAutoConfig,
    SamAutoProposer,
    SamPromptedConfig,
    SamPromptedProposer,
    build_tiny_sam,
)
from storage.synth.draw import draw_image, sample_person

REFERENCE_GFLOP = {"sam_vit_b_encoder_1024": 972.0, "clip_b16_crop_224": 33.7}
# bf16 dense tensor-core peaks, TFLOP/s; the first name found in the device name wins.
PEAK_TFLOPS = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H200", 989.0),
    ("H100", 989.0),
    ("H800", 989.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
]
CPU_TFLOPS_PER_CORE = 0.064
GOAL_IMAGES_PER_S = 500.0


class Bf16(torch.nn.Module):
    """`inner` run under bf16 autocast (when enabled) with fp32 outputs: SAM's mask generator turns its
    tensors into numpy, which has no bfloat16."""

    counting = False  # FLOP counting runs without autocast (see count_gflop)

    def __init__(self, inner: torch.nn.Module, enabled: bool, device_type: str = "cuda"):
        super().__init__()
        self.inner, self.enabled, self.device_type = inner, enabled, device_type
        if hasattr(inner, "img_size"):
            self.img_size = inner.img_size  # the proposers read the encoder's canvas size

    def forward(self, *args, **kwargs):
        enabled = self.enabled and not Bf16.counting
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=enabled):
            out = self.inner(*args, **kwargs)
        return tuple(o.float() for o in out) if isinstance(out, tuple) else out.float()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(fn, items: int, repeats: int, device: torch.device) -> float:
    """Items per second of `fn` (one warm-up call, then `repeats` timed calls of `items` items each)."""
    fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return items * repeats / (time.perf_counter() - t0)


def count_gflop(fn) -> float:
    """GFLOP of one call of `fn`, counted in fp32: FlopCounterMode decomposes einsum below autocast, where
    SAM's relative-position einsum then meets a bf16 and an fp32 operand; the count does not depend on
    the dtype."""
    from torch.utils.flop_counter import FlopCounterMode

    Bf16.counting = True
    try:
        with FlopCounterMode(display=False) as counter:
            fn()
    finally:
        Bf16.counting = False
    return counter.get_total_flops() / 1e9


def peak_tflops(device: torch.device, given: float | None) -> tuple[float, str]:
    if given is not None:
        return given, "--peak-tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in PEAK_TFLOPS:
            if key in name:
                return tflops, f"table: {key} bf16 dense"
        raise SystemExit(f"no peak FLOP/s known for {name!r}: pass --peak-tflops")
    cores = len(os.sched_getaffinity(0))
    return (
        cores * CPU_TFLOPS_PER_CORE,
        f"nominal CPU: {cores} cores x {CPU_TFLOPS_PER_CORE * 1e3:.0f} GFLOP/s",
    )


def pedestrians(n: int, height: int, width: int) -> list[np.ndarray]:
    out = []
    for i in range(n):
        rng = np.random.default_rng([14, i])
        out.append(draw_image(sample_person(rng), rng, width, height).rgb_hwc)
    return out


def build_sams(tiny: bool, device: torch.device) -> dict[str, torch.nn.Module]:
    if tiny:
        return {"tiny": build_tiny_sam(img_size=128, seed=2).to(device)}
    from segment_anything import sam_model_registry

    # Built on the CPU, then moved: segment_anything makes its pixel mean with the legacy torch.Tensor(list)
    # constructor, which a default CUDA device may refuse.
    return {kind: sam_model_registry[kind](checkpoint=None).to(device).eval() for kind in ("vit_b", "vit_h")}


def build_clip(tiny: bool, device: torch.device):
    from transformers import CLIPConfig, CLIPModel

    if tiny:
        vision = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2)
        vision |= dict(image_size=32, patch_size=16)
        text = dict(vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=2)
        text |= dict(num_attention_heads=2, max_position_embeddings=77)
        projection = 64
    else:
        vision = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
        vision |= dict(image_size=224, patch_size=16)
        text = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12)
        text |= dict(num_attention_heads=8, max_position_embeddings=77)
        projection = 512
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection)
    return CLIPModel(config).to(device).eval()


def bench_sam(kind, model, images, args, device, cuda) -> dict:
    """sam-prompted (packed and unpacked) and sam-auto figures of one SAM."""
    model.image_encoder = Bf16(model.image_encoder, cuda)
    model.mask_decoder = Bf16(model.mask_decoder, cuda)
    packed = SamPromptedProposer(model, SamPromptedConfig(pack_images=args.pack_images))
    unpacked = SamPromptedProposer(model, SamPromptedConfig(pack_images=1))
    auto = SamAutoProposer(model, SamAutoConfig())
    canvas_px = model.image_encoder.img_size
    auto_images = images[: args.auto_images]
    regions = packed.propose_batch(images[: args.pack_images])
    with torch.inference_mode():
        canvas = torch.zeros((1, 3, canvas_px, canvas_px), device=device)
        encoder_gflop = count_gflop(lambda: model.image_encoder(canvas))
    out = {
        "canvas_px": canvas_px,
        "encoder_gflop_per_canvas": encoder_gflop,
        "prompted_gflop_per_image": count_gflop(lambda: packed.propose_batch(images[: args.pack_images]))
        / args.pack_images,
        "auto_gflop_per_image": count_gflop(lambda: auto.propose(images[0])),
        "regions_per_image": float(np.mean([len(r) for r in regions])),
        "prompted_images_per_s": rate(
            lambda: packed.propose_batch(images), len(images), args.repeats, device
        ),
        "prompted_unpacked_images_per_s": rate(
            lambda: unpacked.propose_batch(images), len(images), args.repeats, device
        ),
        "auto_images_per_s": rate(
            lambda: [auto.propose(im) for im in auto_images], len(auto_images), args.repeats, device
        ),
    }
    t0 = time.perf_counter()
    for image in images:
        packed._zone_prompts(image)
    out["host_zone_ms_per_image"] = (time.perf_counter() - t0) / len(images) * 1e3
    print(
        f"SAM {kind}: encoder {encoder_gflop:.4g} GFLOP per {canvas_px}² canvas counted"
        + (f" (reference vit_b {REFERENCE_GFLOP['sam_vit_b_encoder_1024']:.0f})" if kind == "vit_b" else "")
        + f"; sam-prompted {out['prompted_images_per_s']:.1f} images/s packed {args.pack_images}/canvas, "
        f"{out['prompted_unpacked_images_per_s']:.1f} unpacked; sam-auto {out['auto_images_per_s']:.2f} images/s",
        flush=True,
    )
    return out


def bench_clip(model, args, device, cuda) -> dict:
    size = model.config.vision_config.image_size
    crops = torch.randint(0, 256, (args.clip_batch, 3, size, size), dtype=torch.uint8, device=device)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)

    def run(batch):
        autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if cuda and not Bf16.counting else nullcontext()
        )
        with torch.inference_mode(), autocast:
            return image_embeddings(model, to_pixel_values(batch, mean, std))

    # Count with eager attention: the CPU's fused attention kernel has no FLOP formula in the counter.
    attn = model.config._attn_implementation
    model.set_attn_implementation("eager")
    gflop = count_gflop(lambda: run(crops[:1]))
    model.set_attn_implementation(attn)
    out = {
        "crop_px": size,
        "gflop_per_crop": gflop,
        "crops_per_s": rate(lambda: run(crops), args.clip_batch, args.repeats, device),
    }
    print(
        f"CLIP: {gflop:.4g} GFLOP per {size}² crop counted (reference B/16 "
        f"{REFERENCE_GFLOP['clip_b16_crop_224']}); {out['crops_per_s']:.1f} crops/s",
        flush=True,
    )
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny models on the CPU (automatic without CUDA)")
    ap.add_argument("--out", type=Path, default=Path("bench/gpu.json"), help="JSON report")
    ap.add_argument("--results", type=Path, help="append a dated section to this Markdown file")
    ap.add_argument("--peak-tflops", type=float, help="the device's peak (default: from its name)")
    ap.add_argument("--pack-images", type=int, default=3, help="pedestrians per SAM encoder canvas")
    ap.add_argument("--images", type=int, help="images per sam-prompted call (default 96; tiny 6)")
    ap.add_argument("--auto-images", type=int, help="images per sam-auto measurement (default 16; tiny 2)")
    ap.add_argument("--clip-batch", type=int, help="crops per CLIP batch (default 256; tiny 16)")
    ap.add_argument("--repeats", type=int, help="timed calls per figure (default 3; tiny 1)")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.tiny
    tiny = not cuda
    for name, real, small in (
        ("images", 96, 6),
        ("auto_images", 16, 2),
        ("clip_batch", 256, 16),
        ("repeats", 3, 1),
    ):
        if getattr(args, name) is None:
            setattr(args, name, small if tiny else real)
    args.images = max(args.images, args.pack_images)
    device = torch.device("cuda" if cuda else "cpu")
    if tiny:
        torch.set_num_threads(1)  # tiny ops only lose to OpenMP threads contending for shared cores
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    peak, peak_source = peak_tflops(device, args.peak_tflops)
    height, width = (256, 128) if tiny else (384, 128)
    images = pedestrians(args.images, height, width)

    sams = {
        kind: bench_sam(kind, m, images, args, device, cuda) for kind, m in build_sams(tiny, device).items()
    }
    clip = bench_clip(build_clip(tiny, device), args, device, cuda)
    head = sams["tiny" if tiny else "vit_b"]
    pipeline = 1.0 / (1.0 / head["prompted_images_per_s"] + head["regions_per_image"] / clip["crops_per_s"])

    def fraction(gflop: float, per_s: float) -> float:
        return gflop * per_s / (peak * 1e3)

    for s in sams.values():
        s["flops_fraction_prompted"] = fraction(s["prompted_gflop_per_image"], s["prompted_images_per_s"])
        s["flops_fraction_auto"] = fraction(s["auto_gflop_per_image"], s["auto_images_per_s"])
    report = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if cuda
        else f"CPU ({len(os.sched_getaffinity(0))} cores)",
        "mode": "tiny" if tiny else "real",
        "torch": torch.__version__,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", "bench/gpu.py", *argv]),
        "sam_model": "tiny" if tiny else "vit_b",
        "image_hw": [height, width],
        "pack_images": args.pack_images,
        "sam_prompted_images_per_s": head["prompted_images_per_s"],
        "sam_prompted_unpacked_images_per_s": head["prompted_unpacked_images_per_s"],
        "sam_auto_images_per_s": head["auto_images_per_s"],
        "clip_crops_per_s": clip["crops_per_s"],
        "regions_per_image": head["regions_per_image"],
        "pipeline_images_per_s": pipeline,
        "goal_images_per_s": GOAL_IMAGES_PER_S,
        "goal_met": (not tiny) and pipeline >= GOAL_IMAGES_PER_S,
        "peak_tflops": peak,
        "peak_tflops_source": peak_source,
        "flops_fraction_sam_prompted": head["flops_fraction_prompted"],
        "flops_fraction_sam_auto": head["flops_fraction_auto"],
        "flops_fraction_clip": fraction(clip["gflop_per_crop"], clip["crops_per_s"]),
        "sam_encoder_gflop_per_canvas_counted": head["encoder_gflop_per_canvas"],
        "sam_prompted_gflop_per_image_counted": head["prompted_gflop_per_image"],
        "sam_auto_gflop_per_image_counted": head["auto_gflop_per_image"],
        "clip_gflop_per_crop_counted": clip["gflop_per_crop"],
        "reference_gflop": REFERENCE_GFLOP,
        "host_zone_ms_per_image": head["host_zone_ms_per_image"],
        "sam": sams,
        "clip": clip,
    }
    text = json.dumps(report, indent=2)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    if args.results:
        append_results(args.results, report)
    return 0


def append_results(path: Path, r: dict) -> None:
    rows = [
        (
            "sam-prompted images/s (packed / unpacked)",
            f"{r['sam_prompted_images_per_s']:.1f} / "
            f"{r['sam_prompted_unpacked_images_per_s']:.1f} ({r['pack_images']} per canvas)",
        ),
    ]
    for kind, s in r["sam"].items():
        rows.append(
            (
                f"SAM {kind}: prompted / auto images/s; FLOP fraction",
                f"{s['prompted_images_per_s']:.1f} / {s['auto_images_per_s']:.2f}; "
                f"{s['flops_fraction_prompted']:.3f} / {s['flops_fraction_auto']:.3f}",
            )
        )
        rows.append(
            (
                f"SAM {kind}: counted GFLOP (encoder per {s['canvas_px']}² canvas; prompted, auto per image)",
                f"{s['encoder_gflop_per_canvas']:.4g}; {s['prompted_gflop_per_image']:.4g}, {s['auto_gflop_per_image']:.4g}"
                + (" (reference vit_b encoder 972)" if kind == "vit_b" else ""),
            )
        )
    rows += [
        ("CLIP crops/s; FLOP fraction", f"{r['clip_crops_per_s']:.1f}; {r['flops_fraction_clip']:.3f}"),
        (
            f"CLIP counted GFLOP per {r['clip']['crop_px']}² crop",
            f"{r['clip_gflop_per_crop_counted']:.4g} (reference B/16 33.7)",
        ),
        (
            "pipeline images/s (sam-prompted + CLIP on its regions)",
            f"{r['pipeline_images_per_s']:.1f} at {r['regions_per_image']:.1f} regions/image "
            f"(goal {r['goal_images_per_s']:.0f}: {'met' if r['goal_met'] else 'not met'})",
        ),
        ("host time of the prior zones per image", f"{r['host_zone_ms_per_image']:.2f} ms"),
    ]
    lines = [
        "",
        f"## GPU throughput ({r['date'][:10]}, {r['mode']} mode)",
        "",
        f"Machine: {r['device_name']}, torch {r['torch']}; peak {r['peak_tflops']:.1f} TFLOP/s "
        f"({r['peak_tflops_source']}). Command: `{r['command']}`. Images: drawn pedestrians "
        f"{r['image_hw'][0]} x {r['image_hw'][1]}; random-weight models."
        + (" Tiny mode: CPU smoke figures, not GPU throughput." if r["mode"] == "tiny" else ""),
        "",
        "| figure | value |",
        "| --- | --- |",
        *[f"| {k} | {v} |" for k, v in rows],
    ]
    with path.open("a") as fh:
        fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
