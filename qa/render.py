"""Render a QA result (the qa.json dict) as Markdown and as one self-contained HTML page.

Consumes the dict `qa.report.build_report` returns (and writes as qa.json) plus the folder holding its
PNG files; produces `summary_markdown` (headline figures, checks, injection: what a flow publishes as
an artifact), `render_markdown` (report.md: the summary plus breakdowns and figures linked by file
name) and `render_html` (report.html: the same content with every PNG embedded as a base64 data URI,
no external resource, so the page can be mailed or attached as it is). Both renderers walk the same
list of blocks, so the two files never disagree.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

Block = tuple  # ("h", level, text) | ("p", text) | ("table", headers, rows) | ("img", file, caption)

HEADLINE = [
    ("pairs_total", "pairs (text units scored)"),
    ("pairs_kept", "pairs kept"),
    ("kept_rate", "kept rate"),
    ("noise_rate_estimated", "estimated noise of kept pairs: mean(1 − reliability)"),
    ("noise_rate_mixture", "estimated noise of kept pairs: 2-component mixture"),
    ("noise_rate_true", "true noise of kept pairs (1 − precision)"),
    ("precision_kept", "precision of kept pairs"),
    ("coverage", "coverage of groundable units"),
    ("ece", "ECE of reliability"),
    ("estimate_error", "|estimated − true| noise"),
    ("estimate_error_mixture", "|mixture − true| noise"),
]
BREAKDOWN_COLS = [
    "key",
    "pairs",
    "kept",
    "kept_rate",
    "mean_reliability",
    "noise_rate_estimated",
    "noise_rate_mixture",
    "noise_rate_true",
]
MAX_SHARD_ROWS = 20


def fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


MIXTURE_MARKS = {
    "consistent": " (checked: consistent)",
    "inconsistent": " — UNRELIABLE here",
    "unverified": " — unverified hint",
}


def _label(qa: dict, key: str, label: str) -> str:
    """The headline label; the mixture's says whether a measurement backs it (qa.verdict.mixture_check)."""
    if key != "noise_rate_mixture":
        return label
    check = qa.get("mixture_check") or {}
    if check.get("status") == "not_converged":
        return f"{label} — n/a: {check['why']}"
    return label + MIXTURE_MARKS.get(check.get("status"), "")


def _summary_blocks(qa: dict) -> list[Block]:
    run = qa.get("run", {})
    blocks: list[Block] = [
        ("h", 1, f"QA report — run {run.get('run_id', '?')}"),
        (
            "p",
            f"Pairs folder `{run.get('pairs_dir', '?')}`; manifest `{run.get('manifest_path') or 'n/a'}`; "
            f"generated {qa.get('generated_at', '?')}.",
        ),
        *(
            [("h", 2, "Verdict: which figure to trust"), ("p", qa["verdict"]["why"])]
            if qa.get("verdict")
            else []
        ),
        *_domain_blocks(qa),
        ("h", 2, "Noise"),
        (
            "table",
            ["figure", "value"],
            [[_label(qa, key, label), fmt(qa.get(key))] for key, label in HEADLINE if key in qa],
        ),
    ]
    mix = qa.get("mixture")
    if mix:
        blocks.append(
            (
                "p",
                f"Mixture: {mix['kind']} on `{mix['score']}`, noisy component weight {fmt(mix['weights'][0])} "
                f"(mean {fmt(mix['means'][0])}) vs clean {fmt(mix['weights'][1])} (mean {fmt(mix['means'][1])}); "
                f"{mix['n_iter']} EM iterations, converged {fmt(mix['converged'])}. "
                f"Is its noise figure backed by a measurement? {(qa.get('mixture_check') or {}).get('why', 'n/a')}.",
            )
        )
    if qa.get("audit"):
        blocks += _audit_blocks(qa)
    if not qa.get("ground_truth"):
        blocks.append(("p", "No ground truth (gt_links) in the manifest: only label-free estimates."))
    details = qa.get("check_details", {})
    rows = [
        [name, verdict.upper(), details.get(name, {}).get("summary", "")]
        for name, verdict in qa["checks"].items()
    ]
    failed = sum(v != "pass" for v in qa["checks"].values())
    blocks += [
        ("h", 2, f"Data checks — {len(rows) - failed}/{len(rows)} pass"),
        ("table", ["check", "result", "details"], rows),
    ]
    inj = qa.get("injection")
    if inj:
        mode = inj.get("mode")
        blocks.append(("h", 2, "Estimator check: injected noise" + (f" (mode {mode})" if mode else "")))
        if inj.get("available", True):
            blocks.append(("table", ["figure", "value"], _injection_rows(inj)))
        else:
            blocks.append(("p", f"Mode {mode} unavailable: {inj.get('reason', '?')}"))
        modes = inj.get("modes") or {}
        if len(modes) > 1 or any(not b.get("available", True) for b in modes.values()):
            blocks += _mode_blocks(modes)
    return blocks


