"""The `mine-rsm` Prefect flow and its CLI: plan shards → fan out on Ray → commit on the driver → report.

Consumes a manifest Parquet (`python -m storage.manifest`), a CLIP `from_pretrained` folder and the RSM
options; produces the exactly-once shard folder of `storage.shards` (pairs/status shards, stats files,
`_SUCCESS`) and a summary dict (also Prefect markdown + table artifacts, and a progress artifact updated
as shards commit). Resume is built in: a rerun with the same manifest, config and shard size mines only
the shards that are not committed; a changed config is refused (RunConflictError). Shards that still
fail after `max_retries` retries make the run fail at the end, naming them; the others stay committed.

    python -m flows.mine_rsm --manifest M --out DIR --clip-model CLIP_DIR [--proposer prior] [--no-prefect]

The pipeline is plain functions (`run_mining`); the flow only wraps its stages as Prefect tasks and adds
artifacts, and `--no-prefect` runs the same functions without a Prefect API.
"""

from __future__ import annotations

import sys

# `--help` answers before the imports below (Prefect and Ray: about a second of the command's start)
if __name__ == "__main__" and {"-h", "--help"} & set(sys.argv[1:]):
    from flows.options import cli_parser

    cli_parser(__doc__.split("\n\n")[0]).parse_args()  # prints the help and exits

import argparse
import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import ray
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE as NO_CACHE
from prefect.exceptions import FailedRun
from prefect.states import Failed, State

from flows.env import apply_offline_defaults
from flows.options import (
    MineOptions,
    MineParams,
    PreflightError,
    build_options,
    cli_parser,
    param_defaults,
    round_out,
)
from flows.ray_workers import (
    ShardEvent,
    ShardMiner,
    ShardOutput,
    ShardPool,
    WorkerStartError,
    plan_pool,
    ray_session,
)
from flows.reporting import (
    ArtifactReporter,
    LogReporter,
    MiningReport,
    Progress,
    Reporter,
    TqdmReporter,
    failure_message,
    publish_qa_artifacts,
    qa_headline,
    summarize,
    vocabulary_line,
)
from flows.startup import CLOCK, StartupError, TemporaryPrefectServer, prefect_api_url
from miners.run_config import run_config_for
from qa.config import INJECT_MODES, ReportConfig
from storage.plan import RunPlan, load_shard_rows, plan_shards, read_sorted_manifest
from storage.shards import (
    RUN_FILE,
    RunConflictError,
    ShardStoreError,
    begin_run,
    commit_shard,
    finalize_run,
    load_run_plan,
    pending_shards,
)

# Progress lines of a command's phases: shown with --no-prefect (main configures INFO logging); a flow
# run's own logger carries the per-shard lines there
_LOG = logging.getLogger("mine-rsm")


class ShardsFailedError(RuntimeError):
    """Some shards failed after all retries; the committed ones stay committed (a rerun resumes)."""


# ---------------------------------------------------------------------------------------------- stages


_PLANS: dict[tuple, RunPlan] = {}


def plan_for(opts: MineOptions) -> RunPlan:
    """The shard plan of `opts` (memoised per manifest file state, shard size and config: the CLI plans
    once to size the workers it starts early, and the run reuses that plan; 2.4 s at 1M rows)."""
    config = run_config_for(opts.config).to_dict()
    stat = Path(opts.manifest).stat()
    key = (
        str(Path(opts.manifest).resolve()),
        stat.st_mtime_ns,
        stat.st_size,
        opts.shard_size,
        json.dumps(config, sort_keys=True),
    )
    if key not in _PLANS:
        _PLANS.clear()  # one entry is all a command needs
        _PLANS[key] = plan_shards(opts.manifest, opts.shard_size, config)
    return _PLANS[key]


def prepare_run(opts: MineOptions) -> tuple[RunPlan, list[int]]:
    """Plan the shards and create or resume the output folder; returns (plan, pending shard ids)."""
    plan = plan_for(opts)
    if plan.manifest_root is None:
        raise ValueError(f"{opts.manifest}: no rsm.root in its metadata; re-import it with storage.manifest")
    return plan, begin_run(opts.out, plan)


