"""Worker kills: SIGKILL mining actors mid-shard at seeded moments while the pipeline runs on a real local
Ray; the committed output must equal a fault-free run's: 0 rows lost, 0 duplicated keys, every manifest
row in exactly one status row, a raw glob of the output folder equal to the run manifest.

The default suite kills 2 workers; `make reliability` (marker `reliability`) kills at least 20 over
repeated runs and prints the figures recorded in bench/RELIABILITY.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import threading
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from flows.mine_rsm import run_mining
from flows.options import build_options, params_from
from storage.reader import read_pairs, read_run_manifest, read_status, verify_run
from tests.faults import SlowShardMiner, shard_miner_pids

pytestmark = pytest.mark.timeout(1800)
SHARD_SIZE = 4
# What every faulted run must measure (see _figures)
FAULT_FREE = {
    "rows_lost": 0,
    "status_rows_duplicated": 0,
    "pair_keys_duplicated": 0,
    "pairs_lost": 0,
    "glob_equals_manifest": True,
    "bytes_equal_fault_free": True,
    "verify_problems": 0,
}


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


def _mine(params: dict, out: Path, killer: Killer | None) -> dict:
    opts = build_options(params_from(out=str(out), max_retries=20, **params))
    if killer:
        killer.start()
    try:
        return run_mining(opts, actor_cls=SlowShardMiner)
    finally:
        if killer:
            killer.stop.set()
            killer.join()


def _figures(out: Path, reference: Path, manifest: str) -> dict:
    manifest_ids = pq.read_table(manifest, columns=["sample_id"])["sample_id"].to_pylist()
    status_ids = read_status(out)["sample_id"].to_pylist()
    pairs = read_pairs(out)
    keys = list(
        zip(*(pairs[c].to_pylist() for c in ("sample_id", "sentence_index", "region_id")), strict=True)
    )
    ref_keys = set(
        zip(
            *(read_pairs(reference)[c].to_pylist() for c in ("sample_id", "sentence_index", "region_id")),
            strict=True,
        )
    )
    listed = {s[k]["file"] for s in read_run_manifest(out)["shards"] for k in ("pairs", "status")}

    def digests(folder: Path) -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.parquet"))}

    return {
        "rows_lost": len(set(manifest_ids) - set(status_ids)),
        "status_rows_duplicated": len(status_ids) - len(set(status_ids)),
        "pair_keys_duplicated": len(keys) - len(set(keys)),
        "pairs_lost": len(ref_keys - set(keys)),
        "glob_equals_manifest": {p.name for p in out.glob("*.parquet")} == listed,
        "bytes_equal_fault_free": digests(out) == digests(reference),
        "verify_problems": len(verify_run(out)),
    }


@pytest.fixture(scope="module")
def setup(ray_local, tiny_dataset, tiny_clip_dir, tmp_path_factory):
    params = {"manifest": str(tiny_dataset / "manifest.parquet"), "clip_model": str(tiny_clip_dir)}
    params["shard_size"] = SHARD_SIZE
    reference = tmp_path_factory.mktemp("fault_free") / "shards"
    _mine(params, reference, None)
    return params, reference


def _kill_runs(setup, tmp_path, total_kills: int, max_runs: int) -> dict:
    params, reference = setup
    totals = {"runs": 0, "kills": 0}
    for run in range(max_runs):
        if totals["kills"] >= total_kills:
            break
        out = tmp_path / f"run{run}"
        killer = Killer(seed=1000 + run, max_kills=min(6, total_kills - totals["kills"]))
        summary = _mine(params, out, killer)
        figures = _figures(out, reference, params["manifest"])
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
    assert subprocess.run(argv, env=env, capture_output=True, timeout=600).returncode == 0
    assert _figures(out, reference, params["manifest"]) == FAULT_FREE