def _interval(fig: dict | None) -> str:
    if not fig:
        return "n/a"
    est = fmt(fig.get("estimate")) if fig.get("estimate") is not None else "unknown"
    return f"{est} [{fmt(fig.get('ci_low'))}, {fmt(fig.get('ci_high'))}] ({fig.get('n_labels', 0)} labels)"


def _audit_blocks(qa: dict) -> list[Block]:
    """The audited noise rates (95% interval) beside the label-free and, where known, the true ones."""
    audit = qa["audit"]
    rows = [
        [
            "noise of kept pairs",
            _interval(audit.get("noise_rate_kept")),
            fmt(qa.get("noise_rate_estimated")),
            fmt(qa.get("noise_rate_mixture")),
            fmt(qa.get("noise_rate_true")),
        ],
        ["noise of all pairs", _interval(audit.get("noise_rate_all")), "", "", ""],
        [
            "ECE (audited pairs)",
            f"{fmt(audit.get('ece_before'))} → {fmt(audit.get('ece_after'))} refit",
            "",
            "",
            "",
        ],
    ]
    return [
        ("h", 2, "Audit: a labelled sample"),
        (
            "p",
            f"{audit.get('n_items_labelled')} of {audit.get('n_items')} sampled pairs labelled (`{audit.get('dir')}`); "
            "stratified estimate with its 95% interval; refit calibrator "
            f"`{audit.get('calibrator')}`.",
        ),
        ("table", ["figure", "audit [95% CI]", "1 − reliability", "mixture", "true"], rows),
    ]


MODE_DESCRIPTIONS = {
    "any": "unit swapped for a part-naming unit of another person",
    "same-part": "unit swapped for another person's unit naming the same body part(s)",
    "attribute": "one colour or garment word replaced by one the person does not wear",
}
MODE_COLS = [
    ("injected", "injected"),
    ("injected_rate", "injected rate"),
    ("auroc_clean_vs_injected", "AUROC"),
    ("auroc_tagged_clean_vs_injected", "AUROC part-naming"),
    ("injected_kept_fraction", "injected kept"),
    ("clean_kept_fraction", "clean kept"),
    ("recovered_rate", "recovered rate"),
    ("true_noise_rise", "true noise rise"),
    ("recovery_ratio", "recovered / injected"),
]
MODE_EXAMPLES = 3


def _mode_blocks(modes: dict[str, dict]) -> list[Block]:
    """One row per injection mode (an unavailable one says why), then a few injected units of each."""
    rows = []
    for name, b in modes.items():
        if b.get("available", True):
            rows.append([name, *(fmt(b.get(k)) for k, _ in MODE_COLS), MODE_DESCRIPTIONS.get(name, "")])
            # Attribute swaps split by the kind of word changed (only the columns measured per slot)
            for slot, sb in (b.get("by_slot") or {}).items():
                cells = [fmt(sb.get(k)) if k in sb else "" for k, _ in MODE_COLS]
                rows.append([f"{name}: {slot}", *cells, f"only the units whose {slot} word was changed"])
        else:
            rows.append([name, *("n/a" for _ in MODE_COLS), f"unavailable: {b.get('reason', '?')}"])
    blocks: list[Block] = [
        ("h", 3, "Injection modes"),
        ("table", ["mode", *(label for _, label in MODE_COLS), "what is injected"], rows),
    ]
    examples = [
        [name, str(e["person_id"]), e["original"], e["injected"]]
        for name, b in modes.items()
        for e in (b.get("examples") or [])[:MODE_EXAMPLES]
    ]
    if examples:
        blocks.append(("table", ["mode", "person", "clean unit", "injected unit"], examples))
    return blocks