def commit_output(opts: MineOptions, plan: RunPlan, output: ShardOutput):
    """Commit one worker output on the driver (idempotent: a re-run attempt is absorbed)."""
    stats = {"attempt": output.attempt, "mine_s": output.mine_s, "stage_s": output.stage_s}
    stats |= {"n_images": output.n_images, "worker": output.worker, "peak_rss_mb": output.peak_rss_mb}
    return commit_shard(opts.out, plan, output.shard_id, output.pairs, output.status, stats=stats)


def mine_pending(
    opts: MineOptions,
    plan: RunPlan,
    pending: list[int],
    on_event: Callable[[ShardEvent, Progress], None],
    actor_cls: type[ShardMiner] = ShardMiner,
) -> MiningReport:
    """Fan the pending shards out on a pool of Ray actors and commit each result as it arrives.
    `actor_cls`: the actor class (tests pass a ShardMiner subclass that injects faults)."""
    report = MiningReport()
    t0 = time.perf_counter()
    with ray_session(opts.ray_address):  # a no-op when the CLI or the flow started Ray already
        report.ray_start_s = time.perf_counter() - t0
        worker_config = asdict(opts.config)
        # Read and sort once; load_shard_rows slices (and checks) each shard's rows out of it
        manifest = read_sorted_manifest(plan.manifest_path)
        progress = Progress(n_done=len(plan.shards) - len(pending), n_total=len(plan.shards))
        pool = take_warm_pool(worker_config, actor_cls)  # taken right before `with`: nothing can leak it
        if pool is None:
            pool_plan = plan_pool(
                len(pending), ray.cluster_resources(), opts.max_workers, opts.gpus_per_worker
            )
            pool = ShardPool(worker_config, pool_plan, actor_cls=actor_cls)
        report.pool_reason = f"{pool.plan.n_workers} worker(s): {pool.plan.reason}"
        with pool:
            CLOCK.mark("workers_ready")
            _LOG.info(
                f"{pool.plan.n_workers} worker(s) ready; mining {len(pending)} shard(s) "
                f"({progress.n_done}/{progress.n_total} committed so far), a line per committed shard"
            )
            report.workers, report.workers_start_s = pool.start_infos(), pool.start_s
            progress.started = t_fanout = time.perf_counter()
            CLOCK.mark("first_shard")
            events = pool.run(
                pending,
                rows_for=lambda sid: load_shard_rows(plan, sid, manifest),
                root=str(plan.manifest_root),
                accept=lambda output: commit_output(opts, plan, output),
                max_retries=opts.max_retries,
                shard_timeout_s=opts.shard_timeout_s,
            )
            for event in events:
                if event.kind == "done":
                    report.done[event.shard_id] = event
                    report.images += event.output.n_images
                    progress.n_done += 1
                    progress.images += event.output.n_images
                elif event.kind == "failed":
                    report.failed[event.shard_id] = event.error or "unknown error"
                on_event(event, progress)
            report.fanout_s = time.perf_counter() - t_fanout
    return report


# ---------------------------------------------------------------------------------------------- warm start

# Workers spawned by the CLI before the flow runs (they load their models while Prefect's server starts);
# the first mining call with the same config takes them. One process, one command: a module-level slot.
_WARM: dict[str, Any] = {}


def prestart_workers(opts: MineOptions) -> ShardPool | None:
    """Spawn the actors the first mining call of `opts` will need (round 0 when `rounds` > 0), without
    waiting for them. None when that call has nothing to mine or its folder holds another run (the run
    then says so itself). Needs Ray connected."""
    first = Path(round_out(opts, 0)) if opts.rounds else Path(opts.out)
    plan = plan_for(opts)
    if (first / RUN_FILE).is_file():
        try:
            if load_run_plan(first).run_id != plan.run_id:
                return None  # another run's folder: refused with its message when the run begins
            n_pending = len(pending_shards(first, plan, check_hash=False))
        except Exception:  # unreadable: the run's own start says what is wrong
            return None
    else:
        n_pending = len(plan.shards)
    if n_pending == 0:
        return None
    pool_plan = plan_pool(n_pending, ray.cluster_resources(), opts.max_workers, opts.gpus_per_worker)
    pool = ShardPool(asdict(opts.config), pool_plan).spawn()
    _WARM.update(pool=pool, config=asdict(opts.config))
    return pool


