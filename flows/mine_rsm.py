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
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import ray
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE as NO_CACHE

from flows.env import apply_offline_defaults
from flows.ray_workers import ShardEvent, ShardOutput, ShardPool, WorkerStartError, connect_ray, plan_pool
from flows.reporting import (
    ArtifactReporter,
    LogReporter,
    Reporter,
    TqdmReporter,
    failure_message,
    publish_qa_artifacts,
    qa_headline,
    summarize,
)
from miners.clip_scorer import CROP_MODES, model_fingerprint
from miners.matching import MATCH_MODES, MatchConfig
from miners.regions import PROPOSER_NAMES
from miners.rsm import RSMConfig, calibrator_fingerprint
from qa.report import build_report
from storage.plan import SORT_KEYS, RunPlan, load_shard_rows, plan_shards, read_manifest_table
from storage.shards import (
    RunConflictError,
    ShardStoreError,
    begin_run,
    commit_shard,
    finalize_run,
)

CLIP_MODEL_HINT = (
    "pass --clip-model DIR (a CLIP folder saved with save_pretrained); `make demo` bootstraps a tiny one "
    "in outputs/demo/models/tiny-clip"
)
RUNTIME_KEYS = ("device", "images_per_batch")  # change speed, not output: not part of the run's identity


class ShardsFailedError(RuntimeError):
    """Some shards failed after all retries; the committed ones stay committed (a rerun resumes)."""


# ---------------------------------------------------------------------------------------------- options


@dataclass(frozen=True)
class MineOptions:
    manifest: str
    out: str
    config: RSMConfig
    shard_size: int = 256
    ray_address: str | None = None  # else $RAY_ADDRESS, else a local Ray
    max_workers: int | None = None
    gpus_per_worker: float = 1.0  # used when Ray reports GPUs; a fraction packs actors on one GPU
    max_retries: int = 2
    shard_timeout_s: float | None = None  # a worker stuck this long on one shard is killed and replaced
    fail_shards: tuple[int, ...] = ()  # test hook: these shards' workers raise on every attempt

    def __post_init__(self) -> None:
        if not isinstance(self.shard_size, int) or self.shard_size < 1:
            raise ValueError(f"shard_size must be a positive integer, got {self.shard_size!r}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
        if self.shard_timeout_s is not None and self.shard_timeout_s <= 0:
            raise ValueError(f"shard_timeout_s must be > 0 (or unset), got {self.shard_timeout_s}")
        if self.max_workers is not None and self.max_workers < 1:
            raise ValueError(f"max_workers must be >= 1 (or unset), got {self.max_workers}")
        if self.gpus_per_worker < 0:
            raise ValueError(f"gpus_per_worker must be >= 0, got {self.gpus_per_worker}")
        if self.config.images_per_batch < 1:
            raise ValueError(f"images_per_batch must be >= 1, got {self.config.images_per_batch}")


def build_options(
    manifest: str,
    out: str,
    proposer: str = "prior",
    clip_model: str | None = None,
    sam_checkpoint: str | None = None,
    sam_model_type: str = "vit_b",
    crop_mode: str = "box",
    match_mode: str = "combined",
    images_per_batch: int = 32,
    **run: Any,
) -> MineOptions:
    """Validate parameters up front (before Ray or Prefect do any work) and resolve paths."""
    if clip_model is None:
        raise ValueError(f"no CLIP model given: {CLIP_MODEL_HINT}")
    clip_dir = Path(clip_model).resolve()
    if not (clip_dir / "config.json").is_file():
        raise FileNotFoundError(f"{clip_dir}: not a CLIP model folder (no config.json); {CLIP_MODEL_HINT}")
    if not Path(manifest).is_file():
        raise FileNotFoundError(
            f"manifest {manifest} does not exist; build it with `python -m storage.manifest` "
            "(`make demo` builds outputs/demo/manifest.parquet)"
        )
    checks = {"proposer": (proposer, PROPOSER_NAMES), "crop_mode": (crop_mode, CROP_MODES)}
    checks["match_mode"] = (match_mode, MATCH_MODES)
    for name, (value, valid) in checks.items():
        if value not in valid:
            raise ValueError(f"{name} {value!r} is not one of {', '.join(valid)}")
    if proposer.startswith("sam") and not sam_checkpoint:
        raise ValueError(f"proposer {proposer!r} needs --sam-checkpoint PATH (a segment-anything .pth)")
    if sam_checkpoint and not Path(sam_checkpoint).is_file():
        raise FileNotFoundError(f"SAM checkpoint {sam_checkpoint} does not exist")
    config = RSMConfig(
        clip_model=str(clip_dir),  # absolute: Ray workers do not share the driver's working directory
        proposer=proposer,
        sam_checkpoint=str(Path(sam_checkpoint).resolve()) if sam_checkpoint else None,
        sam_model_type=sam_model_type,
        crop_mode=crop_mode,
        match=MatchConfig(mode=match_mode),
        images_per_batch=images_per_batch,
    )
    run["fail_shards"] = tuple(run.get("fail_shards") or ())
    return MineOptions(manifest=str(manifest), out=str(out), config=config, **run)


def run_config(config: RSMConfig) -> dict[str, Any]:
    """The config a run is identified by: RSMConfig minus runtime knobs, plus the CLIP folder's content
    hash (a model retrained in place must not mix with shards mined by the old one)."""
    resolved = {k: v for k, v in asdict(config).items() if k not in RUNTIME_KEYS}
    resolved["clip_model_fingerprint"] = model_fingerprint(config.clip_model)
    resolved["calibrator_fingerprint"] = calibrator_fingerprint(config)
    return resolved


# ---------------------------------------------------------------------------------------------- stages


def prepare_run(opts: MineOptions) -> tuple[RunPlan, list[int]]:
    """Plan the shards and create or resume the output folder; returns (plan, pending shard ids)."""
    plan = plan_shards(opts.manifest, opts.shard_size, run_config(opts.config))
    if plan.manifest_root is None:
        raise ValueError(f"{opts.manifest}: no rsm.root in its metadata; re-import it with storage.manifest")
    return plan, begin_run(opts.out, plan)


@dataclass
class Progress:
    n_done: int  # committed shards, this run and earlier ones
    n_total: int
    images: int = 0  # mined in this run
    started: float = field(default_factory=time.perf_counter)

    @property
    def images_per_s(self) -> float:
        return self.images / max(1e-9, time.perf_counter() - self.started)


@dataclass
class MiningReport:
    """What the fan-out of this run did (shards committed earlier are not in here)."""

    workers: list[dict[str, Any]] = field(default_factory=list)
    pool_reason: str = ""
    ray_start_s: float = 0.0
    workers_start_s: float = 0.0
    fanout_s: float = 0.0
    done: dict[int, ShardEvent] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)
    images: int = 0