def _injection_rows(inj: dict) -> list[list[str]]:
    keys = [
        ("fraction_requested", "fraction requested"),
        ("units", "text units in the audit subset"),
        ("injected", "units injected"),
        ("alterable_units", "units with a colour or garment word of their person (attribute mode)"),
        ("injected_rate", "injected rate"),
        ("lost", "injected units not found after re-splitting"),
        ("estimated_noise_clean", "estimated noise, all pairs, clean"),
        ("estimated_noise_mixed", "estimated noise, all pairs, mixed"),
        ("recovered_rate", "recovered rate (rise of the estimate)"),
        ("recovery_ratio", "recovered / injected"),
        ("estimated_noise_kept_clean", "estimated noise of kept pairs, clean"),
        ("estimated_noise_kept_mixed", "estimated noise of kept pairs, mixed"),
        ("mixture_noise_clean", "mixture noise, all pairs, clean"),
        ("mixture_noise_mixed", "mixture noise, all pairs, mixed"),
        ("mixture_recovered_rate", "mixture recovered rate"),
        ("mixture_why_na", "mixture figures n/a because"),
        ("auroc_clean_vs_injected", "AUROC of reliability, clean vs injected"),
        ("auroc_tagged_clean_vs_injected", "AUROC, clean units naming a part vs injected"),
        ("true_noise_rise", "true noise rise (all pairs; injected pairs counted wrong)"),
        ("recovery_ratio_true", "recovered / true noise rise"),
        ("injected_kept_fraction", "fraction of injected pairs kept"),
        ("clean_kept_fraction", "fraction of clean pairs kept"),
    ]
    return [[label, fmt(inj.get(key))] for key, label in keys if key in inj]


def _breakdown_blocks(qa: dict) -> list[Block]:
    blocks: list[Block] = [("h", 2, "Breakdowns (noise of kept pairs)")]
    for key, rows in qa.get("breakdowns", {}).items():
        shown = rows
        note = ""
        if key == "shard" and len(rows) > MAX_SHARD_ROWS:
            shown = sorted(rows, key=lambda r: -(r.get("noise_rate_estimated") or 0))[:MAX_SHARD_ROWS]
            note = f" (the {MAX_SHARD_ROWS} noisiest of {len(rows)} shards; all in qa.json)"
        cols = [c for c in BREAKDOWN_COLS if any(c in r for r in shown)]
        blocks += [
            ("h", 3, f"by {key}{note}"),
            ("table", cols, [[fmt(r.get(c)) for c in cols] for r in shown]),
        ]
    return blocks


def _figure_blocks(qa: dict) -> list[Block]:
    blocks: list[Block] = []
    figures = qa.get("figures", {})
    if figures:
        blocks.append(("h", 2, "Figures"))
        blocks += [("img", f, name.replace("_", " ")) for name, f in figures.items()]
    sheets = qa.get("sheets", {})
    if sheets:
        blocks.append(("h", 2, "Visual audit sheets"))
        blocks.append(
            (
                "p",
                "Sampled pairs per reliability band (seeded): blue box = mined region, yellow = mask outline; "
                "frame green = correct, red = wrong, grey = no ground truth.",
            )
        )
        for band, sheet in sheets.items():
            caption = f"{band} band {sheet['range']}: {sheet['shown']} of {sheet['in_band']} pairs"
            blocks.append(("img", sheet["file"], caption))
    return blocks


