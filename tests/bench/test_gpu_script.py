"""bench/gpu.py in tiny mode (what runs without CUDA): the script runs end to end as a subprocess and
writes every figure, positive, to --out and a dated section to --results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FIGURES = [
    "sam_prompted_images_per_s",
    "sam_prompted_unpacked_images_per_s",
    "sam_auto_images_per_s",
    "clip_crops_per_s",
    "pipeline_images_per_s",
    "regions_per_image",
    "peak_tflops",
    "flops_fraction_sam_prompted",
    "flops_fraction_sam_auto",
    "flops_fraction_clip",
    "sam_encoder_gflop_per_canvas_counted",
    "sam_prompted_gflop_per_image_counted",
    "sam_auto_gflop_per_image_counted",
    "clip_gflop_per_crop_counted",
    "host_zone_ms_per_image",
]


@pytest.mark.timeout(180)
def test_gpu_bench_runs_in_tiny_mode_and_reports_every_figure(tmp_path):
    out, results = tmp_path / "gpu.json", tmp_path / "RESULTS.md"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    argv = [
        sys.executable,
        str(ROOT / "bench" / "gpu.py"),
        "--tiny",
        "--out",
        str(out),
        "--results",
        str(results),
    ]
    proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["mode"] == "tiny" and report["device"] == "cpu" and report["goal_met"] is False
    for key in ["device_name", "date", "command", "pack_images", "reference_gflop", *FIGURES]:
        assert key in report, key
    for key in FIGURES:
        assert isinstance(report[key], float) and report[key] > 0, (key, report[key])
    assert report["reference_gflop"] == {"sam_vit_b_encoder_1024": 972.0, "clip_b16_crop_224": 33.7}
    assert "--tiny" in report["command"]
    tiny_sam = report["sam"]["tiny"]
    assert tiny_sam["prompted_gflop_per_image"] > tiny_sam["encoder_gflop_per_canvas"] / report["pack_images"]
    section = results.read_text()
    assert f"## GPU throughput ({report['date'][:10]}, tiny mode)" in section and "sam-prompted" in section
