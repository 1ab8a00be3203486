"""Ray side of the mining flow: connect to Ray, size a pool of shard-mining actors, fan shards out.

Consumes a resolved `RSMConfig` (as a dict), the manifest rows of each shard (pyarrow Tables, sliced by
the driver) and the dataset root; produces a stream of `ShardEvent`s on the driver. Each actor holds ONE
`RSMMiner` (models load once per actor, in its constructor) and mines one shard per call, returning
its (pairs, status) tables and stage timings as a `ShardOutput`. The driver hands every output to an
`accept` callback (the flow commits the shard there, on the driver's filesystem) before it counts as
done; a failing call or callback is retried on any live actor up to `max_retries` times, a dead actor
(killed, OOM, its node lost) is replaced, and one shard's failure never stops the others. No Prefect
here: the flow wraps this.
"""

from __future__ import annotations

import logging
import os
import resource
import socket
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import ray
from ray.exceptions import NodeDiedError, ObjectLostError, RayActorError, RayTaskError

from flows.env import apply_offline_defaults
from flows.startup import StartupError, first_line


class WorkerStartError(RuntimeError):
    """No shard-mining actor could start (bad model path, missing dependency, no resources)."""


# ---------------------------------------------------------------------------------------------- cluster


def local_cpu_count() -> int:
    """CPUs this process may use (the affinity mask, not the machine's total: containers pin cores)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


class _DropDefaultAuthNotice(logging.Filter):
    """Ray's "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt
    out" WARNING, printed on every local start when RAY_AUTH_MODE is unset. Token authentication (the
    secure default, token in ~/.ray/auth_token) stays on; only the notice goes. Setting RAY_AUTH_MODE
    ourselves does not work: Ray's cached config would still read the old mode and its GCS refuses the
    driver."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


def _quiet_default_auth_notice() -> None:
    log = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if not any(isinstance(f, _DropDefaultAuthNotice) for f in log.filters):
        log.addFilter(_DropDefaultAuthNotice())


RAY_START_TRIES = 3
RAY_RETRY_PAUSE_S = 3.0  # after a failed try, times the try number: a previous run's Ray may still be exiting


def connect_ray(
    address: str | None = None, num_cpus: int | None = None, tries: int = RAY_START_TRIES
) -> bool:
    """Connect to Ray; returns True when this call started it (the caller then shuts it down).

    address (else $RAY_ADDRESS): a running cluster ("auto", "HOST:6379", "ray://HOST:10001"). Without
    one, a fresh local instance starts with `num_cpus` (default: this process's CPUs) and no dashboard;
    "local" is passed explicitly because a bare ray.init() would join any cluster `ray start` left
    running on this machine. An already-initialised Ray (tests share one) is reused as is.

    A failed start is retried (`tries` in all; what one try started is shut down first): a local head
    node started right after another run's Ray failed "The current node timed out during startup" in
    2 of 3 tries (2026-12-04), and a rerun succeeded. After the last try, StartupError in one line.
    """
    if ray.is_initialized():
        return False
    apply_offline_defaults()  # the processes a local Ray starts inherit the driver's environment
    address = address or os.environ.get("RAY_ADDRESS") or None
    local = not address or address == "local"
    t0 = time.perf_counter()
    last = ""
    for attempt in range(1, max(1, tries) + 1):
        before = _child_pids()
        try:
            if local:
                _quiet_default_auth_notice()
                ray.init(address="local", num_cpus=num_cpus or local_cpu_count(), include_dashboard=False)
            else:
                ray.init(address=address)
            return True
        except Exception as exc:
            last = first_line(exc)
            with suppress(Exception):
                ray.shutdown()
            # A head node that timed out is raised before Ray records it, so shutdown() does not reach its
            # GCS, raylet and agents: end what this try started, by pid, before the next try
            _end_processes(_child_pids() - before)
            if attempt < tries:
                time.sleep(RAY_RETRY_PAUSE_S * attempt)
    waited = time.perf_counter() - t0
    if local:
        raise StartupError(
            f"Ray's local head node did not start: {tries} tries, {waited:.0f} s in all (last: {last}). "
            "Another run's Ray may still be shutting down, or other work holds the cores: rerun in a "
            "minute; `ray stop` ends a Ray left running; logs in /tmp/ray/session_latest/logs"
        )
    raise StartupError(
        f"could not connect to the Ray cluster at {address}: {tries} tries, {waited:.0f} s in all "
        f"(last: {last}). Check the address and that the cluster is up (`ray status` on its head node)"
    )


