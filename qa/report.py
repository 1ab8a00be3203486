"""QA report on a committed run: noise rates (label-free and true), data checks, plots, audit sheets.

Consumes a run folder written by `storage.shards` (read through its run manifest) and the dataset
manifest it was planned from (found via OUT/_run.json, or given): ground truth (`gt_regions`,
`gt_links`) when present, image paths under the manifest's `rsm.root`. Produces, in DIR: `qa.json`
(every figure, check verdicts, breakdowns), `report.md`, a self-contained `report.html`, the PNG plots
and contact sheets. Optionally checks the estimator: `--inject-noise F` swaps a known fraction F of text
units for units of other persons' captions, re-scores them with the RSM (`miners.rsm.RSMMiner`, config
from the run) and reports how far the label-free estimates move (qa.json "injection");
`--inject-modes` also makes units wrong by a same-part swap or by one false colour/garment word
(see qa.inject).

    python -m qa.report --pairs SHARDS --out DIR [--manifest M] [--sheet-samples 24] [--seed S]
        [--inject-noise FRACTION --clip-model DIR [--inject-modes any,same-part,attribute|all]]
        [--mixture-score clip_cosine] [--mixture-kind gaussian] [--audit DIR]

`--audit DIR` (a `python -m qa.audit fit --out DIR` folder of the same run) puts the audited noise rates
with their 95% intervals and the audit's reliability diagram beside the label-free figures.

Exit status: 0 report written and every check passed; 1 report written but a check failed; 2 the
input is not a readable run (message names the file). `build_report` and `summary_markdown` are the
same entry points for the Prefect flow (no Prefect here).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from miners.calibration import Calibrator
from miners.rsm import matches_from_pairs
from miners.run_config import RunConfig, RunConfigError, read_run_config
from qa.audit.fit import read_audit
from qa.checks import run_checks, scan_shards
from qa.config import ReportConfig, check_inject_modes, parse_inject_modes
from qa.domain import clip_vocabulary, domain_checks, vocabulary_coverage
from qa.mixture import MIXTURE_KINDS, posterior_noisy
from qa.noise import BREAKDOWN_KEYS, column_range, fit_mixture_lazy, label_free_figures, score_histogram
from qa.render import render_html, render_markdown, summary_markdown
from qa.truth import add_true_breakdowns, judge_run, load_ground_truth, truth_figures
from qa.verdict import calibrator_provenance, data_shift, mixture_check, verdict
from storage.plan import image_root
from storage.schemas import PAIRS_SCHEMA
from storage.shards import ShardStoreError, load_run_plan

HIST_SCORES = ("reliability", "clip_cosine", "softmax_prob", "margin")
SHIFT_SAMPLE = 20_000  # pairs compared with the calibrator's fitting data (qa.verdict.data_shift)


_T0 = [time.perf_counter()]


def _progress(message: str) -> None:
    """One progress line on stderr (the report takes seconds to minutes; stdout keeps the summary)."""
    print(f"qa.report [{time.perf_counter() - _T0[0]:5.1f} s] {message}", file=sys.stderr, flush=True)


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def build_report(
    pairs_dir: str | Path,
    out_dir: str | Path,
    manifest: str | Path | None = None,
    cfg: ReportConfig | None = None,
    **overrides: Any,
) -> dict:
    """Write the QA report of run folder `pairs_dir` into `out_dir`; returns the qa.json dict.

    The files are written into a staging folder beside `out_dir` and moved in only once all of them
    exist: a report that fails (an unreadable run, a bad argument) leaves nothing behind, and other
    files already in `out_dir` (earlier rounds' reports under rounds/) are left alone.

    `manifest` defaults to the run plan's `manifest_path`. `overrides` replace ReportConfig fields
    (e.g. `sheet_samples=0`). Raises ShardStoreError when `pairs_dir` is not a readable run.
    """
    # Imported where used: the injection check (spaCy, torch) and the plots (matplotlib) cost seconds
    # that `python -m qa.report --help` and a refused report need not pay
    from qa.inject import injection_rsm_config

    cfg = dataclasses.replace(cfg or ReportConfig(), **overrides)
    t0 = time.perf_counter()
    seconds: dict[str, float] = {}
    pairs_dir, out = Path(pairs_dir), Path(out_dir)
    plan = load_run_plan(pairs_dir)  # first: a --pairs that is no run is the mistake to report
    if out.resolve() == pairs_dir.resolve() or pairs_dir.resolve() in out.resolve().parents:
        raise ValueError(
            f"--out {out} lies inside the run folder {pairs_dir}: its files would be strays there"
        )
    if cfg.inject_noise is not None and not 0 < cfg.inject_noise < 1:
        raise ValueError(f"inject_noise must be a fraction in (0, 1), got {cfg.inject_noise}")
    check_inject_modes(tuple(cfg.inject_modes))
    if cfg.mixture_score not in PAIRS_SCHEMA.names or cfg.mixture_kind not in MIXTURE_KINDS:
        raise ValueError(
            f"mixture_score {cfg.mixture_score!r} must be a pairs column and mixture_kind "
            f"{cfg.mixture_kind!r} one of {MIXTURE_KINDS}"
        )
    try:
        run_cfg: RunConfig | None = read_run_config(pairs_dir)
    except RunConfigError:
        run_cfg = None  # another release's run: label-free figures and checks still work
    manifest_path = Path(manifest) if manifest is not None else Path(plan.manifest_path)
    if not manifest_path.is_file():
        if manifest is not None:
            raise FileNotFoundError(f"manifest {manifest_path} does not exist")
        manifest_path = None  # the run's manifest moved: label-free figures and checks still work
    if cfg.inject_noise is not None:  # fail before the work, not after it
        if manifest_path is None:
            raise FileNotFoundError(
                f"--inject-noise needs the dataset manifest ({plan.manifest_path} is gone)"
            )
        injection_rsm_config(run_cfg, cfg.clip_model)
    root = image_root(plan, manifest_path)
    final, out = out, out.parent / f".{out.name}.staging-{os.getpid()}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    try:
        qa = _write_report(pairs_dir, out, plan, run_cfg, manifest_path, root, cfg, t0, seconds)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    final.mkdir(parents=True, exist_ok=True)
    for path in sorted(out.iterdir()):
        os.replace(path, final / path.name)
    out.rmdir()
    return qa


def _write_report(pairs_dir, out, plan, run_cfg, manifest_path, root, cfg, t0, seconds) -> dict:
    """The report's files, written into `out` (build_report's staging folder)."""
    from qa import plots, sheets
    from qa.inject import run_injection

    # Data checks first: they also say which files are safe to scan together
    _T0[0] = t0
    _progress(f"checking the run's files ({'sha256' if cfg.check_hashes else 'sizes'})")
    t = time.perf_counter()
    checks = run_checks(pairs_dir, manifest_path, cfg.check_hashes, cfg.allow_partial)
    seconds["checks"] = time.perf_counter() - t

    # Label-free figures
    _progress("label-free figures and the mixture fit")
    t = time.perf_counter()
    lf = scan_shards(checks.pairs_files, PAIRS_SCHEMA)
    n_pairs = lf.select(pl.len()).collect().item()
    fit = fit_mixture_lazy(lf, cfg.mixture_score, cfg.mixture_kind) if n_pairs else None
    qa: dict[str, Any] = label_free_figures(lf, fit, cfg.mixture_score)
    keep_threshold = run_cfg.rsm.match.keep_threshold if run_cfg is not None else None
    if keep_threshold is None and qa["pairs_kept"]:
        keep_threshold = lf.filter(pl.col("kept")).select(pl.col("reliability").min()).collect().item()
    hists = {}
    for col in HIST_SCORES:
        lo, hi = (0.0, 1.0) if col in ("reliability", "softmax_prob") else column_range(lf, col)
        hists[col] = score_histogram(lf, col, 50, lo, hi, by="kept")
    seconds["label_free"] = time.perf_counter() - t

    # Ground truth, streamed per shard
    if manifest_path is not None and cfg.ground_truth:
        _progress("judging pairs against the manifest's ground truth (where it has any)")
    t = time.perf_counter()
    gt = load_ground_truth(manifest_path) if (manifest_path is not None and cfg.ground_truth) else None
    truth = None
    if gt is not None and n_pairs:
        judged = judge_run(checks.pairs_files, gt, cfg.mixture_score)
        if judged.reliability.size:
            truth = truth_figures(
                judged.reliability, judged.kept, judged.groundable, judged.correct, n_bins=cfg.ece_bins
            )
            add_true_breakdowns(qa["breakdowns"], judged)
            est = float(np.mean(1.0 - judged.reliability[judged.kept])) if judged.kept.any() else None
            mix = (
                float(np.mean(posterior_noisy(fit, judged.score[judged.kept]))) if judged.kept.any() else None
            )
            true_noise = truth["noise_rate_true"]
            truth["estimate_error"] = abs(est - true_noise) if None not in (est, true_noise) else None
            truth["estimate_error_mixture"] = abs(mix - true_noise) if None not in (mix, true_noise) else None
    seconds["ground_truth"] = time.perf_counter() - t

    # Plots and sheets
    _progress(f"plots and {cfg.sheet_samples}-pair contact sheets")
    t = time.perf_counter()
    figures = {
        "score_histograms": plots.plot_score_histograms(
            hists, out / "scores.png", fit, cfg.mixture_score
        ).name
    }
    figures["noise_by_part"] = plots.plot_noise_by_group(
        qa["breakdowns"]["region_label"], out / "noise_by_part.png", "noise of kept pairs by region label"
    ).name
    if truth is not None:
        figures["precision_coverage"] = plots.plot_precision_coverage(
            truth["curve"], out / "precision_coverage.png", keep_threshold
        ).name
        figures["reliability_diagram"] = plots.plot_reliability_diagram(
            truth["reliability_bins"], truth["ece"], out / "reliability_diagram.png"
        ).name
    sheet_files = (
        sheets.draw_sheets(checks.pairs_files, out, manifest_path, root, gt, cfg.sheet_samples, cfg.seed)
        if cfg.sheet_samples > 0
        else {}
    )
    seconds["plots"] = time.perf_counter() - t

    audit = None
    if cfg.audit is not None:
        audit = audit_figures(cfg.audit, checks.run_manifest["run_id"])
        shutil.copyfile(Path(cfg.audit) / audit["reliability_png"], out / "audit_reliability.png")
        figures["audit_reliability"] = "audit_reliability.png"

    # Estimator check
    injection = None
    if cfg.inject_noise is not None:
        t = time.perf_counter()
        _progress(f"injecting {cfg.inject_noise:.0%} known noise and re-scoring (the estimator check)")
        injection = run_injection(plan, run_cfg, manifest_path, checks.status_files, cfg)
        if any(b.get("available") for b in injection["modes"].values()):
            figures["injection_modes"] = plots.plot_injection_modes(
                injection["modes"], out / "injection_modes.png"
            ).name
        seconds["injection"] = time.perf_counter() - t

    provenance = (
        calibrator_provenance(run_cfg.rsm.clip_model, run_cfg.rsm.calibrator) if run_cfg is not None else None
    )
    vocabulary = None
    if run_cfg is not None and manifest_path is not None:
        captions = pq.read_table(manifest_path, columns=["caption"])["caption"].to_pylist()
        vocabulary = vocabulary_coverage(captions, clip_vocabulary(run_cfg.rsm.clip_model))
    if provenance and provenance["calibrated"] and n_pairs:
        t = time.perf_counter()
        _progress("checking that the calibrator applies to this run's data (qa.domain)")
        # the first SHIFT_SAMPLE pairs in shard order: shards are planned in manifest order, not by content
        sample = lf.head(SHIFT_SAMPLE).collect().to_arrow()
        matches = matches_from_pairs(sample)
        provenance["data_shift"] = data_shift(provenance["path"], matches)  # the per-feature means, shown
        provenance["domain"] = domain_checks(
            Calibrator.load(provenance["path"]),
            matches,
            sample["kept"].to_numpy(zero_copy_only=False),
            keep_threshold,
            vocabulary,
        )
        seconds["domain"] = time.perf_counter() - t
    qa = {
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "run": {
            "pairs_dir": str(pairs_dir.resolve()),
            "run_id": checks.run_manifest["run_id"],
            "finalized": checks.run_manifest["finalized"],
            "n_shards": len(checks.run_manifest["shards"]),
            "manifest_path": str(manifest_path) if manifest_path else None,
            "image_root": root,
        },
        **{k: v for k, v in qa.items() if k != "breakdowns"},
        "keep_threshold": keep_threshold,
        "mixture": {"score": cfg.mixture_score, **fit.to_json()} if fit else None,
        "ground_truth": truth is not None,
        **(truth or {}),
        "checks": checks.verdicts(),
        "check_details": checks.details(),
        "status_counts": checks.details()["error_reasons"]["by_status"],
        "breakdowns": qa["breakdowns"],
        "histograms": {k: {n: v.tolist() for n, v in h.items()} for k, h in hists.items()},
        "figures": figures,
        "sheets": sheet_files,
        "injection": injection,
        "audit": audit,
        "vocabulary": vocabulary,
        "config": dataclasses.asdict(cfg),
    }
    qa["verdict"] = verdict(qa, provenance)
    qa["mixture_check"] = mixture_check(qa)
    seconds["total"] = time.perf_counter() - t0
    qa["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
    qa = _json_safe(qa)
    _progress("writing qa.json, report.md, report.html")
    (out / "qa.json").write_text(json.dumps(qa, indent=1, allow_nan=False))
    (out / "report.md").write_text(render_markdown(qa))
    (out / "report.html").write_text(render_html(qa, out))
    return qa


def audit_figures(audit_dir: str | Path, run_id: str) -> dict:
    """The figures of a `qa.audit fit` folder for the report; ValueError when it audits another run."""
    audit = read_audit(audit_dir)
    if audit.get("run_id") != run_id:
        raise ValueError(
            f"{Path(audit_dir) / 'audit.json'} audits run {audit.get('run_id')}, but this report is of run {run_id}"
        )
    keys = ("noise_rate_kept", "noise_rate_all", "ece_before", "ece_after", "n_items", "n_items_labelled")
    return {
        "dir": str(Path(audit_dir).resolve()),
        **{k: audit.get(k) for k in keys},
        "calibrator": (audit.get("calibrator") or {}).get("path"),
        "reliability_png": audit.get("reliability_png", "reliability.png"),
    }


def _modes_arg(text: str) -> tuple[str, ...]:
    try:
        return parse_inject_modes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qa.report", description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", required=True, help="run folder (committed shards + _SUCCESS)")
    p.add_argument("--out", required=True, help="report folder (created)")
    p.add_argument(
        "--manifest", default=None, help="dataset manifest (default: the run plan's manifest_path)"
    )
    p.add_argument(
        "--sheet-samples", type=int, default=ReportConfig.sheet_samples, help="pairs per audit sheet"
    )
    p.add_argument("--seed", type=int, default=ReportConfig.seed)
    p.add_argument("--inject-noise", type=float, default=None, metavar="FRACTION")
    p.add_argument("--clip-model", default=None, help="CLIP folder for --inject-noise (default: the run's)")
    p.add_argument("--inject-max-samples", type=int, default=ReportConfig.inject_max_samples)
    p.add_argument(
        "--inject-modes",
        type=_modes_arg,
        default=ReportConfig.inject_modes,
        metavar="MODES",
        help="comma list of any, same-part, attribute (or all); the first fills qa.json 'injection'",
    )
    p.add_argument("--mixture-score", default=ReportConfig.mixture_score)
    p.add_argument("--mixture-kind", choices=("gaussian", "beta"), default=ReportConfig.mixture_kind)
    p.add_argument("--audit", default=None, metavar="DIR", help="a `qa.audit fit --out` folder of this run")
    p.add_argument("--no-hashes", action="store_true", help="check file sizes only, not sha256")
    p.add_argument("--no-ground-truth", action="store_true")
    p.add_argument(
        "--allow-partial", action="store_true", help="report on an unfinished run's committed shards"
    )
    args = p.parse_args(argv)
    cfg = ReportConfig(
        sheet_samples=args.sheet_samples,
        seed=args.seed,
        mixture_score=args.mixture_score,
        mixture_kind=args.mixture_kind,
        check_hashes=not args.no_hashes,
        ground_truth=not args.no_ground_truth,
        allow_partial=args.allow_partial,
        inject_noise=args.inject_noise,
        clip_model=args.clip_model,
        inject_max_samples=args.inject_max_samples,
        inject_modes=args.inject_modes,
        audit=args.audit,
    )
    try:
        qa = build_report(args.pairs, args.out, args.manifest, cfg)
    except (ShardStoreError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary_markdown(qa))
    print(
        f"wrote {Path(args.out) / 'report.md'}, report.html, qa.json and {len(qa['figures']) + len(qa['sheets'])} PNGs"
    )
    return 0 if all(v == "pass" for v in qa["checks"].values()) else 1


__all__ = ["BREAKDOWN_KEYS", "ReportConfig", "build_report", "main", "summary_markdown"]

if __name__ == "__main__":
    raise SystemExit(main())
