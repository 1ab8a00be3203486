"""Fault injection for the flow tests: a ShardMiner subclass that fails on chosen shards, and the run +
output comparison that every fault test (worker kills, node loss) measures against a fault-free run.

Production code has no fault hooks; tests hand `faulty_miner(...)` to `ShardPool(actor_cls=...)` or
`run_mining(actor_cls=...)`. This module is pickled by value, so Ray workers need not import `tests`.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import time
from pathlib import Path

import ray.cloudpickle

from flows.ray_workers import ShardMiner, ShardOutput

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class InjectedShardFailure(RuntimeError):
    """Raised by a FaultyShardMiner for a shard set to "raise"."""


class FaultyShardMiner(ShardMiner):
    """FAULTS: shard id -> "raise" (every attempt raises), "crash-once" (the actor process exits during
    the first attempt, as on OOM or a lost node) or "hang-once" (the first attempt never returns)."""

    FAULTS: dict[int, str] = {}

    def mine(self, shard_id: int, rows, root: str, attempt: int) -> ShardOutput:
        fault = self.FAULTS.get(shard_id)
        if fault == "raise":
            raise InjectedShardFailure(f"shard {shard_id}: failure injected by the test")
        if fault == "crash-once" and attempt == 1:
            os._exit(17)
        if fault == "hang-once" and attempt == 1:
            time.sleep(24 * 3600)  # a stuck worker (deadlocked I/O, a hung GPU): only the watchdog ends it
        return super().mine(shard_id, rows, root, attempt)


def faulty_miner(faults: dict[int, str]) -> type[ShardMiner]:
    """A FaultyShardMiner class with these faults."""
    return type("FaultyShardMiner", (FaultyShardMiner,), {"FAULTS": dict(faults)})


class SlowShardMiner(ShardMiner):
    """Sleeps SLEEP_S before each shard, so that a fault injector has time to strike mid-run."""

    SLEEP_S = 0.5

    def mine(self, shard_id: int, rows, root: str, attempt: int) -> ShardOutput:
        time.sleep(self.SLEEP_S)
        return super().mine(shard_id, rows, root, attempt)


def slow_miner(sleep_s: float) -> type[ShardMiner]:
    """A SlowShardMiner class sleeping `sleep_s` per shard (same name, so shard_miner_pids finds it)."""
    return type("SlowShardMiner", (SlowShardMiner,), {"SLEEP_S": sleep_s})


def shard_miner_pids(mining_only: bool = False) -> list[int]:
    """PIDs of this machine's mining actors (Ray titles them "ray::<ActorClass>[.method]"); with
    `mining_only`, only those running `mine` right now (mid-shard)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        names = (b"ray::ShardMiner", b"ray::SlowShardMiner", b"ray::FaultyShardMiner")
        if cmdline.startswith(names) and (not mining_only or cmdline.split(b"\0")[0].endswith(b".mine")):
            pids.append(int(entry))
    return sorted(pids)


class CrashFirstStart(ShardMiner):
    """The first actor to start (per MARKER file) dies in its constructor, as if killed while loading."""

    MARKER = ""

    def __init__(self, config, torch_threads: int):
        marker = self.MARKER
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            fd = None
        if fd is not None:
            os.close(fd)
            os._exit(13)
        super().__init__(config, torch_threads)


def crash_first_start(marker: str) -> type[ShardMiner]:
    return type("CrashFirstStart", (CrashFirstStart,), {"MARKER": marker})


# ---------------------------------------------------------------------------------------------- measuring

# What every faulted run must measure (see output_figures)
FAULT_FREE = {
    "rows_lost": 0,
    "status_rows_duplicated": 0,
    "pair_keys_duplicated": 0,
    "pairs_lost": 0,
    "glob_equals_manifest": True,
    "bytes_equal_fault_free": True,
    "verify_problems": 0,
}


def mine_under_faults(
    params: dict, out: Path, injector: threading.Thread | None, actor_cls: type[ShardMiner] = SlowShardMiner
) -> dict:
    """Run the real mining pipeline (retries generous enough for any number of injected faults) while
    `injector` (a thread with a `stop` Event, or None for the fault-free reference) strikes; summary."""
    from flows.mine_rsm import run_mining
    from flows.options import build_options, params_from

    opts = build_options(params_from(out=str(out), max_retries=20, **params))
    if injector:
        injector.start()
    try:
        return run_mining(opts, actor_cls=actor_cls)
    finally:
        if injector:
            injector.stop.set()
            injector.join()


def output_figures(out: Path, reference: Path, manifest: str) -> dict:
    """The run in `out` measured against the fault-free run in `reference` (FAULT_FREE when equal)."""
    import pyarrow.parquet as pq

    from storage.reader import read_pairs, read_run_manifest, read_status, verify_run

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
