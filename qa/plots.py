"""QA figures as PNG files: score histograms, precision/coverage curve, reliability diagram, noise
by body part, the injection modes side by side (the audit contact sheets are in qa.sheets).

Consumes the plain dicts that `qa.noise` and `qa.truth` produce (histogram counts, curve rows,
calibration bins, breakdown rows) and a `qa.mixture.MixtureFit`; produces PNG files. matplotlib draws
through its object API (`Figure`, Agg canvas), never pyplot's global state.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from qa.mixture import MixtureFit, component_densities, posterior_noisy

DPI = 110


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    return path


def plot_score_histograms(
    hists: dict[str, dict[str, np.ndarray]], path: Path, fit: MixtureFit | None = None, fit_score: str = ""
) -> Path:
    """One panel per score; kept vs dropped stacked; the mixture's components over its score."""
    names = list(hists)
    cols = 2
    rows = max(1, math.ceil(len(names) / cols))
    fig = Figure(figsize=(10, 3.4 * rows))
    for i, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, i + 1)
        h = hists[name]
        edges = h["edges"]
        width = edges[1] - edges[0]
        ax.bar(edges[:-1], h["true"], width=width, align="edge", color="#3a7dc9", label="kept")
        ax.bar(
            edges[:-1],
            h["false"],
            width=width,
            align="edge",
            bottom=h["true"],
            color="#d98c3a",
            label="dropped",
        )
        if fit is not None and name == fit_score:
            grid = np.linspace(edges[0], edges[-1], 400)
            total = float(h["true"].sum() + h["false"].sum())
            noisy, clean = component_densities(fit, grid)
            ax.plot(
                grid,
                noisy * total * width,
                color="#b01010",
                lw=1.6,
                label=f"noisy comp. ({fit.weights[0]:.2f})",
            )
            ax.plot(
                grid,
                clean * total * width,
                color="#108030",
                lw=1.6,
                label=f"clean comp. ({fit.weights[1]:.2f})",
            )
            post = posterior_noisy(fit, grid)
            ax2 = ax.twinx()
            ax2.plot(grid, post, color="black", lw=0.8, ls="--")
            ax2.set_ylim(0, 1.02)
            ax2.set_ylabel("P(noisy | score)")
        ax.set_title(name)
        ax.set_ylabel("pairs")
        ax.legend(fontsize=7, loc="upper left")
    return _save(fig, path)


def plot_precision_coverage(curve: list[dict], path: Path, keep_threshold: float | None = None) -> Path:
    """Precision of kept pairs and coverage of groundable units vs the reliability threshold."""
    fig = Figure(figsize=(9, 3.6))
    t = np.array([c["threshold"] for c in curve])
    prec = np.array([np.nan if c["precision"] is None else c["precision"] for c in curve])
    cov = np.array([np.nan if c["coverage"] is None else c["coverage"] for c in curve])
    ax = fig.add_subplot(1, 2, 1)
    ax.plot(t, prec, marker="o", ms=3, label="precision (kept)")
    ax.plot(t, cov, marker="s", ms=3, label="coverage (groundable)")
    if keep_threshold is not None:
        ax.axvline(keep_threshold, color="grey", ls=":", label=f"keep threshold {keep_threshold:g}")
    ax.set_xlabel("reliability threshold")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7)
    ax2 = fig.add_subplot(1, 2, 2)
    ax2.plot(cov, prec, marker="o", ms=3)
    ax2.set_xlabel("coverage")
    ax2.set_ylabel("precision")
    ax2.set_xlim(0, 1.02)
    ax2.set_ylim(0, 1.02)
    ax2.set_title("precision / coverage")
    return _save(fig, path)


def _reliability_bars(ax, bins: list[dict], title: str) -> None:
    for b in bins:
        if b["count"]:
            ax.bar(
                b["lo"],
                b["accuracy"],
                width=b["hi"] - b["lo"],
                align="edge",
                color="#3a7dc9",
                edgecolor="white",
            )
            ax.plot([b["mean_prob"]], [b["accuracy"]], "k.", ms=4)
            # The pairs behind each bar: a bin of a few hundred pairs swings, one of thousands does not
            ax.text(
                (b["lo"] + b["hi"]) / 2,
                min(b["accuracy"] + 0.02, 0.97),
                f"{int(b['count']):,}",
                ha="center",
                fontsize=6,
            )
    ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("reliability (predicted P(correct))")
    ax.set_ylabel("fraction correct")
    ax.set_title(title)


