"""Re-mining rounds: mine → refine the CLIP on the kept pairs → mine again, N times.

Consumes resolved `MineOptions` (with `rounds` = N >= 1) and a `mine(opts) -> summary` callable (the
flow's `run_mining`, passed in so this module does not import the flow); produces N + 1 exactly-once
run folders and N refined CLIP folders:

    <OUT>-rounds/round-0/shards       mined with the start CLIP
    <OUT>-rounds/round-1/clip         refined on round 0's kept pairs (miners.refine_clip)
    <OUT>-rounds/round-1/shards       mined with it ...
    <OUT>                             the last round (N), mined with <OUT>-rounds/round-N/clip

Each round is its own run with its own run manifest; a rerun resumes the first unfinished step (a
finished round writes nothing, a refined folder with its `refine.json` is reused). Round k >= 1 names
its CLIP folder and that folder's calibrator in its `_run.json`. With `qa_out`, every round gets a QA
report (the last one in `qa_out` itself, earlier ones in `qa_out/rounds/round-k`) and `qa.rounds`
writes the side-by-side table and plot (`rounds.json`, `rounds.png`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flows.options import MineOptions, round_out, rounds_dir
from miners.calibration import CALIBRATOR_FILENAME
from miners.refine_clip import is_refined
from miners.refine_clip import main as refine_main
from qa.config import ReportConfig
from qa.report import build_report
from qa.rounds import write_rounds


def refine_round(pairs_dir: Path, clip_out: Path, opts: MineOptions) -> Path:
    """Fine-tune on `pairs_dir`'s kept pairs into `clip_out` (skipped when already finished there)."""
    if is_refined(clip_out):
        return clip_out
    argv = ["--pairs", str(pairs_dir), "--out", str(clip_out), "--epochs", str(opts.refine_epochs)]
    if opts.calibration_manifest:
        argv += ["--calibration-manifest", opts.calibration_manifest]
    if refine_main(argv) != 0:
        raise RuntimeError(f"refining the CLIP on {pairs_dir} into {clip_out} failed (see the log above)")
    return clip_out


def _direct(name: str, fn: Callable, *args: Any) -> Any:
    return fn(*args)


def run_rounds(
    opts: MineOptions,
    mine: Callable[[MineOptions], dict[str, Any]],
    stage: Callable[..., Any] = _direct,
    qa_out: str | Path | None = None,
    qa_cfg: ReportConfig | None = None,
    manifest: str | None = None,
) -> dict[str, Any]:
    """Run every round (resuming); returns the last round's summary with a `rounds` list."""
    config = opts.config
    history: list[dict[str, Any]] = []
    reports: list[tuple[int, dict]] = []
    for k in range(opts.rounds + 1):
        out_k = round_out(opts, k)
        out_k.parent.mkdir(parents=True, exist_ok=True)
        summary = mine(dataclasses.replace(opts, out=str(out_k), config=config))
        entry = {
            "round": k,
            "out": str(out_k),
            "clip_model": config.clip_model,
            "calibrator": config.calibrator,
        }
        entry |= {key: summary.get(key) for key in ("pairs", "kept_pairs", "ok_rows", "wall_s")}
        history.append(entry)
        if qa_out is not None:
            report_dir = Path(qa_out) if k == opts.rounds else Path(qa_out) / "rounds" / f"round-{k}"
            qa = stage(f"qa-report-round-{k}", build_report, str(out_k), str(report_dir), manifest, qa_cfg)
            reports.append((k, qa))
        if k == opts.rounds:
            break
        clip_next = rounds_dir(opts.out) / f"round-{k + 1}" / "clip"
        stage(f"refine-round-{k + 1}", refine_round, out_k, clip_next, opts)
        calibrator = clip_next / CALIBRATOR_FILENAME
        config = dataclasses.replace(
            config, clip_model=str(clip_next), calibrator=str(calibrator) if calibrator.is_file() else None
        )
    if qa_out is not None:
        write_rounds(Path(qa_out), reports, history)
    summary = dict(summary)
    summary["rounds"] = history
    return summary


__all__ = ["refine_round", "round_out", "rounds_dir", "run_rounds"]
