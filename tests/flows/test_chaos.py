"""Worker kills: SIGKILL mining actors mid-shard at seeded moments while the pipeline runs on a real local
Ray; the committed output must equal a fault-free run's: 0 rows lost, 0 duplicated keys, every manifest
row in exactly one status row, a raw glob of the output folder equal to the run manifest.

The default suite kills 2 workers; `make reliability` (marker `reliability`) kills at least 20 over
repeated runs and prints the figures recorded in bench/RELIABILITY.md.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
from pathlib import Path

import pytest

from storage.reader import read_pairs
from tests.faults import FAULT_FREE, mine_under_faults, output_figures, shard_miner_pids

pytestmark = pytest.mark.timeout(1800)
SHARD_SIZE = 4


class Killer(threading.Thread):
    """After each seeded pause, SIGKILLs one mining actor that is mid-shard, until `max_kills` or `stop`."""

    def __init__(self, seed: int, max_kills: int, pause_s: tuple[float, float] = (1.0, 3.0)):
        super().__init__(daemon=True)
        self.rng = random.Random(seed)
        self.max_kills = max_kills
        self.pause_s = pause_s
        self.stop = threading.Event()
        self.killed: list[int] = []

    def run(self) -> None:
        while len(self.killed) < self.max_kills and not self.stop.wait(self.rng.uniform(*self.pause_s)):
            pids = shard_miner_pids(mining_only=True)
            if pids:
                pid = self.rng.choice(pids)
                try:
                    os.kill(pid, signal.SIGKILL)
                    self.killed.append(pid)
                except ProcessLookupError:
                    pass


@pytest.fixture(scope="module")
def setup(ray_local, tiny_dataset, tiny_clip_dir, tmp_path_factory):
    params = {"manifest": str(tiny_dataset / "manifest.parquet"), "clip_model": str(tiny_clip_dir)}
    params["shard_size"] = SHARD_SIZE
    reference = tmp_path_factory.mktemp("fault_free") / "shards"
    mine_under_faults(params, reference, None)
    return params, reference


def _kill_runs(setup, tmp_path, total_kills: int, max_runs: int) -> dict:
    params, reference = setup
    totals = {"runs": 0, "kills": 0}
    for run in range(max_runs):
        if totals["kills"] >= total_kills:
            break
        out = tmp_path / f"run{run}"
        killer = Killer(seed=1000 + run, max_kills=min(6, total_kills - totals["kills"]))
        summary = mine_under_faults(params, out, killer)
        figures = output_figures(out, reference, params["manifest"])
        assert summary["finalized"] and not summary["shards_failed"], summary["shards_failed"]
        assert figures == FAULT_FREE, figures
        totals["runs"] += 1
        totals["kills"] += len(killer.killed)
    totals |= {"rows_per_run": summary["manifest_rows"], "shards_per_run": summary["n_shards"]}
    print("chaos figures:", json.dumps(totals))
    return totals


def test_killed_workers_lose_nothing(setup, tmp_path):
    totals = _kill_runs(setup, tmp_path, total_kills=2, max_runs=3)
    assert totals["kills"] >= 2


@pytest.mark.reliability
def test_twenty_worker_kills_lose_nothing(setup, tmp_path):
    totals = _kill_runs(setup, tmp_path, total_kills=20, max_runs=12)
    assert totals["kills"] >= 20, totals


def test_driver_killed_mid_run_resumes_to_the_fault_free_result(setup, tmp_path):
    """SIGKILL the whole mining command (the driver that commits) once some shards are in; the same
    command again converges to the fault-free output, and the reader never saw a partial run."""
    import subprocess
    import sys
    import time

    from storage.reader import RunNotFinalizedError
    from storage.shards import stats_name

    params, reference = setup
    out = tmp_path / "shards"
    argv = [sys.executable, "-m", "flows.mine_rsm", "--manifest", params["manifest"], "--out", str(out)]
    argv += ["--clip-model", params["clip_model"], "--shard-size", str(SHARD_SIZE), "--no-prefect"]
    env = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (out / stats_name(2)).is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (out / "_SUCCESS").exists()
    with pytest.raises(RunNotFinalizedError):
        read_pairs(out)
    env.pop("RAY_AUTH_MODE", None)  # as a user's shell has it: unset
    resumed = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert output_figures(out, reference, params["manifest"]) == FAULT_FREE
    # A quiet log: Ray's per-run "Token authentication is enabled ..." notice is not in it (auth stays on)
    assert "Token authentication" not in resumed.stderr + resumed.stdout
