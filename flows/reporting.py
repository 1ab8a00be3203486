"""Reporting for the `mine-rsm` flow: the run summary, its markdown, and the reporters that turn shard
events into log lines, a tqdm bar and Prefect artifacts (progress, summary, per-shard table, QA).

Consumes the flow's plan, shard events and committed shard records; produces text, artifacts and the
summary dict the CLI prints. Split from flows/mine_rsm.py so the flow module holds only the pipeline.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from flows.options import MineOptions
from flows.ray_workers import ShardEvent
from miners.rsm import STAGES
from qa.render import summary_markdown as qa_summary_markdown
from storage.plan import RunPlan
from storage.shards import committed_records


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


# ---------------------------------------------------------------------------------------------- summary


def summarize(opts: MineOptions, plan: RunPlan, report: MiningReport, wall_s: float) -> dict[str, Any]:
    """Totals over all committed shards (this run's and earlier ones) plus this run's timings."""
    records = {r["shard_id"]: r for r in committed_records(opts.out, plan)}
    status_counts: Counter[str] = Counter()
    shards = []
    for spec in plan.shards:
        record = records.get(spec.shard_id)
        row: dict[str, Any] = {"shard_id": spec.shard_id, "rows": spec.n_rows, "images": spec.n_images}
        if record is None:
            row |= {"state": "failed" if spec.shard_id in report.failed else "pending"}
            row["error"] = report.failed.get(spec.shard_id, "")
        else:
            worker = record.get("worker", {})
            status_counts.update(record["status_counts"])
            ok = record["status_counts"].get("ok", 0)
            row |= {
                "state": "mined now" if spec.shard_id in report.done else "committed earlier",
                "ok": ok,
                "rejected": spec.n_rows - ok,
                "pairs": record["pairs"]["n_rows"],
                "kept": record["n_kept_pairs"],
                "mine_s": worker.get("mine_s"),
                "commit_s": record.get("commit_s"),
                "attempts": worker.get("attempt"),
                "worker": "{host}:{pid} {device}".format(**worker["worker"]) if "worker" in worker else "",
            }
            row |= {f"{k}_s": v for k, v in shard_stages(record).items()}
        shards.append(row)

    mined = [records[sid] for sid in report.done if sid in records]
    mine_s = sum(r["worker"].get("mine_s", 0.0) for r in mined)
    stage_s = {k: round(sum(shard_stages(r)[k] for r in mined), 3) for k in PROFILE_STAGES}
    n_workers = max(1, len(report.workers))
    ok_rows = status_counts.get("ok", 0)
    return {
        "run_id": plan.run_id,
        "out": str(Path(opts.out).resolve()),
        "finalized": not report.failed and len(records) == len(plan.shards),
        "n_shards": len(plan.shards),
        "shards_committed": len(records),
        "shards_mined_now": len(report.done),
        "shards_failed": {str(k): v for k, v in sorted(report.failed.items())},
        "manifest_rows": plan.n_rows,
        "ok_rows": ok_rows,
        "mining_error_rows": sum(status_counts.values()) - ok_rows,  # status other than ok, by kind below
        "status_counts": dict(sorted(status_counts.items())),
        "pairs": sum(records[s]["pairs"]["n_rows"] for s in records),
        "kept_pairs": sum(records[s]["n_kept_pairs"] for s in records),
        "images_mined_now": report.images,
        "images_per_s": round(report.images / report.fanout_s, 2) if report.fanout_s else None,
        # Where this run's time went, summed over its shards (workers run in parallel): the miner's
        # stages inside the actors, then `write` (the driver's validate + publish of each shard)
        "stage_s": stage_s,
        "workers": report.workers,
        "pool": report.pool_reason,
        "wall_s": round(wall_s, 2),
        "ray_start_s": round(report.ray_start_s, 2),
        "workers_start_s": round(report.workers_start_s, 2),
        "fanout_s": round(report.fanout_s, 2),
        "mine_s_total": round(mine_s, 2),
        # Planning, Ray and actor start-up, finalize: paid once per run
        "fixed_overhead_s": round(wall_s - report.fanout_s, 2),
        # Fan-out time not spent mining (dispatch, transfer, commit), per shard; workers mine in parallel
        "overhead_s_per_shard": round((report.fanout_s - mine_s / n_workers) / len(mined), 3)
        if mined
        else None,
        "vocabulary": run_vocabulary(plan, opts.config.clip_model),
        "shards": shards,
    }


VOCABULARY_MAX_CAPTIONS = 50_000  # enough to find the words a CLIP lacks; a 1M-row manifest reads in seconds


def run_vocabulary(
    plan: RunPlan, clip_model: str, max_captions: int = VOCABULARY_MAX_CAPTIONS
) -> dict[str, Any]:
    """The vocabulary coverage of the run's captions (qa.domain.vocabulary_coverage): which caption words
    the mining CLIP's tokenizer does not know and turns into [UNK]. Reads the first `max_captions`
    captions of the manifest (the whole of any but a large one; `captions_read` says how many)."""
    import pyarrow.parquet as pq

    from qa.domain import clip_vocabulary, vocabulary_coverage

    try:
        captions = pq.read_table(plan.manifest_path, columns=["caption"])["caption"].to_pylist()
    except (OSError, KeyError) as exc:  # the manifest moved since the plan: the summary still stands
        return {"status": "unavailable", "why": f"the manifest's captions could not be read ({exc})"}
    coverage = vocabulary_coverage(captions[:max_captions], clip_vocabulary(clip_model))
    return {**coverage, "captions_read": min(len(captions), max_captions), "captions": len(captions)}


# The stage profile: the miner's stages (miners.rsm.STAGES) and the driver's commit.
PROFILE_STAGES = (*STAGES, "write")


def shard_stages(record: dict[str, Any]) -> dict[str, float]:
    """One committed shard's stage seconds (0 for a stage its stats file predates)."""
    stages = record.get("worker", {}).get("stage_s", {})
    out = {k: float(stages.get(k, 0.0)) for k in STAGES}
    out["write"] = float(record.get("commit_s") or 0.0)
    return out


def stage_profile_markdown(summary: dict[str, Any]) -> str:
    """The stage table of the summary: seconds, share of the total and ms per image, per stage."""
    stage_s = summary.get("stage_s") or {}
    total = sum(stage_s.values())
    if not total:
        return ""
    n_images = max(1, summary["images_mined_now"])
    rows = "".join(
        f"| {k} | {v:.2f} | {100 * v / total:.0f}% | {1000 * v / n_images:.2f} |\n"
        for k, v in stage_s.items()
    )
    return (
        "\n## Where the time went (this run, summed over shards)\n\n"
        "| stage | s | share | ms / image |\n| --- | --- | --- | --- |\n" + rows
    )


def failure_message(summary: dict[str, Any]) -> str:
    failed = summary["shards_failed"]
    lines = "; ".join(f"shard {sid}: {err}" for sid, err in failed.items())
    return (
        f"{len(failed)} of {summary['n_shards']} shards failed after all retries ({lines}). "
        f"{summary['shards_committed']} shards are committed in {summary['out']} and stay so: rerun the "
        "same command to mine only the unfinished shards."
    )


def _speed(summary: dict[str, Any], unit: str = "") -> str:
    """images/s of this run's mining, or why there is none (a resumed run that found every shard
    committed mined nothing: "None images/s" told nobody that)."""
    ips = summary.get("images_per_s")
    return "nothing left to mine (already committed)" if ips is None else f"{ips}{unit}"


def vocabulary_line(summary: dict[str, Any]) -> str:
    """'43 of 45 distinct caption words are in the CLIP's vocabulary (2 outside: ...)', or why not known."""
    vocab = summary.get("vocabulary") or {}
    if not vocab:
        return "n/a"
    if vocab.get("status") == "unavailable":
        return f"n/a: {vocab['why']}"
    read = vocab.get("captions_read", 0)
    of = (
        f" (of the first {read} of {vocab['captions']} captions)"
        if read < vocab.get("captions", read)
        else ""
    )
    return vocab["why"] + of


def summary_markdown(summary: dict[str, Any]) -> str:
    state = "complete" if summary["finalized"] else "INCOMPLETE"
    kinds = "".join(f"| {k} | {n} |\n" for k, n in summary["status_counts"].items()) or "| - | 0 |\n"
    failed = "".join(f"- shard {sid}: `{err}`\n" for sid, err in summary["shards_failed"].items())
    return (
        f"# mine-rsm run `{summary['run_id']}`: {state}\n\n"
        f"Output: `{summary['out']}`\n\n"
        "| measure | value |\n| --- | --- |\n"
        f"| shards committed / total | {summary['shards_committed']} / {summary['n_shards']} |\n"
        f"| shards mined in this run | {summary['shards_mined_now']} |\n"
        f"| manifest rows | {summary['manifest_rows']} |\n"
        f"| ok rows / rows with mining errors | {summary['ok_rows']} / {summary['mining_error_rows']} |\n"
        f"| pairs / kept | {summary['pairs']} / {summary['kept_pairs']} |\n"
        f"| images/s (this run) | {_speed(summary)} |\n"
        f"| wall s (Ray start, workers start, fan-out) | {summary['wall_s']} ({summary['ray_start_s']}, "
        f"{summary['workers_start_s']}, {summary['fanout_s']}) |\n"
        f"| workers | {summary['pool']} |\n"
        f"| caption vocabulary | {vocabulary_line(summary)} |\n\n"
        f"## Rows by status\n\n| status | rows |\n| --- | --- |\n{kinds}"
        + stage_profile_markdown(summary)
        + (f"\n## Failed shards\n\n{failed}\nRerun the same command to resume.\n" if failed else "")
    )


# ---------------------------------------------------------------------------------------------- reporters


class Reporter:
    """Hooks called by run_mining; the no-op base."""

    def on_plan(self, plan: RunPlan, pending: list[int]) -> None:
        pass

    def on_event(self, event: ShardEvent, progress: Progress) -> None:
        pass

    def on_summary(self, summary: dict[str, Any]) -> None:
        pass


class LogReporter(Reporter):
    def __init__(self, logger: logging.Logger | logging.LoggerAdapter):
        self.log = logger

    def on_plan(self, plan: RunPlan, pending: list[int]) -> None:
        done = len(plan.shards) - len(pending)
        self.log.info(
            f"run {plan.run_id}: {len(plan.shards)} shards, {len(pending)} to mine ({done} committed)"
        )

    def on_event(self, event: ShardEvent, progress: Progress) -> None:
        if event.kind == "done":
            out = event.output
            self.log.info(
                f"shard {event.shard_id} committed ({out.status.num_rows} rows, {out.pairs.num_rows} pairs, "
                f"mined in {out.mine_s:.2f}s on {out.worker['host']}:{out.worker['pid']}); "
                f"{progress.n_done}/{progress.n_total} shards"
            )
        elif event.kind == "retry":
            self.log.warning(
                f"shard {event.shard_id} attempt {event.attempt} failed, retrying: {event.error}"
            )
        else:
            self.log.error(f"shard {event.shard_id} FAILED after {event.attempt} attempts: {event.error}")

    def on_summary(self, summary: dict[str, Any]) -> None:
        speed = _speed(summary, unit=" images/s")
        self.log.info(
            f"{summary['shards_committed']}/{summary['n_shards']} shards committed, {summary['pairs']} pairs "
            f"({summary['kept_pairs']} kept), {speed}, wall {summary['wall_s']}s"
        )
        self.log.info(f"caption vocabulary: {vocabulary_line(summary)}")
        stage_s = summary.get("stage_s") or {}
        if sum(stage_s.values()):
            total = sum(stage_s.values())
            self.log.info(
                "stage profile: " + ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in stage_s.items())
            )


