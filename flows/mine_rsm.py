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

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import ray
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE as NO_CACHE
from prefect.states import Failed, State

from flows.env import apply_offline_defaults
from flows.options import (
    MineOptions,
    MineParams,
    PreflightError,
    add_param_arguments,
    build_options,
    param_defaults,
)
from flows.ray_workers import (
    ShardEvent,
    ShardMiner,
    ShardOutput,
    ShardPool,
    WorkerStartError,
    connect_ray,
    plan_pool,
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
)
from miners.run_config import run_config_for
from qa.config import INJECT_MODES, ReportConfig
from storage.plan import RunPlan, load_shard_rows, plan_shards, read_sorted_manifest
from storage.shards import (
    RunConflictError,
    ShardStoreError,
    begin_run,
    commit_shard,
    finalize_run,
)


class ShardsFailedError(RuntimeError):
    """Some shards failed after all retries; the committed ones stay committed (a rerun resumes)."""


# ---------------------------------------------------------------------------------------------- stages


def prepare_run(opts: MineOptions) -> tuple[RunPlan, list[int]]:
    """Plan the shards and create or resume the output folder; returns (plan, pending shard ids)."""
    plan = plan_shards(opts.manifest, opts.shard_size, run_config_for(opts.config).to_dict())
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
    started_ray = connect_ray(opts.ray_address)
    try:
        report.ray_start_s = time.perf_counter() - t0
        pool_plan = plan_pool(len(pending), ray.cluster_resources(), opts.max_workers, opts.gpus_per_worker)
        report.pool_reason = f"{pool_plan.n_workers} worker(s): {pool_plan.reason}"
        # Read and sort once; load_shard_rows slices (and checks) each shard's rows out of it
        manifest = read_sorted_manifest(plan.manifest_path)
        progress = Progress(n_done=len(plan.shards) - len(pending), n_total=len(plan.shards))
        worker_config = asdict(opts.config)
        with ShardPool(worker_config, pool_plan, actor_cls=actor_cls) as pool:
            report.workers, report.workers_start_s = pool.start_infos(), pool.start_s
            progress.started = t_fanout = time.perf_counter()
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
    finally:
        if started_ray:
            ray.shutdown()
    return report


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
    summary = mine_and_report(opts, params, reporters, stage=_as_task)
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

            summary["qa_report"] = stage(
                "qa-report", build_report, opts.out, params.qa_out, params.manifest, qa_cfg
            )
    if "qa_report" in summary:
        summary["qa"] = qa_headline(summary["qa_report"])
    return summary


# ---------------------------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m flows.mine_rsm", description=__doc__.split("\n\n")[0])
    add_param_arguments(p)
    p.add_argument("--no-prefect", action="store_true", help="run the same pipeline without Prefect")
    p.add_argument(
        "--debug", action="store_true", help="keep Python tracebacks (default: one line per error)"
    )
    return p.parse_args(argv)


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
    try:
        opts = build_options(params)  # fail fast, before a Prefect API or Ray starts
        if no_prefect:
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
            reporters = [LogReporter(logging.getLogger("mine-rsm")), TqdmReporter()]
            summary = mine_and_report(opts, params, reporters)
            summary.pop("qa_report", None)
        else:
            summary = mine_rsm(**(values | {"progress_bar": True}))
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
    if "qa" in summary:
        print(
            f"QA report in {qa_out}: "
            + ", ".join(f"{k}={_rounded(v)}" for k, v in summary["qa"].items() if v is not None)
        )
    return 0


def _rounded(value: Any) -> Any:
    """Figures for people: 3 significant digits (qa.json keeps full precision)."""
    return float(f"{value:.3g}") if isinstance(value, float) else value


if __name__ == "__main__":
    raise SystemExit(main())