def take_warm_pool(config: dict[str, Any], actor_cls: type[ShardMiner]) -> ShardPool | None:
    """The prestarted pool when it was made for this config and actor class; else None (and a warm pool
    made for something else is closed)."""
    pool = _WARM.pop("pool", None)
    made_for = _WARM.pop("config", None)
    if pool is None:
        return None
    if made_for == config and actor_cls is ShardMiner:
        return pool
    pool.close()
    return None


def discard_warm_pool() -> None:
    pool = _WARM.pop("pool", None)
    _WARM.clear()
    if pool is not None:
        pool.close()


@contextmanager
def command_services(opts: MineOptions, use_prefect: bool) -> Iterator[None]:
    """Everything a mining command waits on, started side by side: Prefect's temporary API server (unless
    PREFECT_API_URL names a running one) in a background thread, while Ray starts and the first round's
    workers are spawned to load their models. Ray stays up for every round of the command. StartupError
    (one line) when something did not start in its limit after its retries."""
    server = TemporaryPrefectServer().begin() if use_prefect and prefect_api_url() is None else None
    _LOG.info("starting Ray" + (" and Prefect's temporary API server" if server is not None else ""))
    with ray_session(opts.ray_address):
        CLOCK.mark("ray_ready")
        try:
            pool = prestart_workers(opts)
            if pool is not None:
                _LOG.info(
                    f"Ray up; {pool.plan.n_workers} worker(s) loading the CLIP model while the run is planned"
                )
            if server is not None:
                server.wait()
                CLOCK.mark("prefect_ready")
            yield
        finally:
            discard_warm_pool()  # before Ray shuts down: a handle used after it would start another Ray


# ---------------------------------------------------------------------------------------------- pipeline


def _direct(name: str, fn: Callable, *args: Any) -> Any:
    return fn(*args)


def _as_task(name: str, fn: Callable, *args: Any) -> Any:
    # No caching and no result persistence: the shard folder is the result, and resume is its job
    return task(fn, name=name, cache_policy=NO_CACHE, persist_result=False)(*args)


def run_mining(
    opts: MineOptions,
    reporters: list[Reporter] | None = None,
    stage: Callable[..., Any] = _direct,
    actor_cls: type[ShardMiner] = ShardMiner,
) -> dict[str, Any]:
    """plan → begin/resume → mine pending shards on Ray (commit each) → finalize → summary.

    stage(name, fn, *args) runs each step (directly, or as a Prefect task in the flow). Raises
    RunConflictError before mining if OUT holds another run, ShardsFailedError after reporting if
    some shards failed every attempt.
    """
    reporters = reporters or []
    t0 = time.perf_counter()
    plan, pending = stage("plan-shards", prepare_run, opts)
    for reporter in reporters:
        reporter.on_plan(plan, pending)

    def on_event(event: ShardEvent, progress: Progress) -> None:
        for reporter in reporters:
            reporter.on_event(event, progress)

    report = (
        stage("mine-shards", mine_pending, opts, plan, pending, on_event, actor_cls)
        if pending
        else MiningReport()
    )
    if not report.failed:
        stage("finalize-run", finalize_run, opts.out, plan)
    summary = summarize(opts, plan, report, time.perf_counter() - t0)
    for reporter in reporters:
        reporter.on_summary(summary)
    if report.failed:
        raise ShardsFailedError(failure_message(summary))
    return summary


_D = param_defaults()


