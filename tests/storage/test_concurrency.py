"""Two real processes run the same plan into the same OUT at once: every shard is published exactly once
(the flock around publishing is the fence), and the result equals a single run's."""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import random
from pathlib import Path

from storage.plan import RunPlan
from storage.reader import read_pairs, verify_run
from storage.shards import COMMITTED, begin_run, commit_shard, finalize_run
from tests.storage.shard_helpers import commit_all, fake_outputs


def _whole_run(out: str, plan_dict: dict, seed: int, barrier, results) -> None:  # a spawned process
    plan = RunPlan.from_dict(plan_dict)
    pending = begin_run(out, plan)
    random.Random(seed).shuffle(pending)
    barrier.wait()
    for shard_id in pending:
        result = commit_shard(out, plan, shard_id, *fake_outputs(plan.rows_for(shard_id)))
        results.put((seed, shard_id, result.committed, result.reason))
    finalize_run(out, plan)


def test_two_concurrent_runs_publish_each_shard_once(run: tuple[Path, RunPlan, Path], tmp_path):
    _, plan, out = run
    reference = tmp_path / "reference"
    begin_run(reference, plan)
    commit_all(reference, plan)
    finalize_run(reference, plan)

    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [
        ctx.Process(target=_whole_run, args=(str(out), plan.to_dict(), s, barrier, results)) for s in (1, 2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
    assert [p.exitcode for p in procs] == [0, 0]
    outcomes = [results.get(timeout=5) for _ in range(2 * len(plan.shards))]
    winners = sorted(sid for _, sid, committed, reason in outcomes if committed and reason == COMMITTED)
    assert winners == list(range(len(plan.shards)))  # each shard committed by exactly one process
    hashes = {
        d: {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.glob("*.parquet"))}
        for d in (out, reference)
    }
    assert hashes[out] == hashes[reference] and verify_run(out) == []
    assert read_pairs(out).equals(read_pairs(reference))
