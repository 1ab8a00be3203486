"""Ground-truth figures for a mined run, where its dataset has region ground truth (pvlg).

Consumes the committed pairs shard files and the manifest's ground truth; judges each pair with
`storage.truth.judge_pairs`, one shard file at a time (`judge_run`), and produces plain dicts: noise of
kept pairs (1 − precision_kept), coverage, a precision/coverage curve over thresholds, ECE and the
reliability-diagram bins (`truth_figures`); `add_true_breakdowns` adds true noise to the breakdowns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from miners.metrics import expected_calibration_error
from qa.noise import BREAKDOWN_KEYS, clean_float, group_key_frame
from storage.truth import judge_pairs, pair_quality


def truth_figures(
    reliability: np.ndarray,
    kept: np.ndarray,
    groundable: np.ndarray,
    correct: np.ndarray,
    thresholds: np.ndarray | None = None,
    n_bins: int = 10,
) -> dict:
    """True noise of kept pairs, precision/coverage (as `pair_quality`), the curve over thresholds
    on reliability, and calibration (ECE over all judged pairs, `n_bins` equal-width bins)."""
    rel = np.asarray(reliability, dtype=np.float64)
    kept, groundable, correct = (np.asarray(a, dtype=bool) for a in (kept, groundable, correct))
    quality = pair_quality(kept, groundable, correct)
    ece, bins = expected_calibration_error(rel, correct, n_bins=n_bins)
    grid = np.round(np.linspace(0.0, 1.0, 21), 4) if thresholds is None else np.asarray(thresholds)
    n_groundable = int(groundable.sum())
    curve = []
    for t in grid:
        sel = rel >= t
        n_sel = int(sel.sum())
        curve.append(
            {
                "threshold": float(t),
                "kept": n_sel,
                "precision": float((correct & sel).sum() / n_sel) if n_sel else None,
                "coverage": float((correct & sel & groundable).sum() / n_groundable)
                if n_groundable
                else None,
            }
        )
    precision = quality["precision_kept"]
    return {
        "pairs_judged": int(rel.size),
        "groundable_units": n_groundable,
        "correct_pairs": int(correct.sum()),
        "precision_kept": clean_float(precision),
        "noise_rate_true": clean_float(1.0 - precision) if math.isfinite(precision) else None,
        "coverage": clean_float(quality["coverage"]),
        "accuracy_all": clean_float(quality["accuracy_all"]),
        "ece": clean_float(ece),
        "ece_bins": n_bins,
        "reliability_bins": [{k: clean_float(float(v)) for k, v in b.items()} for b in bins],
        "curve": curve,
    }


@dataclass
class JudgedRun:
    """Per judged pair (has ground truth): reliability, kept, groundable, correct, mixture score; and
    per breakdown key and group, counts of kept and correct-and-kept pairs."""

    reliability: np.ndarray
    kept: np.ndarray
    groundable: np.ndarray
    correct: np.ndarray
    score: np.ndarray
    groups: dict[str, dict[str, list[int]]]  # key -> group -> [kept, correct_kept]


def load_ground_truth(manifest_path: str | Path) -> pl.DataFrame | None:
    """(sample_id, gt_regions, gt_links) of the manifest rows with ground truth; None when none has."""
    gt = (
        pl.scan_parquet(str(manifest_path))
        .select("sample_id", "gt_regions", "gt_links")
        .filter(pl.col("gt_regions").is_not_null() & pl.col("gt_links").is_not_null())
        .collect()
    )
    return gt if gt.height else None


def judge_run(files: list[tuple[int, Path]], gt: pl.DataFrame, score: str = "reliability") -> JudgedRun:
    """Judge every pair against the manifest's ground truth, one shard file at a time (memory: one
    shard plus a few bytes per pair)."""
    cols = ["sample_id", "char_start", "char_end", "bbox_xyxy", "mask_rle", "reliability", "kept"]
    cols += [k for k in (*BREAKDOWN_KEYS[:-1], score) if k not in cols]
    parts: dict[str, list[np.ndarray]] = {
        k: [] for k in ("reliability", "kept", "groundable", "correct", "score")
    }
    groups: dict[str, dict[str, list[int]]] = {k: {} for k in BREAKDOWN_KEYS}
    for shard_id, path in files:
        table = pq.read_table(path, columns=cols)
        ids = pl.from_arrow(table.select(["sample_id"])).unique()
        rows = gt.join(ids, on="sample_id", how="semi").to_arrow()
        has, groundable, correct = judge_pairs(table, rows)
        if not has.any():
            continue
        df = pl.from_arrow(
            table.select([c for c in cols if c not in ("bbox_xyxy", "mask_rle")])
        ).with_columns(pl.Series("_correct", correct), pl.lit(shard_id, dtype=pl.Int32).alias("shard"))
        df = df.filter(pl.Series(has))
        parts["reliability"].append(df["reliability"].to_numpy().astype(np.float32))
        parts["kept"].append(df["kept"].to_numpy())
        parts["groundable"].append(groundable[has])
        parts["correct"].append(correct[has])
        parts["score"].append(df[score].to_numpy().astype(np.float32))
        for key in BREAKDOWN_KEYS:
            agg = (
                group_key_frame(df.lazy(), key)
                .group_by("_key")
                .agg(pl.col("kept").sum().alias("k"), (pl.col("kept") & pl.col("_correct")).sum().alias("c"))
                .collect()
            )
            for g, k, c in agg.iter_rows():
                acc = groups[key].setdefault(str(g), [0, 0])
                acc[0] += int(k)
                acc[1] += int(c)
    cat = {k: (np.concatenate(v) if v else np.zeros(0)) for k, v in parts.items()}
    return JudgedRun(
        cat["reliability"],
        cat["kept"].astype(bool),
        cat["groundable"].astype(bool),
        cat["correct"].astype(bool),
        cat["score"],
        groups,
    )


def add_true_breakdowns(breakdowns: dict[str, list[dict]], judged: JudgedRun) -> None:
    """Add `noise_rate_true` (1 − correct/kept among judged kept pairs) to each breakdown row."""
    for key, rows in breakdowns.items():
        counts = judged.groups.get(key, {})
        for row in rows:
            k, c = counts.get(str(row["key"]), (0, 0))
            row["noise_rate_true"] = (1.0 - c / k) if k else None


__all__ = ["JudgedRun", "add_true_breakdowns", "judge_run", "load_ground_truth", "truth_figures"]
