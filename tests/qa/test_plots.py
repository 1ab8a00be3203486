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


def _sheet_item(path, bbox):
    return SheetItem(
        image_path=path,
        bbox_xyxy=bbox,
        mask_rle=None,
        sentence="a thin strip",
        reliability=0.9,
        correct=True,
        region_label="upper",
        sample_id=f"{path.name}#0",
    )


def test_sheet_tiles_of_very_wide_and_tall_images_draw_their_boxes(tmp_path):
    # Downscaled into a 168 x 224 tile, a 10000 x 20 image is 1 px high: its box's inclusive bottom
    # (y0 + 20 * scale - 1) falls before its top, which PIL refuses unless the box is clamped.
    Image.new("RGB", (10000, 20), (90, 90, 90)).save(tmp_path / "wide.png")
    Image.new("RGB", (20, 10000), (90, 90, 90)).save(tmp_path / "tall.png")
    items = [
        _sheet_item(tmp_path / "wide.png", (0.0, 0.0, 10000.0, 20.0)),
        _sheet_item(tmp_path / "tall.png", (0.0, 0.0, 20.0, 10000.0)),
        _sheet_item(tmp_path / "wide.png", (5000.0, 5.0, 5001.0, 6.0)),  # a 1 px box: still drawn
    ]
    path = contact_sheet(items, tmp_path / "sheet.png", "extreme aspect ratios", columns=3)
    with Image.open(path) as img:
        pixels = np.asarray(img.convert("RGB")).astype(int)
    box_colour = np.all(pixels == (0, 200, 255), axis=2)
    for column in range(3):  # every tile carries the region box colour
        x = 6 + column * (168 + 6)
        assert box_colour[30 : 30 + 224, x : x + 168].sum() >= 1, column
    # The wide image's box spans the tile's width, the tall image's its height.
    assert box_colour[30 : 30 + 224, 6 : 6 + 168].any(axis=0).sum() >= 160
    assert box_colour[30 : 30 + 224, 180 : 180 + 168].any(axis=1).sum() >= 215