def _child_pids() -> set[int]:
    import psutil  # Ray's own dependency

    return {p.pid for p in psutil.Process().children(recursive=True)}


def _end_processes(pids: set[int], grace_s: float = 5.0) -> None:
    import psutil

    procs = []
    for pid in pids:
        with suppress(psutil.Error):
            proc = psutil.Process(pid)
            proc.terminate()
            procs.append(proc)
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:
        with suppress(psutil.Error):
            proc.kill()


@contextmanager
def ray_session(address: str | None = None) -> Iterator[bool]:
    """Ray for the duration of the block: connected (started locally, with retries) on entry, shut down
    on exit when this block started it. Yields whether it did."""
    started = connect_ray(address)
    try:
        yield started
    finally:
        if started:
            ray.shutdown()


@dataclass(frozen=True)
class PoolPlan:
    """How many actors to start and what each one reserves."""

    n_workers: int
    cpus_per_worker: float
    gpus_per_worker: float  # 0 on a CPU-only cluster
    reason: str


def plan_pool(
    n_pending: int,
    resources: dict[str, float],
    max_workers: int | None = None,
    gpus_per_worker: float = 1.0,
    cpus_per_worker: float = 1.0,
) -> PoolPlan:
    """Actors = min(#pending shards, worker slots of the cluster, max_workers), at least 1.

    resources: Ray's `cluster_resources()` (totals: an actor of the previous run that is still being
    torn down must not shrink this run's pool). With GPUs, a slot is `gpus_per_worker` GPUs (a fraction
    packs several actors on one GPU); without, a slot is `cpus_per_worker` CPUs.
    """
    if n_pending < 1:
        raise ValueError("plan_pool needs at least one pending shard")
    if max_workers is not None and max_workers < 1:
        raise ValueError(f"max_workers must be >= 1, got {max_workers}")
    if gpus_per_worker < 0 or cpus_per_worker <= 0:
        raise ValueError(
            f"need gpus_per_worker >= 0 and cpus_per_worker > 0, got {gpus_per_worker}, {cpus_per_worker}"
        )
    gpus, cpus = float(resources.get("GPU", 0.0)), float(resources.get("CPU", 0.0))
    if gpus > 0 and gpus_per_worker > 0:
        slots, kind, gpu_share = (
            int(gpus // gpus_per_worker),
            f"{gpus:g} GPUs / {gpus_per_worker:g}",
            gpus_per_worker,
        )
    else:
        slots, kind, gpu_share = int(cpus // cpus_per_worker), f"{cpus:g} CPUs / {cpus_per_worker:g}", 0.0
    limits = [n_pending, max(1, slots)] + ([max_workers] if max_workers else [])
    n = max(1, min(limits))
    reason = f"min(pending shards {n_pending}, slots {kind} = {slots}, max_workers {max_workers})"
    return PoolPlan(n, cpus_per_worker, gpu_share, reason)


# ---------------------------------------------------------------------------------------------- the actor


@dataclass
class ShardOutput:
    """What an actor returns for one shard (tables are row-aligned with the shard's manifest rows)."""

    shard_id: int
    attempt: int
    pairs: pa.Table
    status: pa.Table
    stage_s: dict[str, float]  # RSMMiner's per-stage seconds
    mine_s: float  # wall time inside the actor
    n_images: int
    worker: dict[str, Any]  # host, pid, device, torch threads
    peak_rss_mb: float = 0.0  # the actor process's peak resident memory so far (after this shard)


class ShardMiner:
    """Holds one RSMMiner; `mine` runs one shard. Wrapped with ray.remote by `ShardPool`."""

    def __init__(self, config: dict[str, Any], torch_threads: int):
        import torch
        from transformers.utils import logging as hf_logging

        from miners.rsm import RSMConfig, RSMMiner

        # Ray gives the actor `num_cpus` cores; more torch threads than that would oversubscribe them
        torch.set_num_threads(max(1, torch_threads))
        hf_logging.disable_progress_bar()
        self.miner = RSMMiner(RSMConfig.from_dict(config))
        self.info = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "device": str(self.miner.scorer.device),
            "torch_threads": torch.get_num_threads(),
        }

    def ready(self) -> dict[str, Any]:
        return self.info

    def mine(self, shard_id: int, rows: pa.Table, root: str, attempt: int) -> ShardOutput:
        t0 = time.perf_counter()
        result = self.miner.mine(rows, root)
        return ShardOutput(
            shard_id=shard_id,
            attempt=attempt,
            pairs=result.pairs,
            status=result.status,
            stage_s={k: round(v, 4) for k, v in result.seconds.items()},
            mine_s=round(time.perf_counter() - t0, 4),
            n_images=len(set(rows.column("image_id").to_pylist())),
            worker=self.info,
            peak_rss_mb=round(peak_rss_mb(), 1),
        )


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


# ---------------------------------------------------------------------------------------------- the pool


@dataclass(frozen=True)
class ShardEvent:
    """kind: "done" (accepted), "retry" (this attempt failed, another is queued) or "failed" (final)."""

    kind: str
    shard_id: int
    attempt: int
    output: ShardOutput | None = None
    accepted: Any = None  # what `accept` returned (the flow's CommitResult)
    error: str | None = None
    round_trip_s: float = 0.0  # submit -> result seen by the driver, excluding `accept`


def describe_error(exc: BaseException) -> str:
    """One line naming the root cause of a Ray error (not Ray's multi-page traceback)."""
    if isinstance(exc, RayTaskError) and exc.cause is not None:
        cause = exc.cause
        return f"{type(cause).__name__}: {cause}".splitlines()[0]
    if isinstance(exc, RayActorError):
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        # A constructor error ends with "ExceptionType: message" after the traceback
        causes = [ln for ln in lines if not ln.startswith(("File ", "Traceback", "^", "~")) and ": " in ln]
        return f"worker died ({type(exc).__name__}): {causes[-1] if causes else lines[0] if lines else ''}"
    return "".join(traceback.format_exception_only(type(exc), exc)).strip().splitlines()[-1]


@dataclass
class _Slot:
    actor: Any
    index: int
    info: dict[str, Any] = field(default_factory=dict)


class ShardPool:
    """A fixed-size pool of ShardMiner actors; use as a context manager (actors are killed on exit).

    actor_cls: ShardMiner or a subclass (tests inject faults with one; production code has no hooks).
    """

    def __init__(
        self,
        config: dict[str, Any],
        plan: PoolPlan,
        start_timeout_s: float = 600.0,
        actor_cls: type[ShardMiner] = ShardMiner,
    ):
        self.config = config
        self.plan = plan
        self.start_timeout_s = start_timeout_s
        self._remote = ray.remote(actor_cls).options(
            num_cpus=plan.cpus_per_worker, num_gpus=plan.gpus_per_worker, max_restarts=0, max_task_retries=0
        )
        self._slots: list[_Slot] = []
        self._spawned = 0
        self._loading: dict[Any, _Slot] = {}  # ready() refs of actors spawned but not yet waited for
        self._spawned_at: float | None = None
        self.start_s = 0.0

    def _spawn(self) -> _Slot:
        threads = max(1, int(self.plan.cpus_per_worker))
        slot = _Slot(self._remote.remote(self.config, threads), self._spawned)
        self._spawned += 1
        return slot

    def spawn(self) -> ShardPool:
        """Create the actors without waiting: each imports torch and loads its models in its own process
        while the caller goes on (the CLI starts the Prefect server meanwhile). `start` waits for them."""
        if self._spawned_at is None:
            self._spawned_at = time.perf_counter()
            for _ in range(self.plan.n_workers):
                slot = self._spawn()
                self._loading[slot.actor.ready.remote()] = slot
        return self

    def start(self, respawns_per_worker: int = 2) -> list[dict[str, Any]]:
        """Start the actors (unless `spawn` did) and wait until they loaded their models; WorkerStartError
        if none did.

        An actor that dies while starting (killed, OOM, a lost node) is replaced, up to
        `respawns_per_worker` times per worker; one that does not start in `start_timeout_s` is not.
        `start_s` counts from the spawn.
        """
        self.spawn()
        assert self._spawned_at is not None
        t0 = self._spawned_at
        respawns = self.plan.n_workers * respawns_per_worker
        waiting = self._loading  # the same dict: what is still loading stays visible to close()
        errors: list[str] = []
        while waiting:
            remaining = self.start_timeout_s - (time.perf_counter() - t0)
            ready, _ = ray.wait(list(waiting), num_returns=1, timeout=max(0.0, remaining))
            if not ready:  # start-up timeout: give up on every actor still loading
                for slot in waiting.values():
                    errors.append(
                        f"worker {slot.index}: not started after {self.start_timeout_s:.0f}s (resources busy?)"
                    )
                    ray.kill(slot.actor, no_restart=True)
                waiting.clear()
                break
            slot = waiting.pop(ready[0])
            try:
                slot.info = ray.get(ready[0])
            except (RayActorError, RayTaskError) as exc:
                errors.append(f"worker {slot.index}: {describe_error(exc)}")
                if respawns > 0:
                    respawns -= 1
                    fresh = self._spawn()
                    waiting[fresh.actor.ready.remote()] = fresh
                continue
            except BaseException:  # anything else (a lost object, Ctrl-C): this actor must not outlive us
                ray.kill(slot.actor, no_restart=True)
                raise
            self._slots.append(slot)
        self.start_s = time.perf_counter() - t0
        if not self._slots:
            raise WorkerStartError(f"no mining worker could start: {'; '.join(errors)}")
        return [slot.info for slot in self._slots]

    def close(self) -> None:
        for slot in [*self._slots, *self._loading.values()]:
            ray.kill(slot.actor, no_restart=True)
        self._slots, self._loading = [], {}

    def start_infos(self) -> list[dict[str, Any]]:
        """The live actors' info (host, pid, device, torch threads)."""
        return [slot.info for slot in self._slots]

    def __enter__(self) -> ShardPool:
        try:
            self.start()
        except BaseException:  # no __exit__ follows a failed __enter__: end the actors here
            self.close()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def run(
        self,
        shard_ids: Iterable[int],
        rows_for: Callable[[int], pa.Table],
        root: str,
        accept: Callable[[ShardOutput], Any],
        max_retries: int = 2,
        tasks_per_worker: int = 2,
        shard_timeout_s: float | None = None,
    ) -> Iterator[ShardEvent]:
        """Mine every shard; yields one event per finished attempt, in completion order.

        rows_for(shard_id) is called on the driver right before dispatch (rows travel with the call, so
        workers need the image root but not the manifest). accept(output) runs on the driver; if it
        raises, the attempt counts as failed. Each shard gets 1 + max_retries attempts. Each actor has
        up to `tasks_per_worker` shards queued, so it never idles while the driver commits.
        shard_timeout_s: an attempt unfinished `shard_timeout_s x tasks_per_worker` after dispatch (the
        actor's earlier queued shards count in: set it well above them) gets its actor killed; the
        dead-actor path then replaces the actor and retries the shard, so one hung worker cannot stall
        the run.
        A replacement actor gets shards only once it has started: after a node is lost the cluster may
        have no room for it (the survivors hold every slot), and shards queued on an actor that is never
        placed would wait forever while the survivors idle. If no shard is in flight and no replacement
        starts within `start_timeout_s`, the remaining shards fail.
        """
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        queue = deque((sid, 1) for sid in shard_ids)
        depth = max(1, tasks_per_worker)
        free = deque(slot for _ in range(depth) for slot in self._slots)  # one entry per free queue place
        dead: set[int] = set()
        timed_out: set[int] = set()
        in_flight: dict[Any, tuple[_Slot, int, int, float]] = {}
        starting: dict[Any, _Slot] = {}  # replacements' ready() refs: they join `free` once started
        respawn_budget = len(self._slots) * (max_retries + 1)  # dead actors replaced at most this often
        stalled_since: float | None = None  # when the last shard in flight finished with shards left

        def replace() -> None:
            nonlocal respawn_budget
            if respawn_budget > 0:
                respawn_budget -= 1
                fresh = self._spawn()
                self._slots.append(fresh)
                starting[fresh.actor.ready.remote()] = fresh

        while queue or in_flight:
            while queue and free:
                slot = free.popleft()
                if slot.index in dead:
                    continue
                sid, attempt = queue.popleft()
                ref = slot.actor.mine.remote(sid, rows_for(sid), root, attempt)
                in_flight[ref] = (slot, sid, attempt, time.perf_counter())
            if in_flight:
                stalled_since = None
            elif starting:  # only replacements can mine the rest: wait for one, but not forever
                stalled_since = stalled_since or time.perf_counter()
                if time.perf_counter() - stalled_since > self.start_timeout_s:
                    for fresh in starting.values():
                        ray.kill(fresh.actor, no_restart=True)
                        self._slots.remove(fresh)
                    starting.clear()
                    reason = (
                        f"no mining worker left: replacements not started after {self.start_timeout_s:.0f}s"
                    )
                    while queue:
                        sid, attempt = queue.popleft()
                        yield ShardEvent("failed", sid, attempt, error=reason)
                    break
            else:  # shards left but every actor died and none may be replaced
                while queue:
                    sid, attempt = queue.popleft()
                    yield ShardEvent("failed", sid, attempt, error="no live mining worker left")
                break

            waiting = list(in_flight) + list(starting)
            ready, _ = ray.wait(waiting, num_returns=1, timeout=1.0 if shard_timeout_s or starting else None)
            if not ready:  # a tick (watchdog, start-up wait); nothing finished
                if shard_timeout_s:  # kill actors whose shard is overdue; their calls then fail below
                    now = time.perf_counter()
                    for overdue_slot, _, _, t_sent in list(in_flight.values()):
                        if overdue_slot.index not in timed_out and now - t_sent > shard_timeout_s * depth:
                            timed_out.add(overdue_slot.index)
                            ray.kill(overdue_slot.actor, no_restart=True)
                continue
            ref = ready[0]
            if ref in starting:
                fresh = starting.pop(ref)
                try:
                    fresh.info = ray.get(ref)
                except (RayActorError, RayTaskError):  # died while starting: its place is offered again
                    self._slots.remove(fresh)
                    replace()
                else:
                    free.extend([fresh] * depth)
                continue
            slot, sid, attempt, t_submit = in_flight.pop(ref)
            error = None
            try:
                output: ShardOutput = ray.get(ref)
            except RayActorError as exc:
                error = describe_error(exc)
                if slot.index in timed_out:
                    error = f"timed out (over {shard_timeout_s:g}s per shard); worker killed: {error}"
                if slot.index not in dead:  # its other queued shard fails the same way: replace once
                    dead.add(slot.index)
                    self._slots.remove(slot)
                    # ActorUnavailableError may be a transient RPC failure: make sure the actor is gone
                    # rather than left running, unreachable from the pool, on a slot it still holds
                    ray.kill(slot.actor, no_restart=True)
                    replace()
            except (ObjectLostError, NodeDiedError) as exc:
                # A lost node, seen from the call's result rather than the actor: the output was lost
                # with the node's object store before the driver fetched it (the shard was mined), or the
                # node died under the call. If the actor went with it, its next call fails as dead above
                error = f"output lost: {describe_error(exc)}"
                free.append(slot)
            except RayTaskError as exc:
                error = describe_error(exc)
                free.append(slot)
            else:
                free.append(slot)
                round_trip = time.perf_counter() - t_submit
                try:
                    accepted = accept(output)
                except Exception as exc:
                    error = f"commit on the driver failed: {type(exc).__name__}: {exc}"
                else:
                    yield ShardEvent("done", sid, attempt, output, accepted, round_trip_s=round_trip)
                    continue
            if attempt <= max_retries:
                queue.append((sid, attempt + 1))
                yield ShardEvent("retry", sid, attempt, error=error)
            else:
                yield ShardEvent("failed", sid, attempt, error=error)


__all__ = [
    "PoolPlan",
    "ShardEvent",
    "ShardMiner",
    "ShardOutput",
    "ShardPool",
    "WorkerStartError",
    "connect_ray",
    "ray_session",
    "describe_error",
    "local_cpu_count",
    "plan_pool",
]
