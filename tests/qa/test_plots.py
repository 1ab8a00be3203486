"""qa.plots and qa.sheets write readable PNGs; mixture densities come from the one log-density."""

from __future__ import annotations

import numpy as np
from PIL import Image

from qa import plots
from qa.mixture import component_densities, fit_mixture
from qa.sheets import SheetItem, contact_sheet


def test_component_densities_integrate_to_the_weights():
    rng = np.random.default_rng(0)
    fit = fit_mixture(np.concatenate([rng.normal(0.1, 0.05, 300), rng.normal(0.6, 0.05, 700)]))
    grid = np.linspace(-1, 2, 6001)
    noisy, clean = component_densities(fit, grid)
    step = grid[1] - grid[0]
    assert abs(noisy.sum() * step - fit.weights[0]) < 1e-3 and abs(clean.sum() * step - fit.weights[1]) < 1e-3


def test_figures_are_written_as_png(tmp_path):
    edges = np.linspace(0, 1, 11)
    hists = {"reliability": {"edges": edges, "true": np.arange(10), "false": np.arange(10)[::-1]}}
    fit = fit_mixture(np.linspace(0, 1, 50))
    paths = [
        plots.plot_score_histograms(hists, tmp_path / "h.png", fit, "reliability"),
        plots.plot_precision_coverage(
            [{"threshold": t, "kept": 10, "precision": 0.9, "coverage": 1 - t} for t in (0.0, 0.5, 1.0)],
            tmp_path / "pc.png",
            keep_threshold=0.5,
        ),
        plots.plot_reliability_diagram(
            [
                {"lo": 0.0, "hi": 0.5, "count": 4, "mean_prob": 0.3, "accuracy": 0.25},
                {"lo": 0.5, "hi": 1.0, "count": 6, "mean_prob": 0.8, "accuracy": 0.83},
            ],
            0.04,
            tmp_path / "rd.png",
        ),
        plots.plot_noise_by_group([{"key": "head", "noise_rate_estimated": 0.1}], tmp_path / "g.png", "t"),
    ]
    for path in paths:
        with Image.open(path) as img:
            assert img.format == "PNG" and img.width > 100 and img.height > 100


def test_sheet_tile_of_a_missing_image_says_why(tmp_path):
    item = SheetItem(
        image_path=tmp_path / "gone.png",
        bbox_xyxy=(1.0, 2.0, 5.0, 9.0),
        mask_rle=None,
        sentence="a red coat",
        reliability=0.7,
        correct=None,
        region_label="upper",
        sample_id="gone.png#0",
    )
    path = contact_sheet([item, item], tmp_path / "sheet.png", "title", columns=2)
    with Image.open(path) as img:
        assert img.format == "PNG" and img.width > 2 * 150
        pixels = np.asarray(img.convert("RGB"))
    assert (pixels == 235).all(axis=2).sum() > 100 * 100  # the grey placeholder tile, with the reason on it