def _domain_blocks(qa: dict) -> list[Block]:
    """Does the calibrator apply here (qa.domain), and the captions' vocabulary coverage."""
    domain = ((qa.get("verdict") or {}).get("calibrator") or {}).get("domain") or {}
    rows = [[name, c["status"].upper(), c["why"]] for name, c in (domain.get("checks") or {}).items()]
    vocab = qa.get("vocabulary")
    if vocab and "vocabulary" not in (domain.get("checks") or {}):
        rows.append(["vocabulary", vocab["status"].upper(), vocab["why"]])
    if not rows:
        return []
    return [
        ("p", "Does the calibrator apply to this run's data? (qa.domain)"),
        ("table", ["check", "", "why"], rows),
    ]


def summary_markdown(qa: dict) -> str:
    """Headline figures, check verdicts and the injection result as Markdown (no images)."""
    return to_markdown(_summary_blocks(qa))


def render_markdown(qa: dict) -> str:
    """report.md: the summary, breakdowns, and figures/sheets linked by their file names."""
    return to_markdown(_summary_blocks(qa) + _breakdown_blocks(qa) + _figure_blocks(qa))


def to_markdown(blocks: list[Block]) -> str:
    out: list[str] = []
    for block in blocks:
        if block[0] == "h":
            out.append(f"{'#' * block[1]} {block[2]}\n")
        elif block[0] == "p":
            out.append(block[1] + "\n")
        elif block[0] == "table":
            headers, rows = block[1], block[2]
            out.append("| " + " | ".join(headers) + " |")
            out.append("| " + " | ".join("---" for _ in headers) + " |")
            out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
            out.append("")
        elif block[0] == "img":
            out.append(f"![{block[2]}]({block[1]})\n")
    return "\n".join(out).rstrip() + "\n"


def _inline_code(text: str) -> str:
    # `x` → <code>x</code>, after escaping: enough for the paths the paragraphs quote
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def render_html(qa: dict, out_dir: str | Path) -> str:
    """report.html: self-contained (PNG files from `out_dir` embedded as data URIs, inline CSS)."""
    out = Path(out_dir)
    body: list[str] = []
    for block in _summary_blocks(qa) + _breakdown_blocks(qa) + _figure_blocks(qa):
        if block[0] == "h":
            body.append(f"<h{block[1]}>{html.escape(block[2])}</h{block[1]}>")
        elif block[0] == "p":
            body.append(f"<p>{_inline_code(block[1])}</p>")
        elif block[0] == "table":
            head = "".join(f"<th>{html.escape(h)}</th>" for h in block[1])
            rows = "".join(
                "<tr>"
                + "".join(f"<td class='{_cell_class(c)}'>{html.escape(str(c))}</td>" for c in row)
                + "</tr>"
                for row in block[2]
            )
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif block[0] == "img":
            data = base64.b64encode((out / block[1]).read_bytes()).decode("ascii")
            body.append(
                f"<figure><img alt='{html.escape(block[2])}' src='data:image/png;base64,{data}'>"
                f"<figcaption>{html.escape(block[2])}</figcaption></figure>"
            )
    title = html.escape(f"QA report — run {qa.get('run', {}).get('run_id', '?')}")
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{title}</title><style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def _cell_class(cell: Any) -> str:
    return {"PASS": "pass", "FAIL": "fail"}.get(str(cell), "")


_CSS = (
    "body{font-family:sans-serif;max-width:1200px;margin:1em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;margin:.5em 0 1.2em}td,th{border:1px solid #ccc;padding:3px 8px;"
    "font-size:13px;text-align:left}th{background:#f0f0f0}td.pass{color:#1a7f2e;font-weight:bold}"
    "td.fail{color:#c01818;font-weight:bold}figure{margin:1em 0}img{max-width:100%;border:1px solid #ddd}"
    "figcaption{font-size:13px;color:#555}code{background:#f4f4f4;padding:0 3px}"
)

__all__ = ["render_html", "render_markdown", "summary_markdown", "to_markdown"]
