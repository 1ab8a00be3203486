"""Training on several processes (torch.distributed, gloo on the CPU): one step of 2 processes x B/2 is the
step of 1 process x B for every method; `torchrun` runs the CLI, resumes exactly after a preemption, and a
process killed mid-epoch fails the run with a clear message that `--resume` then finishes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from tests.factories import noise_only

ROOT = Path(__file__).resolve().parents[3]
METHOD_CASES = [  # every method and loss of the trainer, with augmentation and the local branch on
    {"method": "rogle", "local": "rsm", "augment": "irra", "text_augment": True, "id_loss_weight": 0.5},
    {"method": "rogle", "local": "rsm", "global_loss": "itc", "text_mode": "truncate", "mlm_weight": 0.5},
    {"method": "irra", "local": "rsm", "augment": "irra"},
    {"method": "rogle", "local": "none", "global_loss": "cmpm"},
    {"method": "park", "local": "rsm", "method_options": {"mining": "semihard"}},
    {"method": "scmm", "local": "rsm"},
    {"method": "ivt", "local": "rsm"},
]


def _one_step(rank: int, world: int, store: str, clip_dir: str, run: str, out: str) -> None:
    """Each case: prepare a trainer from the same start and take one step on the same global batch of 8;
    rank 0 writes the loss and the updated weights."""
    import torch.distributed as dist

    from miners.clip_scorer import load_clip
    from miners.run_config import read_committed_run
    from miners.training.data import build_clip_data
    from miners.training.distributed import DistInfo
    from miners.training.recipes import resolve_config
    from miners.training.trainer import Trainer
    from storage.manifest import read_manifest

    info = None
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
        info = DistInfo(rank, world, rank, "gloo")
    plan, _, pairs = read_committed_run(Path(run))
    table, meta = read_manifest(plan.manifest_path)
    import pyarrow.compute as pc

    train_rows = table.filter(pc.equal(table["split"], "train"))
    pairs = pairs.filter(pc.equal(pairs["split"], "train"))
    results = []
    for case in METHOD_CASES:
        # Adam's eps at IRRA's 1e-3: parameters whose true gradient is 0 (a key bias: softmax ignores it) get
        # float-noise gradients, which Adam with eps 1e-8 turns into updates of +-lr whose sign is noise
        flags = {"batch_size": 8, "device": "cpu", "lr": 1e-3, "adam_eps": 1e-3, "log_every_steps": 0} | case
        cfg, _ = resolve_config(None, None, flags)
        torch.manual_seed(0)
        model, processor = load_clip(Path(clip_dir), "cpu")
        data = build_clip_data(
            train_rows, processor, root=meta["root"], pairs=pairs, reliability_threshold=0.0
        )
        trainer = Trainer(model, processor, cfg, Path(out) / f"unused-{rank}", dist=info)
        torch.manual_seed(cfg.seed)
        trainer.prepare(data, total_steps=10)
        idx = trainer._epoch_batches(data, 0)[0]
        logs, grad_norm = trainer.train_step(data, idx, trainer.trainable_parameters(), 5.0, False)
        weights = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
        weights |= {f"heads.{k}": v.detach().clone() for k, v in trainer.heads.state_dict().items()}
        results.append({"logs": logs, "grad_norm": grad_norm, "weights": weights})
    if rank == 0:
        torch.save(results, Path(out) / f"world{world}.pt")
    if world > 1:
        dist.destroy_process_group()


@pytest.mark.timeout(900)
def test_two_processes_take_the_step_one_process_takes_for_every_method(tiny_run, tiny_clip_dir, tmp_path):
    import torch.multiprocessing as mp

    args = (str(tmp_path / "store"), str(tiny_clip_dir), str(tiny_run), str(tmp_path))
    _one_step(0, 1, *args)
    mp.spawn(_one_step, args=(2, *args), nprocs=2, join=True)
    one = torch.load(tmp_path / "world1.pt", weights_only=False)
    two = torch.load(tmp_path / "world2.pt", weights_only=False)
    for case, a, b in zip(METHOD_CASES, one, two, strict=True):
        name = f"{case['method']} {case}"
        losses = {k: v for k, v in a["logs"].items() if k.startswith("loss")}
        assert losses, name
        for key, value in losses.items():  # every loss part: the same value from the whole batch
            assert b["logs"][key] == pytest.approx(value, abs=1e-5), (name, key)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5, abs=1e-6), name
        assert a["weights"].keys() == b["weights"].keys()
        moved = 0
        for key, w in a["weights"].items():
            torch.testing.assert_close(
                b["weights"][key], w, atol=1e-5, rtol=0, msg=lambda m, k=key, n=name: f"{n} {k}: {m}"
            )
            moved += 1
        assert moved > 0


def _torchrun(args: list[str], env: dict, **kw) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "miners.train_rogle", *args]  # fmt: skip
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw
    )


def _weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "checkpoint" / "model.safetensors")


@pytest.mark.timeout(1500)
def test_torchrun_trains_resumes_exactly_and_a_killed_process_fails_the_run_clearly(tiny_run, tmp_path):
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    base = ["--pairs", str(tiny_run), "--epochs", "2", "--batch-size", "4", "--reliability-threshold", "0.0",
            "--log-every", "1", "--device", "cpu", "--augment", "irra"]  # fmt: skip
    straight, stopped, killed = tmp_path / "straight", tmp_path / "stopped", tmp_path / "killed"

    proc = _torchrun([*base, "--out", str(straight)], env)
    said, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, said
    assert "train_rogle: 2 processes (gloo), global batch 4 = 2 x 2 per process" in said
    assert said.count("train_rogle: settings:") == 1  # rank 0 speaks for the run
    assert (straight / "metrics.json").is_file() and not list(straight.glob("unused*"))

    # A preemption: SIGTERM to torchrun, which hands it to both processes; they stop at the same step
    proc = _torchrun([*base, "--out", str(stopped)], env)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("step ") and "(epoch 2)" in line:
            proc.send_signal(signal.SIGTERM)
            break
    rest, _ = proc.communicate(timeout=300)
    said = "".join(seen) + rest
    assert proc.returncode != 0, said
    assert "stopped by SIGTERM" in said
    resume = next(ln for ln in said.splitlines() if "train_rogle: to resume: " in ln)
    assert "torchrun --nproc_per_node=2 -m miners.train_rogle" in resume
    proc = _torchrun([*base, "--out", str(stopped), "--resume"], env)
    said, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, said
    a, b = _weights(straight), _weights(stopped)
    for key in a:
        if noise_only(key):  # zero true gradient: its Adam updates are float noise (tests/factories.py)
            continue
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=0, msg=lambda m, k=key: f"{k}: {m}")
    assert json.loads((stopped / "metrics.json").read_text())["R1"] == pytest.approx(
        json.loads((straight / "metrics.json").read_text())["R1"], abs=1e-9
    )

    # A process dies mid-epoch (out of memory, a lost node): the run fails and says so; --resume finishes it
    proc = _torchrun([*base, "--out", str(killed)], env)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("step ") and "(epoch 2)" in line:
            workers = psutil.Process(proc.pid).children(recursive=True)
            rank1 = next(
                w
                for w in workers
                if w.environ().get("RANK") == "1" and "miners.train_rogle" in " ".join(w.cmdline())
            )
            rank1.kill()
            break
    rest, _ = proc.communicate(timeout=300)
    said = "".join(seen) + rest
    assert proc.returncode != 0, said
    assert "miners.train_rogle FAILED" in said or "ChildFailedError" in said, said[-3000:]
    assert "Signal 9 (SIGKILL)" in said or "exitcode  : -9" in said, said[-3000:]
    time.sleep(1)
    proc = _torchrun([*base, "--out", str(killed), "--resume"], env)
    said, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, said
    assert "resuming" in said and (killed / "metrics.json").is_file()
    history = [json.loads(ln) for ln in (killed / "history.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in history] == [1, 2]
