"""Benchmark of the audit loop: does the 95% interval from 300 labels hold the true noise rate, how wide is
it, and is the refit calibrator calibrated on pairs it never saw?

Per seeded repetition r (all through the commands' own functions, as `python -m qa.audit` runs them):
`sample --n 300 --seed r` into a fresh database → `label --oracle-from MANIFEST --seed r` (the synthetic
benchmark's ground truth, optionally with `--error-rate`) → `fit --seed r`. The true noise rates come from
judging every pair of the run against the ground truth (storage.truth, the oracle's own rule); the held-out
ECE of the refit calibrator is measured on every pair of the run that the repetition did not sample,
beside the mined reliability's ECE on the same pairs. The label-free estimates of the run's QA report are
tabulated beside the audit. Appends a dated section to bench/RESULTS.md and writes the raw figures as JSON.

    python bench/audit.py --pairs outputs/demo/shards [--reps 100] [--n 300] [--noisy-reps 30 --error-rate 0.05]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from miners.calibration import Calibrator
from miners.metrics import expected_calibration_error
from miners.rsm import matches_from_pairs
from qa.audit.db import AuditDB
from qa.audit.fit import fit_audit
from qa.audit.oracle import label_with_oracle
from qa.audit.sample import pair_keys, sample_pairs
from storage.reader import read_pairs
from storage.shards import load_run_plan
from storage.truth import judge_pairs


def machine() -> str:
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} CPU cores, {mem_gib:.0f} GiB RAM, {platform.machine()}, no GPU"


def repetition(pairs_dir: Path, manifest: Path, n: int, seed: int, error_rate: float, truth: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "audit.sqlite"
        t0 = time.perf_counter()
        sample_pairs(pairs_dir, db, n=n, seed=seed)
        t1 = time.perf_counter()
        label_with_oracle(db, manifest, error_rate=error_rate, seed=seed)
        t2 = time.perf_counter()
        audit = fit_audit(db, pairs_dir, Path(tmp) / "fit", seed=seed)
        t3 = time.perf_counter()
        with AuditDB(db) as d:
            sampled = {it.pair_key for it in d.items()}
        cal = Calibrator.load(Path(tmp) / "fit" / "rsm-calibrator.json")
    held = np.array([k not in sampled for k in truth["keys"]])
    p_after = cal.predict(truth["matches_of"](held))
    ece_after, _ = expected_calibration_error(p_after, truth["correct"][held], 10)
    ece_before, _ = expected_calibration_error(truth["reliability"][held], truth["correct"][held], 10)
    out = {"seed": seed, "seconds": {"sample": t1 - t0, "label": t2 - t1, "fit": t3 - t2}}
    for key, true_rate in (("noise_rate_kept", truth["noise_kept"]), ("noise_rate_all", truth["noise_all"])):
        fig = audit[key]
        out[key] = {
            "estimate": fig["estimate"],
            "ci_low": fig["ci_low"],
            "ci_high": fig["ci_high"],
            "n_labels": fig["n_labels"],
            "covers": fig["ci_low"] <= true_rate <= fig["ci_high"],
            "half_width": (fig["ci_high"] - fig["ci_low"]) / 2,
        }
    out["ece_cv_before"] = audit["ece_before"]
    out["ece_cv_after"] = audit["ece_after"]
    out["ece_heldout_before"] = ece_before
    out["ece_heldout_after"] = ece_after
    return out


def summarise(reps: list[dict]) -> dict:
    s: dict = {"reps": len(reps)}
    for key in ("noise_rate_kept", "noise_rate_all"):
        hw = np.array([r[key]["half_width"] for r in reps])
        s[key] = {
            "covered": int(sum(r[key]["covers"] for r in reps)),
            "half_width_mean": float(hw.mean()),
            "half_width_max": float(hw.max()),
            "estimate_mean": float(np.mean([r[key]["estimate"] for r in reps])),
            "n_labels_mean": float(np.mean([r[key]["n_labels"] for r in reps])),
        }
    for key in ("ece_cv_before", "ece_cv_after", "ece_heldout_before", "ece_heldout_after"):
        v = np.array([r[key] for r in reps], dtype=float)
        s[key] = {"mean": float(v.mean()), "max": float(v.max())}
    for step in ("sample", "label", "fit"):
        s[f"seconds_{step}"] = float(np.median([r["seconds"][step] for r in reps]))
    return s


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=Path, default=Path("outputs/demo/shards"))
    ap.add_argument("--manifest", type=Path, default=None, help="default: the run plan's manifest")
    ap.add_argument("--qa", type=Path, default=None, help="the run's QA report folder (label-free figures)")
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--noisy-reps", type=int, default=30)
    ap.add_argument("--error-rate", type=float, default=0.05)
    ap.add_argument("--results", type=Path, default=Path("bench/RESULTS.md"))
    ap.add_argument("--json-out", type=Path, default=Path("bench/audit.json"))
    args = ap.parse_args(argv)
    cmd = "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])])
    t0 = time.perf_counter()
    plan = load_run_plan(args.pairs)
    manifest = args.manifest or Path(plan.manifest_path)
    pairs = read_pairs(args.pairs)
    has_truth, _, correct = judge_pairs(pairs, pq.read_table(manifest))
    if not has_truth.all():
        raise SystemExit(f"{(~has_truth).sum()} pairs of {args.pairs} have no ground truth in {manifest}")
    kept = pairs["kept"].to_numpy(zero_copy_only=False).astype(bool)
    truth = {
        "keys": pair_keys(pairs),
        "correct": correct,
        "reliability": pairs["reliability"].to_numpy().astype(np.float64),
        "noise_kept": float(1.0 - correct[kept].mean()),
        "noise_all": float(1.0 - correct.mean()),
        "matches_of": lambda mask: matches_from_pairs(pairs.filter(mask)),
    }
    print(
        f"{pairs.num_rows} pairs, {int(kept.sum())} kept; true noise kept {truth['noise_kept']:.4f}, "
        f"all {truth['noise_all']:.4f}",
        flush=True,
    )
    results = {}
    for name, reps, err in (
        ("oracle", args.reps, 0.0),
        (f"oracle, {args.error_rate:.0%} flipped", args.noisy_reps, args.error_rate),
    ):
        rows = []
        for r in range(reps):
            rows.append(repetition(args.pairs, manifest, args.n, 1000 + r, err, truth))
            if (r + 1) % 10 == 0:
                done = summarise(rows)
                print(
                    f"  {name}: {r + 1}/{reps}, kept covered {done['noise_rate_kept']['covered']}", flush=True
                )
        results[name] = {"error_rate": err, "summary": summarise(rows), "reps": rows} if rows else None

    qa_dir = args.qa or args.pairs.parent / "qa"
    label_free = {}
    if (qa_dir / "qa.json").is_file():
        q = json.loads((qa_dir / "qa.json").read_text())
        label_free = {k: q.get(k) for k in ("noise_rate_estimated", "noise_rate_mixture", "noise_rate_true")}
    seconds = time.perf_counter() - t0
    payload = {
        "date": datetime.now(UTC).date().isoformat(),
        "machine": machine(),
        "command": cmd,
        "pairs": str(args.pairs),
        "n_pairs": pairs.num_rows,
        "n_kept": int(kept.sum()),
        "true": {"noise_rate_kept": truth["noise_kept"], "noise_rate_all": truth["noise_all"]},
        "label_free": label_free,
        "results": {k: v["summary"] for k, v in results.items() if v},
        "seconds": seconds,
    }
    args.json_out.write_text(
        json.dumps({**payload, "reps": {k: v["reps"] for k, v in results.items() if v}}, indent=1)
    )
    append_results(args.results, payload, args.n)
    print(json.dumps(payload["results"], indent=1))
    return 0


def append_results(path: Path, p: dict, n: int) -> None:
    lines = [
        "",
        f"## Audit loop: interval coverage and the refit calibrator ({p['date']})",
        "",
        f"Machine: {p['machine']}. Command: `{p['command']}` ({p['seconds'] / 60:.1f} min). Run: `{p['pairs']}` "
        f"({p['n_pairs']:,} pairs, {p['n_kept']:,} kept). Per repetition: `qa.audit sample --n {n} --seed r` → "
        "`label --oracle-from` (ground truth) → `fit`; held-out ECE on every pair the repetition did not sample "
        "(10 bins).",
        "",
        f"True noise: kept pairs {p['true']['noise_rate_kept']:.4f}, all pairs {p['true']['noise_rate_all']:.4f}. "
        "Label-free estimates of the run's QA report: mean(1 − reliability) "
        f"{_f(p['label_free'].get('noise_rate_estimated'))}, mixture {_f(p['label_free'].get('noise_rate_mixture'))}.",
        "",
        "| annotator | reps | kept: interval holds the truth | kept: mean / max ± | kept: mean estimate (labels) "
        "| all: holds | all: mean / max ± | ECE mined → refit, held-out | ECE CV (audited pairs) | s per sample / label / fit |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, s in p["results"].items():
        k, a = s["noise_rate_kept"], s["noise_rate_all"]
        lines.append(
            f"| {name} | {s['reps']} | {k['covered']}/{s['reps']} | {k['half_width_mean']:.3f} / {k['half_width_max']:.3f} "
            f"| {k['estimate_mean']:.4f} ({k['n_labels_mean']:.0f}) | {a['covered']}/{s['reps']} "
            f"| {a['half_width_mean']:.3f} / {a['half_width_max']:.3f} "
            f"| {s['ece_heldout_before']['mean']:.3f} → {s['ece_heldout_after']['mean']:.3f} (max {s['ece_heldout_after']['max']:.3f}) "
            f"| {s['ece_cv_before']['mean']:.3f} → {s['ece_cv_after']['mean']:.3f} "
            f"| {s['seconds_sample']:.1f} / {s['seconds_label']:.1f} / {s['seconds_fit']:.1f} |"
        )
    with path.open("a") as fh:
        fh.write("\n".join(lines) + "\n")


def _f(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


if __name__ == "__main__":
    raise SystemExit(main())