# The parameters are MineParams' fields with its defaults (Prefect builds the deployment's parameter
# schema from this signature; tests/flows/test_options.py holds the two to each other).
@flow(name="mine-rsm", description="RSM region-sentence mining: plan shards, fan out on Ray, commit, report")
def mine_rsm(
    manifest: str,
    out: str,
    clip_model: str | None = _D["clip_model"],
    calibrator: str | None = _D["calibrator"],
    proposer: str = _D["proposer"],
    sam_checkpoint: str | None = _D["sam_checkpoint"],
    sam_model_type: str = _D["sam_model_type"],
    crop_mode: str = _D["crop_mode"],
    match_mode: str = _D["match_mode"],
    images_per_batch: int = _D["images_per_batch"],
    max_batch_pixels: int = _D["max_batch_pixels"],
    shard_size: int = _D["shard_size"],
    ray_address: str | None = _D["ray_address"],
    max_workers: int | None = _D["max_workers"],
    gpus_per_worker: float = _D["gpus_per_worker"],
    max_retries: int = _D["max_retries"],
    shard_timeout_s: float | None = _D["shard_timeout_s"],
    rounds: int = _D["rounds"],
    refine_epochs: int = _D["refine_epochs"],
    calibration_manifest: str | None = _D["calibration_manifest"],
    qa_out: str | None = _D["qa_out"],
    qa_inject_noise: float | None = _D["qa_inject_noise"],
    progress_bar: bool = _D["progress_bar"],
) -> dict[str, Any] | State:
    """Mine MANIFEST into the shard folder OUT (resuming it), then, with `qa_out`, write the QA report
    there and publish its summary as artifacts. Parameters: see flows/options.py (MineParams). Bad
    parameters end the run Failed, its message listing every problem with its fix."""
    params = MineParams(**locals())
    CLOCK.mark("flow_run")
    log = get_run_logger()
    try:
        opts = build_options(params)
    except PreflightError as exc:
        # A deployment's whole answer to bad parameters: one log line (what `prefect deployment run
        # --watch` streams) and the run's state message, instead of two engine tracebacks in the
        # worker's terminal and a bare "Failed" on the user's
        log.error(f"preflight: {exc}")
        quiet_tracebacks()  # the engine then logs "exited with unexpected exception" as a line, no frames
        return Failed(message=f"preflight: {exc}")
    reporters: list[Reporter] = [LogReporter(log), ArtifactReporter()]
    if params.progress_bar:
        reporters.append(TqdmReporter())
    try:
        # Ray for every round (a deployment's flow run starts it here; the CLI has already)
        with ray_session(opts.ray_address):
            summary = mine_and_report(opts, params, reporters, stage=_as_task)
    except StartupError as exc:  # one line, like a preflight failure
        log.error(f"start-up: {exc}")
        quiet_tracebacks()
        return Failed(message=f"start-up: {exc}")
    if "qa_report" in summary:
        publish_qa_artifacts(summary.pop("qa_report"))
    return summary


def qa_config(params: MineParams) -> ReportConfig:
    """The flow's QA settings: with `qa_inject_noise`, every injection mode."""
    if params.qa_inject_noise is None:
        return ReportConfig()
    return ReportConfig(inject_noise=params.qa_inject_noise, inject_modes=INJECT_MODES)


def mine_and_report(
    opts: MineOptions, params: MineParams, reporters: list[Reporter], stage: Callable[..., Any] = _direct
) -> dict[str, Any]:
    """Mine (every round, when `rounds` > 0) and, with `qa_out`, write the QA report(s); the summary
    carries `qa` (headline figures) and `qa_report` (the whole qa.json dict) when a report was made."""
    qa_cfg = qa_config(params)
    if opts.rounds:
        # Imported only when used: refinement (torch) and the QA report (matplotlib, polars) would add
        # seconds to the start-up of every run, most of which need neither
        from flows.rounds import run_rounds

        summary = run_rounds(
            opts,
            lambda o: run_mining(o, reporters, stage=stage),
            stage=stage,
            qa_out=params.qa_out,
            qa_cfg=qa_cfg,
            manifest=params.manifest,
        )
        if params.qa_out:
            summary["qa_report"] = json.loads((Path(params.qa_out) / "qa.json").read_text())
    else:
        summary = run_mining(opts, reporters, stage=stage)
        if params.qa_out:
            from qa.report import build_report

            _LOG.info(f"writing the QA report into {params.qa_out} (qa.report's lines follow)")
            summary["qa_report"] = stage(
                "qa-report", build_report, opts.out, params.qa_out, params.manifest, qa_cfg
            )
    if "qa_report" in summary:
        summary["qa"] = qa_headline(summary["qa_report"])
    return summary


# ---------------------------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return cli_parser(__doc__.split("\n\n")[0]).parse_args(argv)


