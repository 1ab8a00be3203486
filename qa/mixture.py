"""A two-component 1-D mixture on a per-pair score, fitted by EM (as in noisy-correspondence work,
e.g. RDE / DivideMix): the component with the lower mean is "noisy".

Consumes scores (N, optionally with per-score weights: a histogram's counts); produces a `MixtureFit`,
per-score posteriors of the noisy component (numpy, or as a lazy polars expression) and weighted
component densities for plots. The log-density is written once (`_log_pdf`) and used by all three.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import polars as pl

MIXTURE_KINDS = ("gaussian", "beta")
_BETA_EPS = 1e-4


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

    def why_no_figure(self) -> str | None:
        """Why this fit's noise figure is not shown (None when it is): a fit stopped by the EM iteration
        cap sits wherever the cap left it, so its components (and any figure read from them) mean nothing."""
        if self.converged:
            return None
        return f"the {self.kind} mixture did not converge: EM stopped at its cap of {self.n_iter} iterations"


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
    """`posterior_noisy` as a polars expression on `column` (so breakdowns stay lazy)."""
    return (
        pl.col(column)
        .cast(pl.Float64)
        .map_batches(lambda s: pl.Series(s.name, posterior_noisy(fit, s.to_numpy())), return_dtype=pl.Float64)
    )


def component_densities(fit: MixtureFit, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(noisy, clean) weighted component densities on `grid` (for plots)."""
    x = np.asarray(grid, dtype=np.float64)
    if fit.kind == "beta":
        x = np.clip(x, _BETA_EPS, 1 - _BETA_EPS)
    dens = np.exp(_log_pdf(fit.kind, x, _component_params(fit))) * np.asarray(fit.weights)[:, None]
    return dens[0], dens[1]


__all__ = [
    "MIXTURE_KINDS",
    "MixtureFit",
    "component_densities",
    "fit_mixture",
    "posterior_noisy",
    "posterior_noisy_expr",
]
