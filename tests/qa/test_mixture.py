"""qa.mixture: the EM mixture recovers known proportions; the lazy posterior equals the numpy one."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from qa.mixture import fit_mixture, posterior_noisy, posterior_noisy_expr
from qa.noise import fit_mixture_lazy


def _synthetic(noisy_fraction: float, n: int, kind: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noisy = rng.random(n) < noisy_fraction
    if kind == "gaussian":
        return np.where(noisy, rng.normal(0.25, 0.08, n), rng.normal(0.7, 0.1, n))
    return np.where(noisy, rng.beta(2, 6, n), rng.beta(8, 2, n))


@pytest.mark.parametrize("kind", ["gaussian", "beta"])
@pytest.mark.parametrize("noisy_fraction", [0.15, 0.4])
def test_mixture_recovers_known_proportion(kind, noisy_fraction):
    scores = _synthetic(noisy_fraction, 8000, kind, seed=3)
    fit = fit_mixture(scores, kind=kind)
    assert fit.converged
    assert fit.noisy_weight == pytest.approx(noisy_fraction, abs=0.05)
    assert fit.means[0] < fit.means[1]
    # Mean posterior of the noisy component estimates the same fraction
    assert posterior_noisy(fit, scores).mean() == pytest.approx(noisy_fraction, abs=0.05)
    # Deterministic: the same data gives the same fit
    assert fit_mixture(scores, kind=kind) == fit


def test_binned_lazy_fit_matches_and_polars_posterior_equals_numpy():
    scores = _synthetic(0.3, 20000, "beta", seed=5)
    lf = pl.DataFrame({"reliability": scores}).lazy()
    for kind in ("gaussian", "beta"):
        fit = fit_mixture_lazy(lf, "reliability", kind)
        assert fit.noisy_weight == pytest.approx(0.3, abs=0.05)
        via_polars = lf.select(posterior_noisy_expr(fit, "reliability")).collect().to_series().to_numpy()
        np.testing.assert_allclose(via_polars, posterior_noisy(fit, scores), rtol=1e-9, atol=1e-12)


def test_beta_mixture_refuses_scores_outside_unit_interval():
    with pytest.raises(ValueError, match="beta mixture needs scores in"):
        fit_mixture(np.array([-0.5, 0.2, 0.9]), kind="beta")
