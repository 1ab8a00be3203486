"""flows.ray_workers: pool sizing, a dead actor replaced and its shard re-mined, a stuck worker killed
by the shard timeout (faults injected by a ShardMiner subclass, tests/faults.py)."""

from __future__ import annotations

import pytest

from flows.ray_workers import PoolPlan, ShardPool, WorkerStartError, plan_pool
from storage.plan import load_shard_rows, plan_shards
from tests.faults import crash_first_start, faulty_miner

pytestmark = pytest.mark.timeout(300)
SHARD_SIZE = 8


@pytest.fixture(scope="module")
def params(tiny_dataset, tiny_clip_dir) -> dict:
    return {"manifest": str(tiny_dataset / "manifest.parquet"), "clip_model": str(tiny_clip_dir)}


def test_pool_size_follows_pending_shards_resources_and_cap():
    cpu_only = {"CPU": 16.0}
    assert plan_pool(3, cpu_only).n_workers == 3
    assert plan_pool(40, cpu_only).n_workers == 16
    assert plan_pool(40, cpu_only, max_workers=4).n_workers == 4
    gpus = plan_pool(40, {"CPU": 16.0, "GPU": 2.0})
    assert (gpus.n_workers, gpus.gpus_per_worker) == (2, 1.0)
    half = plan_pool(40, {"CPU": 16.0, "GPU": 2.0}, gpus_per_worker=0.5)
    assert (half.n_workers, half.gpus_per_worker) == (4, 0.5)
    assert plan_pool(5, {"CPU": 0.5}).n_workers == 1  # never zero workers
    with pytest.raises(ValueError, match="max_workers"):
        plan_pool(5, cpu_only, max_workers=0)


def test_pool_replaces_a_dead_actor_and_remines_its_shard(ray_local, params):
    plan = plan_shards(params["manifest"], SHARD_SIZE, {"test": "pool"})
    config = {"clip_model": params["clip_model"], "images_per_batch": 4}
    accepted = []
    with ShardPool(config, PoolPlan(1, 1.0, 0.0, "test"), actor_cls=faulty_miner({1: "crash-once"})) as pool:
        first_pid = pool.start_infos()[0]["pid"]
        events = list(
            pool.run(
                [0, 1, 2],
                rows_for=lambda sid: load_shard_rows(plan, sid),
                root=plan.manifest_root,
                accept=accepted.append,
                max_retries=1,
            )
        )
    done = {e.shard_id: e for e in events if e.kind == "done"}
    retries = [e for e in events if e.kind == "retry"]
    assert sorted(done) == [0, 1, 2] and not [e for e in events if e.kind == "failed"]
    assert 1 in {e.shard_id for e in retries} and all("worker died" in e.error for e in retries)
    assert done[1].attempt == 2 and done[1].output.worker["pid"] != first_pid
    assert sorted(o.shard_id for o in accepted) == [0, 1, 2]
    for sid, event in done.items():  # every row of the shard is accounted for
        assert event.output.status.num_rows == plan.shard(sid).n_rows


def test_pool_kills_a_stuck_worker_after_the_shard_timeout(ray_local, params):
    plan = plan_shards(params["manifest"], SHARD_SIZE, {"test": "timeout"})
    config = {"clip_model": params["clip_model"], "images_per_batch": 4}
    with ShardPool(config, PoolPlan(1, 1.0, 0.0, "test"), actor_cls=faulty_miner({0: "hang-once"})) as pool:
        events = list(
            pool.run(
                [0, 1],
                rows_for=lambda sid: load_shard_rows(plan, sid),
                root=plan.manifest_root,
                accept=lambda output: None,
                max_retries=1,
                tasks_per_worker=1,
                shard_timeout_s=20.0,  # above a replacement actor's start-up on a loaded 2-core CI box
            )
        )
    retries = [e for e in events if e.kind == "retry"]
    done = {e.shard_id: e for e in events if e.kind == "done"}
    assert [e.shard_id for e in retries] == [0] and "timed out" in retries[0].error
    assert sorted(done) == [0, 1] and done[0].attempt == 2


def test_pool_replaces_an_actor_that_dies_while_starting(ray_local, params, tmp_path):
    config = {"clip_model": params["clip_model"], "images_per_batch": 4}
    actor_cls = crash_first_start(str(tmp_path / "crashed-once"))
    with ShardPool(config, PoolPlan(1, 1.0, 0.0, "test"), actor_cls=actor_cls) as pool:
        assert len(pool.start_infos()) == 1  # the replacement started
    assert (tmp_path / "crashed-once").is_file()
    with pytest.raises(WorkerStartError, match="no mining worker could start"):
        ShardPool(
            config, PoolPlan(1, 1.0, 0.0, "test"), actor_cls=crash_first_start(str(tmp_path / "x"))
        ).start(respawns_per_worker=0)
