"""A process killed at each step of the commit protocol: the reader never sees a partial shard, and a rerun
converges to the fault-free result, byte for byte.

Crash points (the committing process exits with os._exit, as on SIGKILL or power loss): after the staging
writes, after publishing the pairs file, after publishing both files but before the stats file (the
commit marker), and before the run manifest (_SUCCESS). The killed process commits shards 0..2 fully
first, then dies on shard 3 (or in finalize).
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
from pathlib import Path

import pytest

from storage.plan import RunPlan
from storage.reader import RunNotFinalizedError, read_pairs, read_status, verify_run
from storage.shards import begin_run, commit_shard, finalize_run, pending_shards
from tests.storage.shard_helpers import commit_all, fake_outputs

CRASH_SHARD = 3
CRASH_POINTS = ("after_staging", "after_pairs_published", "before_stats", "before_run_manifest")


def _commit_then_crash(out: str, plan_dict: dict, point: str) -> None:  # runs in a spawned process
    import storage.shards as shards

    plan = RunPlan.from_dict(plan_dict)
    for shard_id in range(CRASH_SHARD):
        shards.commit_shard(out, plan, shard_id, *fake_outputs(plan.rows_for(shard_id)))
    real_publish = shards.publish_no_clobber
    published: list[str] = []

    def publish(src: Path, dst: Path) -> None:
        if point == "after_staging" or (point == "after_pairs_published" and published):
            os._exit(9)
        if point == "before_run_manifest" and dst.name == shards.SUCCESS_FILE:
            os._exit(9)
        real_publish(src, dst)
        published.append(dst.name)

    def die(*_args, **_kwargs) -> None:
        os._exit(9)

    shards.publish_no_clobber = publish
    if point == "before_stats":
        shards._publish_stats = die
    if point == "before_run_manifest":
        for shard_id in range(CRASH_SHARD, len(plan.shards)):
            shards.commit_shard(out, plan, shard_id, *fake_outputs(plan.rows_for(shard_id)))
        shards.finalize_run(out, plan)
    else:
        shards.commit_shard(out, plan, CRASH_SHARD, *fake_outputs(plan.rows_for(CRASH_SHARD)))


def _hashes(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.parquet"))}


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_crash_at_each_commit_step_converges_on_rerun(run: tuple[Path, RunPlan, Path], tmp_path, point):
    _, plan, out = run
    reference = tmp_path / "reference"
    begin_run(reference, plan)
    commit_all(reference, plan)
    finalize_run(reference, plan)

    proc = mp.get_context("spawn").Process(target=_commit_then_crash, args=(str(out), plan.to_dict(), point))
    proc.start()
    proc.join(timeout=120)
    assert proc.exitcode == 9, f"the child did not crash at {point}"

    # Nothing partial is visible: no run manifest, and a partial read lists committed shards only
    with pytest.raises(RunNotFinalizedError):
        read_pairs(out)
    committed = len(plan.shards) if point == "before_run_manifest" else CRASH_SHARD
    status = read_status(out, allow_partial=True)
    assert status.num_rows == sum(plan.shard(s).n_rows for s in range(committed))
    # A file published before its stats file is an orphan: listed nowhere, so never read
    orphans = {
        "after_pairs_published": ["pairs-00003.parquet"],
        "before_stats": ["pairs-00003.parquet", "status-00003.parquet"],
    }.get(point, [])
    assert verify_run(out, allow_partial=True) == [
        f"{out / name}: not listed in the run manifest (stray file)" for name in orphans
    ]
    assert pending_shards(out, plan) == list(range(committed, len(plan.shards)))

    # The rerun mines what is pending and finalizes; the result equals the fault-free run
    for shard_id in begin_run(out, plan):
        commit_shard(out, plan, shard_id, *fake_outputs(plan.rows_for(shard_id)))
    finalize_run(out, plan, check_hashes=True)
    assert _hashes(out) == _hashes(reference)
    assert verify_run(out) == [] and read_pairs(out).equals(read_pairs(reference))
    assert list((out / ".staging").iterdir()) == []