def _ece_title(name: str, ece: float | None) -> str:
    return name + (f" — ECE {ece:.3f}" if ece is not None else "")


def plot_reliability_diagram(bins: list[dict], ece: float | None, path: Path) -> Path:
    """Accuracy vs mean reliability per bin (bar width = bin), with the diagonal and counts."""
    fig = Figure(figsize=(5, 4.6))
    _reliability_bars(fig.add_subplot(1, 1, 1), bins, _ece_title("reliability diagram", ece))
    return _save(fig, path)


def plot_reliability_before_after(
    before: tuple[list[dict], float | None], after: tuple[list[dict], float | None], path: Path, note: str
) -> Path:
    """Two reliability diagrams side by side: the run's reliability and the refit one (`note` under them,
    e.g. how the pairs were weighted and validated)."""
    fig = Figure(figsize=(9.5, 4.8))
    for k, ((bins, ece), name) in enumerate(((before, "mined reliability"), (after, "refit on the audit"))):
        _reliability_bars(fig.add_subplot(1, 2, k + 1), bins, _ece_title(name, ece))
    fig.text(0.5, 0.01, note, ha="center", fontsize=7)
    fig.subplots_adjust(bottom=0.16)
    return _save(fig, path)


def plot_noise_by_group(rows: list[dict], path: Path, title: str) -> Path:
    """Estimated (and true, when present) noise of kept pairs per group."""
    keys = [str(r["key"]) for r in rows]
    x = np.arange(len(keys))
    series = [("noise_rate_estimated", "1 − reliability"), ("noise_rate_mixture", "mixture")]
    if any(r.get("noise_rate_true") is not None for r in rows):
        series.append(("noise_rate_true", "true"))
    fig = Figure(figsize=(max(6, 0.9 * len(keys) + 3), 3.4))
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(series)
    for k, (col, label) in enumerate(series):
        vals = [np.nan if r.get(col) is None else r[col] for r in rows]
        ax.bar(x + k * width, vals, width=width, label=label)
    ax.set_xticks(x + width * (len(series) - 1) / 2, keys, rotation=30, fontsize=8)
    ax.set_ylabel("noise rate of kept pairs")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(fig, path)


INJECTION_BARS = (
    ("auroc_clean_vs_injected", "AUROC clean vs injected"),
    ("auroc_tagged_clean_vs_injected", "AUROC part-naming clean vs injected"),
    ("injected_kept_fraction", "injected kept"),
    ("clean_kept_fraction", "clean kept"),
)


def plot_injection_modes(modes: dict[str, dict], path: Path) -> Path:
    """Per injection mode: AUROC of reliability and the kept fractions of injected and clean units
    (an unavailable mode keeps its slot, marked n/a, so the modes line up with the table)."""
    names = list(modes)
    x = np.arange(len(names))
    width = 0.8 / len(INJECTION_BARS)
    fig = Figure(figsize=(max(5, 1.8 * len(names) + 3), 3.4))
    ax = fig.add_subplot(1, 1, 1)
    for k, (key, label) in enumerate(INJECTION_BARS):
        vals = [np.nan if modes[m].get(key) is None else modes[m][key] for m in names]
        ax.bar(x + k * width, vals, width=width, label=label)
    for i, m in enumerate(names):
        if not modes[m].get("available", True):
            ax.text(x[i] + 0.4 - width / 2, 0.05, "n/a", ha="center", fontsize=8, color="grey")
    ax.axhline(0.5, color="grey", ls=":", lw=1)  # AUROC of a reliability that cannot tell
    ax.set_xticks(x + width * (len(INJECTION_BARS) - 1) / 2, names, fontsize=9)
    ax.set_ylim(0, 1.02)
    ax.set_title("injected noise by mode")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(fig, path)


__all__ = [
    "plot_injection_modes",
    "plot_noise_by_group",
    "plot_precision_coverage",
    "plot_reliability_diagram",
    "plot_score_histograms",
]