class TqdmReporter(Reporter):
    def __init__(self):
        self.bar = None

    def on_plan(self, plan: RunPlan, pending: list[int]) -> None:
        from tqdm import tqdm

        total = len(plan.shards)
        # disable=None: a bar on a terminal only; a log file gets the LogReporter's line per shard instead
        # of carriage-return frames.
        self.bar = tqdm(
            total=total,
            initial=total - len(pending),
            unit="shard",
            desc="mine-rsm",
            file=sys.stderr,
            disable=None,
        )

    def on_event(self, event: ShardEvent, progress: Progress) -> None:
        if event.kind != "retry":
            self.bar.update(1)
        self.bar.set_postfix(img_s=f"{progress.images_per_s:.1f}", failed=self.bar.n - progress.n_done)

    def on_summary(self, summary: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.close()


class ArtifactReporter(Reporter):
    """Prefect artifacts: progress while shards commit, then a markdown and a table summary."""

    def __init__(self):
        self.progress_id = None

    def on_plan(self, plan: RunPlan, pending: list[int]) -> None:
        done = len(plan.shards) - len(pending)
        self.progress_id = create_progress_artifact(
            progress=100.0 * done / max(1, len(plan.shards)),
            key="mine-rsm-progress",
            description=f"committed shards of run {plan.run_id} ({len(plan.shards)} in all)",
        )

    def on_event(self, event: ShardEvent, progress: Progress) -> None:
        if event.kind == "done":
            update_progress_artifact(self.progress_id, 100.0 * progress.n_done / max(1, progress.n_total))

    def on_summary(self, summary: dict[str, Any]) -> None:
        create_markdown_artifact(
            summary_markdown(summary), key="mine-rsm-summary", description=f"run {summary['run_id']}"
        )
        create_table_artifact(summary["shards"], key="mine-rsm-shards", description="one row per shard")


def qa_headline(qa: dict[str, Any]) -> dict[str, Any]:
    """The QA figures worth a table row (qa.json holds everything)."""
    keys = (
        "pairs_total",
        "pairs_kept",
        "noise_rate_estimated",
        "noise_rate_mixture",
        "noise_rate_true",
        "precision_kept",
        "coverage",
        "ece",
    )
    return {k: qa.get(k) for k in keys}


def publish_qa_artifacts(qa: dict[str, Any]) -> None:
    create_markdown_artifact(
        qa_summary_markdown(qa), key="rsm-qa-summary", description="QA: noisy pair rates"
    )
    rows = [{"figure": k, "value": v} for k, v in qa_headline(qa).items() if v is not None]
    create_table_artifact(rows, key="rsm-qa-figures", description="QA headline figures")