class _NoTraceback(logging.Filter):
    """Drops the traceback from Prefect's task/flow-run error records: the CLI prints the error as one line
    (a RunConflictError came with ~60 lines of Prefect engine frames). `--debug` keeps them."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info = None
        record.exc_text = None
        return True


def quiet_tracebacks() -> None:
    for name in ("prefect.task_runs", "prefect.flow_runs"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _NoTraceback) for f in log.filters):  # once, however often called
            log.addFilter(_NoTraceback())


def main(argv: list[str] | None = None) -> int:
    apply_offline_defaults()
    args = parse_args(argv)
    values = vars(args)
    no_prefect = values.pop("no_prefect")
    debug = values.pop("debug")
    if not debug:
        quiet_tracebacks()
    params = MineParams(**values)
    qa_out = params.qa_out
    if not _launched_as_command():
        CLOCK.reset()  # called from another program (the demo, tests): count from this call
    try:
        opts = build_options(params)  # fail fast, before a Prefect API or Ray starts
        CLOCK.mark("driver_ready")
        if no_prefect:  # progress lines from the start (Ray and the workers' model loading take seconds)
            show_progress_lines()
        with command_services(opts, use_prefect=not no_prefect):
            if no_prefect:
                reporters = [LogReporter(logging.getLogger("mine-rsm")), TqdmReporter()]
                summary = mine_and_report(opts, params, reporters)
                summary.pop("qa_report", None)
            else:
                summary = mine_rsm(**(values | {"progress_bar": True}))
    except FailedRun as exc:  # the flow ended Failed with its one-line message (preflight or start-up)
        print(f"error: {exc}", file=sys.stderr)
        if debug:
            raise
        return 3 if str(exc).startswith("start-up") else 2
    except StartupError as exc:  # rc 3: something did not start; a rerun may succeed
        print(f"error: {exc}", file=sys.stderr)
        if debug:
            raise
        return 3
    except ShardsFailedError as exc:  # rc 1: a rerun resumes (and may succeed)
        print(f"error: {exc}", file=sys.stderr)
        if debug:
            raise
        return 1
    except (RunConflictError, ShardStoreError, WorkerStartError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)  # rc 2: refused; change the arguments or the folder
        if debug:
            raise
        return 2
    print(
        f"{summary['out']}: {summary['shards_committed']}/{summary['n_shards']} shards "
        f"({summary['shards_mined_now']} mined now), "
        f"{summary['ok_rows']} ok rows + {summary['mining_error_rows']} rows with mining errors, {summary['pairs']} pairs "
        f"({summary['kept_pairs']} kept), "
        + (
            f"{summary['images_per_s']} images/s"
            if summary.get("images_per_s") is not None
            else "nothing left to mine (already committed)"
        )
        + f", {summary['wall_s']}s"
    )
    print(f"caption vocabulary: {vocabulary_line(summary)}")
    print(startup_line(CLOCK.summary()))
    if "qa" in summary:
        print(
            f"QA report in {qa_out}: "
            + ", ".join(f"{k}={_rounded(v)}" for k, v in summary["qa"].items() if v is not None)
        )
    return 0


def show_progress_lines() -> None:
    """The `mine-rsm` logger's INFO lines on stderr. Its own handler: importing Prefect gives the root
    logger a WARNING-level handler, so `logging.basicConfig` did nothing and the command was silent."""
    log = logging.getLogger("mine-rsm")
    for handler in list(log.handlers):  # once per call of main (tests call it repeatedly)
        log.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def _launched_as_command() -> bool:
    """True in `python -m flows.mine_rsm` (the clock then counts from the process start, imports included)."""
    return __name__ == "__main__"


# The start-up phases, in the order a command reaches them, and what each line word means
STARTUP_PHASES = {
    "driver_ready": "driver",  # imports + preflight
    "ray_ready": "ray",  # the local head node up (or the cluster connected)
    "prefect_ready": "prefect",  # the temporary API server answering (absent with PREFECT_API_URL/--no-prefect)
    "flow_run": "flow_run",  # the flow run begun (absent with --no-prefect)
    "workers_ready": "workers",  # every worker of the first round loaded its models
    "first_shard": "first_shard",  # workers loaded, the first shard sent
}


def startup_line(marks: dict[str, float]) -> str:
    """'start-up 9.1 s to the first shard (seconds since the command started: driver 1.7, ray 5.2, ...)'."""
    parts = ", ".join(f"{word} {marks[key]:.1f}" for key, word in STARTUP_PHASES.items() if key in marks)
    if "first_shard" not in marks:
        return f"start-up: no shard mined now (seconds since the command started: {parts})"
    return f"start-up {marks['first_shard']:.1f} s to the first shard (seconds since the command started: {parts})"


def _rounded(value: Any) -> Any:
    """Figures for people: 3 significant digits (qa.json keeps full precision)."""
    return float(f"{value:.3g}") if isinstance(value, float) else value


if __name__ == "__main__":
    raise SystemExit(main())
