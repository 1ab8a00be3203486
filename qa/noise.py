"""Label-free noise figures for mined region–sentence pairs.

Consumes a polars LazyFrame over committed pairs shards (PAIRS_SCHEMA plus a `_shard` column);
produces plain dicts: pairs_total / pairs_kept, the expected noise of kept pairs mean(1 − reliability)
and the mixture estimate (qa.mixture: the mean posterior of the noisy component over kept pairs), both
per body part, region source, split and shard; and score histograms. Ground-truth figures are in
qa.truth. Memory stays flat in the number of pairs: the mixture is fitted on a fine histogram of the
score (weighted EM over bin centres), and every figure is a polars aggregation over the lazy scan.
"""

from __future__ import annotations

import math

import numpy as np
import polars as pl

from qa.mixture import MixtureFit, fit_mixture, posterior_noisy_expr

NONE_KEY = "(none)"  # group key for a null region label / a unit with no part words
BREAKDOWN_KEYS = ("region_label", "part_tags", "region_source", "split", "shard")


# ---------------------------------------------------------------------------------------------- histograms


def score_histogram(
    lf: pl.LazyFrame, column: str, n_bins: int, lo: float, hi: float, by: str | None = None
) -> dict[str, np.ndarray]:
    """Counts of `column` in `n_bins` equal bins on [lo, hi] (values outside go to the end bins),
    split by the boolean column `by` when given: {"edges", "all"} or {"edges", "true", "false"}."""
    width = (hi - lo) / n_bins if hi > lo else 1.0
    idx = ((pl.col(column).cast(pl.Float64) - lo) / width).floor().clip(0, n_bins - 1).cast(pl.Int32)
    keys = ["_bin"] + ([by] if by else [])
    counts = (
        lf.filter(pl.col(column).is_not_null() & pl.col(column).is_finite())
        .select(idx.alias("_bin"), *([pl.col(by)] if by else []))
        .group_by(keys)
        .agg(pl.len().alias("n"))
        .collect(engine="streaming")
    )
    out = {"edges": np.linspace(lo, hi if hi > lo else lo + 1.0, n_bins + 1)}
    groups = [("all", None)] if not by else [("true", True), ("false", False)]
    for name, flag in groups:
        arr = np.zeros(n_bins, dtype=np.int64)
        part = counts if flag is None else counts.filter(pl.col(by) == flag)
        arr[part["_bin"].to_numpy()] = part["n"].to_numpy()
        out[name] = arr
    return out


def column_range(lf: pl.LazyFrame, column: str) -> tuple[float, float]:
    """(min, max) of a numeric column over finite values; (0, 1) when there are none."""
    finite = pl.col(column).filter(pl.col(column).is_finite())
    row = lf.select(finite.min().alias("lo"), finite.max().alias("hi")).collect(engine="streaming").row(0)
    return (0.0, 1.0) if row[0] is None else (float(row[0]), float(row[1]))


def fit_mixture_lazy(
    lf: pl.LazyFrame, column: str = "reliability", kind: str = "gaussian", n_bins: int = 1000
) -> MixtureFit:
    """Fit `fit_mixture` on a fine histogram of `column` over all pairs (weighted EM on bin centres)."""
    lo, hi = (0.0, 1.0) if kind == "beta" else column_range(lf, column)
    hist = score_histogram(lf, column, n_bins, lo, hi)
    edges = hist["edges"]
    centres = (edges[:-1] + edges[1:]) / 2
    return fit_mixture(centres, hist["all"], kind=kind, min_std=(edges[1] - edges[0]) / math.sqrt(12))


# ---------------------------------------------------------------------------------------------- label-free


def noise_aggs(with_mixture: bool) -> list[pl.Expr]:
    """Per-group aggregations: pairs, kept, kept_rate, mean reliability, estimated noise of kept."""
    kept = pl.col("kept")
    aggs = [
        pl.len().alias("pairs"),
        kept.sum().alias("kept"),
        kept.mean().alias("kept_rate"),
        pl.col("reliability").mean().alias("mean_reliability"),
        (1.0 - pl.col("reliability").cast(pl.Float64)).filter(kept).mean().alias("noise_rate_estimated"),
    ]
    if with_mixture:
        aggs.append(pl.col("_p_noisy").filter(kept).mean().alias("noise_rate_mixture"))
    return aggs


def group_key_frame(lf: pl.LazyFrame, key: str) -> pl.LazyFrame:
    """`lf` with a string column `_key` for breakdown `key`: one row per part tag for part_tags."""
    if key == "part_tags":
        tags = (
            pl.when(pl.col("part_tags").list.len() > 0)
            .then(pl.col("part_tags"))
            .otherwise(pl.lit([NONE_KEY]))
        )
        return lf.with_columns(tags.alias("_key")).explode("_key")
    if key == "shard":  # zero-padded like the shard file names, so keys sort numerically
        return lf.with_columns(pl.col(key).cast(pl.String).str.zfill(5).alias("_key"))
    return lf.with_columns(pl.col(key).cast(pl.String).fill_null(NONE_KEY).alias("_key"))


def _rows(df: pl.DataFrame) -> list[dict]:
    return [
        {k: clean_float(v) for k, v in row.items()}
        for row in df.sort("_key").rename({"_key": "key"}).to_dicts()
    ]


def clean_float(v):
    """None for NaN / inf (JSON has neither)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def label_free_figures(lf: pl.LazyFrame, fit: MixtureFit | None, score: str = "reliability") -> dict:
    """Totals, the two label-free noise estimates of kept pairs, and breakdowns by BREAKDOWN_KEYS.

    `lf` must carry a `_shard` column (shard id) besides PAIRS_SCHEMA's columns. A fit that did not
    converge gives no mixture figure (None) and `noise_rate_mixture_why_na` says why.
    """
    lf = lf.with_columns(pl.col("_shard").alias("shard"))
    why_na = fit.why_no_figure() if fit is not None else None
    if why_na is not None:  # no figure from a fit that did not converge: n/a, with the reason
        fit = None
    if fit is not None:
        lf = lf.with_columns(posterior_noisy_expr(fit, score).alias("_p_noisy"))
    totals = lf.select(noise_aggs(fit is not None)).collect(engine="streaming").to_dicts()[0]
    breakdowns = {}
    for key in BREAKDOWN_KEYS:
        df = (
            group_key_frame(lf, key)
            .group_by("_key")
            .agg(noise_aggs(fit is not None))
            .collect(engine="streaming")
        )
        breakdowns[key] = _rows(df)
    noisy_all = (
        lf.select(pl.col("_p_noisy").mean()).collect(engine="streaming").item() if fit is not None else None
    )
    return {
        "pairs_total": int(totals["pairs"]),
        "pairs_kept": int(totals["kept"] or 0),
        "kept_rate": clean_float(totals["kept_rate"]),
        "mean_reliability": clean_float(totals["mean_reliability"]),
        "noise_rate_estimated": clean_float(totals["noise_rate_estimated"]),
        "noise_rate_mixture": clean_float(totals.get("noise_rate_mixture")),
        "noise_rate_mixture_all_pairs": clean_float(noisy_all),
        "noise_rate_mixture_why_na": why_na,
        "breakdowns": breakdowns,
    }


__all__ = [
    "BREAKDOWN_KEYS",
    "NONE_KEY",
    "clean_float",
    "column_range",
    "fit_mixture_lazy",
    "group_key_frame",
    "label_free_figures",
    "score_histogram",
]
