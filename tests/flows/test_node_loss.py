"""Node loss: a two-node local Ray cluster (ray.cluster_utils.Cluster) loses its worker node abruptly while
one of the mining actors there is mid-shard; the run must still finish, and its committed output must equal
a fault-free run's: 0 rows lost, 0 duplicated keys, every manifest row in exactly one status row, a raw
glob of the output folder equal to the run manifest (the same figures as the worker kills, test_chaos.py).

Each node has 1 CPU, so the pool is one actor per node and the lost actor's replacement has no room on
the surviving node: the survivor must finish the run alone, the lost shards retried on it. The default
suite loses one node; `make reliability` (marker `reliability`) repeats it with a fresh worker node each
run and a seeded moment inside the shard, and in alternate runs keeps a spare slot (a third 1-CPU node,
the pool capped at 2 actors), so that the replacement starts in the cluster that is left and mines.
"""

from __future__ import annotations

import json
import random
import threading
import time

import pytest

from tests.faults import FAULT_FREE, mine_under_faults, output_figures, shard_miner_pids, slow_miner

pytestmark = pytest.mark.timeout(600)
SHARD_SIZE = 4


def _parent_pid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            # "pid (comm) state ppid ...": comm may hold spaces, so split after its closing parenthesis
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


class NodeKiller(threading.Thread):
    """Removes one of `nodes` from `cluster` (no graceful drain: its raylet and workers are killed) at a
    seeded moment after a mining actor on it started a shard. (It only removes: Ray starts a node only
    from the main thread, which runs the pipeline.)"""

    def __init__(self, cluster, nodes: list, seed: int):
        from ray._private import ray_constants

        super().__init__(daemon=True)
        self.cluster = cluster
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        # A local node's workers are children of its raylet: that tells one node's actors from another's
        self.by_raylet = {n.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid: n for n in nodes}
        self.lost: list[dict] = []  # one entry per removed node: its id and the actor it held mid-shard

    def _mining(self) -> dict[int, object]:
        """mid-shard actor pid -> its node, for the candidate nodes."""
        pids = {pid: self.by_raylet.get(_parent_pid(pid)) for pid in shard_miner_pids(mining_only=True)}
        return {pid: node for pid, node in pids.items() if node is not None}

    def run(self) -> None:
        while not self.lost and not self.stop.wait(0.05):
            if not self._mining():
                continue
            # SlowShardMiner sleeps >= 0.5 s before mining: strike somewhere in the shard, not at its start
            self.stop.wait(self.rng.uniform(0.0, 0.4))
            victims = self._mining()
            if victims:  # still mid-shard at the moment its node goes
                pid, node = sorted(victims.items())[0]
                self.cluster.remove_node(node, allow_graceful=False)
                self.lost.append({"node_id": node.node_id, "mining_pid": pid})


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster of a 1-CPU head (the driver's node, never lost) for this module alone; tests
    add the worker nodes they remove."""
    import ray
    from ray.cluster_utils import Cluster

    assert not ray.is_initialized(), "another module's Ray is still running"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        ray.init(address=cluster.address)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def _fresh_worker_nodes(cluster, n: int) -> list:
    """`n` fresh 1-CPU worker nodes beside the head, every node left from an earlier run removed."""
    for node in list(cluster.worker_nodes):
        cluster.remove_node(node)
    nodes = [cluster.add_node(num_cpus=1) for _ in range(n)]
    cluster.wait_for_nodes()
    return nodes


def _pid_of(worker: str) -> int:
    return int(worker.split()[0].rsplit(":", 1)[1])  # summary rows name a shard's worker "host:pid device"


@pytest.fixture(scope="module")
def setup(cluster, tiny_dataset, tiny_clip_dir, tmp_path_factory):
    """The mining options and a fault-free run on the same two-node topology."""
    params = {"manifest": str(tiny_dataset / "manifest.parquet"), "clip_model": str(tiny_clip_dir)}
    params["shard_size"] = SHARD_SIZE
    reference = tmp_path_factory.mktemp("fault_free") / "shards"
    _fresh_worker_nodes(cluster, 1)
    summary = mine_under_faults(params, reference, None)
    assert summary["finalized"] and len(summary["workers"]) == 2, summary["pool"]
    return params, reference


def _node_loss_runs(cluster, setup, tmp_path, runs: int) -> dict:
    params, reference = setup
    totals = {"runs": 0, "nodes_lost": 0, "shards_retried": 0, "replacements_mined": 0, "rows_lost": 0}
    totals |= {"status_rows_duplicated": 0, "pair_keys_duplicated": 0, "wall_s": []}
    for run in range(runs):
        # Odd runs keep a slot free after the loss (3 one-CPU nodes, 2 actors): the replacement must start
        # there and take shards, so shards are slowed until it has loaded its models (seconds on a 2-core
        # box) before the survivor runs out of work; even runs have none, the survivor must finish alone
        spare = bool(run % 2)
        nodes = _fresh_worker_nodes(cluster, 2 if spare else 1)
        killer = NodeKiller(cluster, nodes, seed=2000 + run)
        t0 = time.perf_counter()
        run_params = params | ({"max_workers": 2} if spare else {})
        actor_cls = slow_miner(2.0 if spare else 0.5)
        summary = mine_under_faults(run_params, tmp_path / f"run{run}", killer, actor_cls=actor_cls)
        figures = output_figures(tmp_path / f"run{run}", reference, params["manifest"])
        assert killer.lost, "no actor on a worker node ever started a shard; nothing was lost"
        started = {w["pid"] for w in summary["workers"]}
        assert killer.lost[0]["mining_pid"] in started
        assert summary["finalized"] and not summary["shards_failed"], summary["shards_failed"]
        assert figures == FAULT_FREE, figures
        retried = [s["shard_id"] for s in summary["shards"] if s["attempts"] > 1]
        assert retried, "the shard in flight on the lost node was not re-mined"
        by_replacement = [s["shard_id"] for s in summary["shards"] if _pid_of(s["worker"]) not in started]
        if spare:
            assert by_replacement, "the lost actor's replacement never mined a shard"
        totals["runs"] += 1
        totals["nodes_lost"] += len(killer.lost)
        totals["shards_retried"] += len(retried)
        totals["replacements_mined"] += bool(by_replacement)
        for key in ("rows_lost", "status_rows_duplicated", "pair_keys_duplicated"):
            totals[key] += figures[key]
        totals["wall_s"].append(round(time.perf_counter() - t0, 1))
    totals |= {"rows_per_run": summary["manifest_rows"], "shards_per_run": summary["n_shards"]}
    print("node-loss figures:", json.dumps(totals))
    return totals


def test_lost_node_loses_nothing(cluster, setup, tmp_path):
    totals = _node_loss_runs(cluster, setup, tmp_path, runs=1)
    assert totals["nodes_lost"] == 1


@pytest.mark.reliability
def test_repeated_node_losses_lose_nothing(cluster, setup, tmp_path):
    totals = _node_loss_runs(cluster, setup, tmp_path, runs=6)
    assert totals["nodes_lost"] == 6 and totals["replacements_mined"] >= 3


def test_a_lost_last_node_with_no_room_left_fails_its_shards_instead_of_hanging(cluster, setup):
    """The pool's only actor goes with its node and the head's CPU is held by another actor: the
    replacement is never placed, so after `start_timeout_s` with nothing in flight the shards fail."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from flows.ray_workers import PoolPlan, ShardPool
    from storage.plan import load_shard_rows, plan_shards

    params, _ = setup
    nodes = _fresh_worker_nodes(cluster, 1)
    head = NodeAffinitySchedulingStrategy(cluster.head_node.node_id, soft=False)
    blocker = ray.remote(num_cpus=1)(_Blocker).options(scheduling_strategy=head).remote()
    ray.get(blocker.ping.remote())  # the head's only CPU is taken before the pool starts
    plan = plan_shards(params["manifest"], SHARD_SIZE, {"test": "no room"})
    config = {"clip_model": params["clip_model"], "images_per_batch": 4}
    killer = NodeKiller(cluster, nodes, seed=7)
    try:
        with ShardPool(config, PoolPlan(1, 1.0, 0.0, "test"), actor_cls=slow_miner(0.5)) as pool:
            # The start above had the default; only the stall after the loss is cut short
            pool.start_timeout_s = 3.0
            killer.start()
            t0 = time.perf_counter()
            events = list(
                pool.run(
                    range(len(plan.shards)),
                    rows_for=lambda sid: load_shard_rows(plan, sid),
                    root=plan.manifest_root,
                    accept=lambda output: None,
                    max_retries=1,
                )
            )
            waited = time.perf_counter() - t0
    finally:  # the head's CPU is freed for the next test whatever happened
        killer.stop.set()
        if killer.is_alive():
            killer.join()
        ray.kill(blocker)
    failed = [e for e in events if e.kind == "failed"]
    assert killer.lost and failed, events
    assert all("replacements not started" in e.error for e in failed), [e.error for e in failed]
    assert {e.shard_id for e in events if e.kind in ("done", "failed")} == set(range(len(plan.shards)))
    assert waited < 120


class _Blocker:
    def ping(self) -> bool:
        return True