def commit_output(opts: MineOptions, plan: RunPlan, output: ShardOutput):
    """Commit one worker output on the driver (idempotent: a re-run attempt is absorbed)."""
    stats = {"attempt": output.attempt, "mine_s": output.mine_s, "stage_s": output.stage_s}
    stats |= {"n_images": output.n_images, "worker": output.worker}
    return commit_shard(opts.out, plan, output.shard_id, output.pairs, output.status, stats=stats)


def mine_pending(
    opts: MineOptions, plan: RunPlan, pending: list[int], on_event: Callable[[ShardEvent, Progress], None]
) -> MiningReport:
    """Fan the pending shards out on a pool of Ray actors and commit each result as it arrives."""
    report = MiningReport()
    t0 = time.perf_counter()
    started_ray = connect_ray(opts.ray_address)
    try:
        report.ray_start_s = time.perf_counter() - t0
        pool_plan = plan_pool(len(pending), ray.cluster_resources(), opts.max_workers, opts.gpus_per_worker)
        report.pool_reason = f"{pool_plan.n_workers} worker(s): {pool_plan.reason}"
        # Read and sort once; load_shard_rows slices (and checks) each shard's rows out of it
        manifest = read_manifest_table(plan.manifest_path)
        manifest = manifest.take(pc.sort_indices(manifest, sort_keys=SORT_KEYS))
        progress = Progress(n_done=len(plan.shards) - len(pending), n_total=len(plan.shards))
        worker_config = asdict(opts.config)
        with ShardPool(worker_config, pool_plan) as pool:
            report.workers, report.workers_start_s = pool.start_infos(), pool.start_s
            progress.started = t_fanout = time.perf_counter()
            events = pool.run(
                pending,
                rows_for=lambda sid: load_shard_rows(plan, sid, manifest),
                root=str(plan.manifest_root),
                accept=lambda output: commit_output(opts, plan, output),
                max_retries=opts.max_retries,
                inject={sid: "raise" for sid in opts.fail_shards},
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
    opts: MineOptions, reporters: list[Reporter] | None = None, stage: Callable[..., Any] = _direct
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

    report = stage("mine-shards", mine_pending, opts, plan, pending, on_event) if pending else MiningReport()
    if not report.failed:
        stage("finalize-run", finalize_run, opts.out, plan)
    summary = summarize(opts, plan, report, time.perf_counter() - t0)
    for reporter in reporters:
        reporter.on_summary(summary)
    if report.failed:
        raise ShardsFailedError(failure_message(summary))
    return summary


@flow(name="mine-rsm", description="RSM region-sentence mining: plan shards, fan out on Ray, commit, report")
def mine_rsm(
    manifest: str,
    out: str,
    proposer: str = "prior",
    clip_model: str | None = None,
    sam_checkpoint: str | None = None,
    shard_size: int = 256,
    ray_address: str | None = None,
    crop_mode: str = "box",
    match_mode: str = "combined",
    max_retries: int = 2,
    max_workers: int | None = None,
    gpus_per_worker: float = 1.0,
    images_per_batch: int = 32,
    sam_model_type: str = "vit_b",
    shard_timeout_s: float | None = None,
    progress_bar: bool = False,
    fail_shards: list[int] | None = None,
    qa_out: str | None = None,
) -> dict[str, Any]:
    """Mine MANIFEST into the shard folder OUT (resuming it), then, with `qa_out`, write the QA report
    there and publish its summary as artifacts. `fail_shards` is a TEST HOOK: the listed shard ids
    raise in their workers on every attempt, to drill retries, partial failure and resume."""
    params = dict(locals())
    params.pop("progress_bar")
    params.pop("qa_out")
    opts = build_options(**params)
    reporters: list[Reporter] = [LogReporter(get_run_logger()), ArtifactReporter()]
    if progress_bar:
        reporters.append(TqdmReporter())
    summary = run_mining(opts, reporters, stage=_as_task)
    if qa_out:
        qa = _as_task("qa-report", build_report, out, qa_out, manifest)
        publish_qa_artifacts(qa)
        summary["qa"] = qa_headline(qa)
    return summary


# ---------------------------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m flows.mine_rsm", description=__doc__.split("\n\n")[0])
    p.add_argument("--manifest", required=True, help="manifest Parquet (python -m storage.manifest)")
    p.add_argument("--out", required=True, help="shard folder; an unfinished run there is resumed")
    p.add_argument("--proposer", default="prior", choices=PROPOSER_NAMES)
    p.add_argument("--clip-model", help="CLIP from_pretrained folder (required)")
    p.add_argument("--sam-checkpoint", help="segment-anything .pth (sam-* proposers)")
    p.add_argument("--sam-model-type", default="vit_b", help="vit_b | vit_l | vit_h | tiny")
    p.add_argument("--shard-size", type=int, default=256, help="manifest rows per shard (default 256)")
    p.add_argument("--ray-address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--crop-mode", default="box", choices=CROP_MODES)
    p.add_argument("--match-mode", default="combined", choices=MATCH_MODES)
    p.add_argument("--max-workers", type=int, help="at most this many Ray actors (default: CPU/GPU slots)")
    p.add_argument("--gpus-per-worker", type=float, default=1.0, help="GPU share per actor (e.g. 0.5)")
    p.add_argument("--images-per-batch", type=int, default=32)
    p.add_argument("--max-retries", type=int, default=2, help="retries per shard (default 2)")
    p.add_argument(
        "--shard-timeout", type=float, dest="shard_timeout_s", help="seconds before a stuck worker is killed"
    )
    p.add_argument("--no-prefect", action="store_true", help="run the same pipeline without Prefect")
    p.add_argument("--qa-out", help="also write the QA report (python -m qa.report) into this folder")
    p.add_argument(
        "--fail-shard", type=int, action="append", dest="fail_shards", help="TEST HOOK: make this shard fail"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    apply_offline_defaults()
    args = parse_args(argv)
    params = vars(args)
    no_prefect = params.pop("no_prefect")
    qa_out = params.pop("qa_out")
    try:
        opts = build_options(**params)  # fail fast, before a Prefect API or Ray starts
        if no_prefect:
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
            summary = run_mining(opts, [LogReporter(logging.getLogger("mine-rsm")), TqdmReporter()])
            if qa_out:
                summary["qa"] = qa_headline(build_report(opts.out, qa_out, args.manifest))
        else:
            summary = mine_rsm(**params, progress_bar=True, qa_out=qa_out)
    except ShardsFailedError as exc:  # rc 1: a rerun resumes (and may succeed)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (RunConflictError, ShardStoreError, WorkerStartError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)  # rc 2: refused; change the arguments or the folder
        return 2
    print(
        f"{summary['out']}: {summary['shards_committed']}/{summary['n_shards']} shards "
        f"({summary['shards_mined_now']} mined now), "
        f"{summary['ok_rows']} ok + {summary['rejected_rows']} rejected rows, {summary['pairs']} pairs "
        f"({summary['kept_pairs']} kept), {summary['images_per_s']} images/s, {summary['wall_s']}s"
    )
    if "qa" in summary:
        print(
            f"QA report in {qa_out}: "
            + ", ".join(f"{k}={v}" for k, v in summary["qa"].items() if v is not None)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
