"""Noise-rate estimators for mined region–sentence pairs: label-free and, where labels exist, true.

Consumes a polars LazyFrame over committed pairs shards (PAIRS_SCHEMA plus a `_shard` column) and,
for ground truth, per-pair correctness from `miners.ground_truth.judge_pairs`. Produces plain dicts:
- label-free: pairs_total / pairs_kept, the expected noise of kept pairs mean(1 − reliability), and a
  two-component mixture on a per-pair score fitted by EM (as in noisy-correspondence work, e.g. RDE /
  DivideMix): the component with the lower mean is "noisy", and the estimate is the mean posterior of
  that component over kept pairs; both per body part, region source, split and shard; histograms.
- true (`judge_run` streams the shards through `judge_pairs`, one file at a time; `truth_figures`):
  noise of kept pairs (1 − precision_kept), coverage, a precision/coverage curve over thresholds,
  ECE and the reliability-diagram bins; `add_true_breakdowns` adds true noise to the breakdowns.

Memory stays flat in the number of pairs: the mixture is fitted on a fine histogram of the score
(weighted EM over bin centres), and every figure is a polars aggregation over the lazy scan.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from miners.ground_truth import judge_pairs, pair_quality
from qa.metrics import expected_calibration_error

MIXTURE_KINDS = ("gaussian", "beta")
NONE_KEY = "(none)"  # group key for a null region label / a unit with no part words
BREAKDOWN_KEYS = ("region_label", "part_tags", "region_source", "split", "shard")
_BETA_EPS = 1e-4


# ---------------------------------------------------------------------------------------------- mixture


@dataclass(frozen=True)
class MixtureFit:
    """A two-component 1-D mixture; index 0 is the noisy (lower-mean) component, 1 the clean one."""

    kind: str  # gaussian | beta
    weights: tuple[float, float]
    means: tuple[float, float]
    stds: tuple[float, float]
    alphas: tuple[float, float] | None  # beta only
    betas: tuple[float, float] | None
    log_likelihood: float  # per unit weight
    n_iter: int
    converged: bool

    @property
    def noisy_weight(self) -> float:
        return self.weights[0]

    def to_json(self) -> dict:
        return asdict(self)


def _weighted_quantile(x: np.ndarray, w: np.ndarray, q: float) -> float:
    order = np.argsort(x, kind="stable")
    cw = np.cumsum(w[order])
    return float(x[order][min(int(np.searchsorted(cw, q * cw[-1])), x.size - 1)])


def _log_pdf(kind: str, x: np.ndarray, params: list[tuple[float, float]]) -> np.ndarray:
    """K x N log densities; params are (mean, std) for gaussian, (alpha, beta) for beta."""
    rows = []
    for a, b in params:
        if kind == "gaussian":
            rows.append(-0.5 * ((x - a) / b) ** 2 - math.log(b) - 0.5 * math.log(2 * math.pi))
        else:
            log_beta_fn = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
            rows.append((a - 1) * np.log(x) + (b - 1) * np.log1p(-x) - log_beta_fn)
    return np.stack(rows)


def _beta_moments(mean: float, var: float) -> tuple[float, float]:
    # Method of moments (Arazo et al.'s weighted M-step); var is capped so that alpha, beta > 0.
    var = min(var, mean * (1 - mean) * 0.99)
    common = mean * (1 - mean) / var - 1
    return max(mean * common, 1e-2), max((1 - mean) * common, 1e-2)


def fit_mixture(
    scores: np.ndarray,
    weights: np.ndarray | None = None,
    kind: str = "gaussian",
    max_iter: int = 500,
    tol: float = 1e-7,
    min_std: float = 1e-3,
) -> MixtureFit:
    """Fit a two-component mixture to 1-D `scores` (N) with optional per-score `weights` (N, counts).

    Deterministic: components start at the weighted 25th and 75th percentiles with equal weights, so
    the same data always gives the same fit. `kind="beta"` needs scores in [0, 1] (clipped to
    [1e-4, 1 − 1e-4]). `min_std` floors each component's spread (a histogram's bin width / sqrt 12).
    """
    if kind not in MIXTURE_KINDS:
        raise ValueError(f"mixture kind {kind!r}: use one of {MIXTURE_KINDS}")
    x = np.asarray(scores, dtype=np.float64).reshape(-1)
    w = np.ones_like(x) if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
    keep = np.isfinite(x) & (w > 0)
    x, w = x[keep], w[keep]
    if x.size == 0:
        raise ValueError("no finite scores to fit a mixture to")
    if kind == "beta":
        if x.min() < 0 or x.max() > 1:
            raise ValueError(f"a beta mixture needs scores in [0, 1], got [{x.min():.3g}, {x.max():.3g}]")
        x = np.clip(x, _BETA_EPS, 1 - _BETA_EPS)
    total = w.sum()
    spread = max(math.sqrt(float(np.sum(w * (x - np.sum(w * x) / total) ** 2) / total)), min_std)
    means = [_weighted_quantile(x, w, 0.25), _weighted_quantile(x, w, 0.75)]
    if means[1] - means[0] < min_std:  # (near-)constant scores: split them symmetrically
        means = [means[0] - spread / 2, means[1] + spread / 2]
    stds = [max(spread / 2, min_std)] * 2
    pis = np.array([0.5, 0.5])
    prev_ll, converged, it = -np.inf, False, 0
    for it in range(1, max_iter + 1):  # noqa: B007 (it is reported)
        if kind == "gaussian":
            params = list(zip(means, stds, strict=True))
        else:
            params = [
                _beta_moments(float(np.clip(m, 1e-3, 1 - 1e-3)), s**2)
                for m, s in zip(means, stds, strict=True)
            ]
        # E-step: responsibilities, in log space for stability
        log_joint = _log_pdf(kind, x, params) + np.log(np.maximum(pis, 1e-300))[:, None]
        log_norm = np.logaddexp(log_joint[0], log_joint[1])
        resp = np.exp(log_joint - log_norm)
        ll = float(np.sum(w * log_norm) / total)
        # M-step: weighted moments per component
        nk = (resp * w).sum(axis=1) + 1e-12
        pis = nk / nk.sum()
        means = [float(np.sum(resp[k] * w * x) / nk[k]) for k in range(2)]
        stds = [
            max(math.sqrt(float(np.sum(resp[k] * w * (x - means[k]) ** 2) / nk[k])), min_std)
            for k in range(2)
        ]
        if abs(ll - prev_ll) < tol * max(1.0, abs(ll)):
            converged = True
            break
        prev_ll = ll
    order = [0, 1] if means[0] <= means[1] else [1, 0]
    ab = None
    if kind == "beta":
        ab = [_beta_moments(float(np.clip(means[k], 1e-3, 1 - 1e-3)), stds[k] ** 2) for k in order]
    return MixtureFit(
        kind=kind,
        weights=(float(pis[order[0]]), float(pis[order[1]])),
        means=(means[order[0]], means[order[1]]),
        stds=(stds[order[0]], stds[order[1]]),
        alphas=(ab[0][0], ab[1][0]) if ab else None,
        betas=(ab[0][1], ab[1][1]) if ab else None,
        log_likelihood=ll,
        n_iter=it,
        converged=converged,
    )


def _component_params(fit: MixtureFit) -> list[tuple[float, float]]:
    if fit.kind == "gaussian":
        return list(zip(fit.means, fit.stds, strict=True))
    return list(zip(fit.alphas or (), fit.betas or (), strict=True))


def posterior_noisy(fit: MixtureFit, scores: np.ndarray) -> np.ndarray:
    """P(noisy component | score) per score (N)."""
    x = np.asarray(scores, dtype=np.float64).reshape(-1)
    if fit.kind == "beta":
        x = np.clip(x, _BETA_EPS, 1 - _BETA_EPS)
    log_joint = (
        _log_pdf(fit.kind, x, _component_params(fit)) + np.log(np.maximum(fit.weights, 1e-300))[:, None]
    )
    return 1.0 / (1.0 + np.exp(np.clip(log_joint[1] - log_joint[0], -700, 700)))


def posterior_noisy_expr(fit: MixtureFit, column: str) -> pl.Expr:
    """The same posterior as a polars expression on `column` (so breakdowns stay lazy)."""
    x = pl.col(column).cast(pl.Float64)
    if fit.kind == "beta":
        x = x.clip(_BETA_EPS, 1 - _BETA_EPS)
    logs = []
    for pi, (a, b) in zip(fit.weights, _component_params(fit), strict=True):
        if fit.kind == "gaussian":
            logs.append(math.log(max(pi, 1e-300)) - math.log(b) - 0.5 * ((x - a) / b) ** 2)
        else:
            log_beta_fn = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
            logs.append(math.log(max(pi, 1e-300)) + (a - 1) * x.log() + (b - 1) * (1 - x).log() - log_beta_fn)
    return 1.0 / (1.0 + (logs[1] - logs[0]).clip(-700, 700).exp())


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
        {k: _clean(v) for k, v in row.items()} for row in df.sort("_key").rename({"_key": "key"}).to_dicts()
    ]


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def label_free_figures(lf: pl.LazyFrame, fit: MixtureFit | None, score: str = "reliability") -> dict:
    """Totals, the two label-free noise estimates of kept pairs, and breakdowns by BREAKDOWN_KEYS.

    `lf` must carry a `_shard` column (shard id) besides PAIRS_SCHEMA's columns.
    """
    lf = lf.with_columns(pl.col("_shard").alias("shard"))
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
        "kept_rate": _clean(totals["kept_rate"]),
        "mean_reliability": _clean(totals["mean_reliability"]),
        "noise_rate_estimated": _clean(totals["noise_rate_estimated"]),
        "noise_rate_mixture": _clean(totals.get("noise_rate_mixture")),
        "noise_rate_mixture_all_pairs": _clean(noisy_all),
        "breakdowns": breakdowns,
    }


# ---------------------------------------------------------------------------------------------- ground truth


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
        "precision_kept": _clean(precision),
        "noise_rate_true": _clean(1.0 - precision) if math.isfinite(precision) else None,
        "coverage": _clean(quality["coverage"]),
        "accuracy_all": _clean(quality["accuracy_all"]),
        "ece": _clean(ece),
        "ece_bins": n_bins,
        "reliability_bins": [{k: _clean(float(v)) for k, v in b.items()} for b in bins],
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


__all__ = [
    "BREAKDOWN_KEYS",
    "JudgedRun",
    "add_true_breakdowns",
    "judge_run",
    "load_ground_truth",
    "MixtureFit",
    "fit_mixture",
    "fit_mixture_lazy",
    "label_free_figures",
    "posterior_noisy",
    "posterior_noisy_expr",
    "score_histogram",
    "truth_figures",
]
