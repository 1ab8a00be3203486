"""bench/train_gpu.py in tiny mode (what runs without CUDA): one process and two (torchrun, gloo) time the
same training step and report every figure, with the scaling from one process to two."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(600)
def test_train_gpu_bench_times_one_and_two_processes(tmp_path):
    out, results = tmp_path / "train_gpu.json", tmp_path / "RESULTS.md"
    cmd = [sys.executable, "bench/train_gpu.py", "--tiny", "--world-sizes", "1", "2", "--batch-sizes", "4",
           "--steps", "2", "--warmup", "1", "--out", str(out), "--results", str(results)]  # fmt: skip
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=580)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["world_sizes"] == [1, 2] and report["method"] == "irra"
    rows = {r["world_size"]: r for r in report["rows"]}
    assert set(rows) == {1, 2}
    for world, r in rows.items():
        assert r["batch_size"] == 4 and r["per_process_batch"] == 4 // world
        assert r["steps_per_s"] > 0 and r["samples_per_s"] > 0 and r["peak_memory_mib"] > 0
        assert r["samples_per_s_per_process"] == pytest.approx(r["samples_per_s"] / world, rel=0.02)
        assert {"loss_global", "loss_id", "loss_mlm", "loss_local"} <= set(r["losses"])
    assert rows[1]["speedup_vs_1"] == 1.0
    assert rows[2]["speedup_vs_1"] == pytest.approx(
        rows[2]["samples_per_s"] / rows[1]["samples_per_s"], rel=0.01
    )
    section = results.read_text()
    assert "| processes | global batch |" in section and "1/2 process(es)" in section
    assert "2 process(es), batch 4:" in done.stdout
