"""Re-mining rounds side by side: one row of QA figures per round, as JSON, Markdown and a plot.

Consumes each round's qa.json dict (qa.report.build_report) and the rounds' history (which CLIP and
calibrator mined each); produces `rounds.json` (rows), `rounds.md` (a table) and `rounds.png` (precision,
coverage, ECE, content AUROC and estimated vs true noise per round) in the QA folder.
"""

from __future__ import annotations

import json
from pathlib import Path

ROUND_FIGURES = (
    "pairs_total",
    "pairs_kept",
    "precision_kept",
    "coverage",
    "ece",
    "noise_rate_estimated",
    "noise_rate_true",
)


def round_rows(reports: list[tuple[int, dict]], history: list[dict]) -> list[dict]:
    """One row per round: the QA headline figures and, where the injection check ran, its AUROC per
    mode as `auroc_<mode>`: reliability of clean part-naming units vs injected units (every injected
    unit names a part, so units that name none, kept by nobody, would only flatter or blur it)."""
    by_round = {h["round"]: h for h in history}
    rows = []
    for k, qa in reports:
        row = {"round": k, "clip_model": by_round.get(k, {}).get("clip_model")}
        row |= {name: qa.get(name) for name in ROUND_FIGURES}
        injection = qa.get("injection") or {}
        for mode, block in (injection.get("modes") or {}).items():
            if isinstance(block, dict):
                row[f"auroc_{mode}"] = block.get("auroc_tagged_clean_vs_injected")
        rows.append(row)
    return rows


def rounds_markdown(rows: list[dict]) -> str:
    if not rows:
        return "_no rounds_\n"
    names = [k for k in rows[0] if k != "clip_model"] + sorted(
        {k for r in rows for k in r if k.startswith("auroc_")} - set(rows[0])
    )

    def cell(v):
        return "—" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))

    lines = ["| " + " | ".join(names) + " |", "|" + " --- |" * len(names)]
    lines += ["| " + " | ".join(cell(r.get(n)) for n in names) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plot_rounds(rows: list[dict], out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for name in (
        "precision_kept",
        "coverage",
        "ece",
        *sorted({k for r in rows for k in r if k.startswith("auroc_")}),
    ):
        values = [r.get(name) for r in rows]
        if any(v is not None for v in values):
            axes[0].plot(rounds, [float("nan") if v is None else v for v in values], marker="o", label=name)
    axes[0].set_title("quality per round")
    axes[0].set_xlabel("round")
    axes[0].legend(fontsize=8)
    for name, style in (("noise_rate_estimated", "o-"), ("noise_rate_true", "s--")):
        values = [r.get(name) for r in rows]
        if any(v is not None for v in values):
            axes[1].plot(rounds, [float("nan") if v is None else v for v in values], style, label=name)
    axes[1].set_title("noise among kept pairs: estimated vs true")
    axes[1].set_xlabel("round")
    axes[1].legend(fontsize=8)
    for ax in axes:
        ax.set_xticks(rounds)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def write_rounds(qa_dir: Path, reports: list[tuple[int, dict]], history: list[dict]) -> list[dict]:
    qa_dir.mkdir(parents=True, exist_ok=True)
    rows = round_rows(reports, history)
    (qa_dir / "rounds.json").write_text(json.dumps({"rounds": rows, "history": history}, indent=2))
    (qa_dir / "rounds.md").write_text(rounds_markdown(rows))
    if rows:
        plot_rounds(rows, qa_dir / "rounds.png")
    return rows


__all__ = ["ROUND_FIGURES", "plot_rounds", "round_rows", "rounds_markdown", "write_rounds"]
