"""Fault injection for the flow tests: a ShardMiner subclass that fails on chosen shards.

Production code has no fault hooks; tests hand `faulty_miner(...)` to `ShardPool(actor_cls=...)` or
`run_mining(actor_cls=...)`. This module is pickled by value, so Ray workers need not import `tests`.
"""

from __future__ import annotations

import os
import sys
import time

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
