"""qa.render: the summary, breakdowns and figures of a qa.json dict as Markdown and self-contained HTML."""

from __future__ import annotations

import base64

from qa.render import fmt, render_html, render_markdown, summary_markdown

PNG_1PX = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)


def _qa(**overrides) -> dict:
    qa = {
        "run": {"run_id": "r-7", "pairs_dir": "/runs/a", "manifest_path": "/data/m.parquet"},
        "generated_at": "2026-12-01T00:00:00+00:00",
        "pairs_total": 120,
        "pairs_kept": 80,
        "noise_rate_estimated": 0.123456,
        "ground_truth": False,
        "checks": {"schema": "pass", "duplicates": "fail"},
        "check_details": {"duplicates": {"summary": "2 repeated keys"}},
        "breakdowns": {
            "shard": [{"key": f"{i:05d}", "pairs": 1, "noise_rate_estimated": i / 100} for i in range(25)]
        },
        "figures": {"score_histograms": "scores.png"},
        "sheets": {},
        "injection": None,
    }
    return qa | overrides


def test_fmt_is_for_people():
    assert (fmt(None), fmt(True), fmt(0.123456), fmt(7)) == ("n/a", "true", "0.1235", "7")


def test_summary_has_headline_checks_and_no_ground_truth_note():
    md = summary_markdown(_qa())
    assert "# QA report — run r-7" in md and "0.1235" in md
    assert "Data checks — 1/2 pass" in md and "| duplicates | FAIL | 2 repeated keys |" in md
    assert "No ground truth" in md and "Estimator check" not in md


def test_markdown_caps_the_shard_table_and_links_figures():
    md = render_markdown(_qa())
    assert "the 20 noisiest of 25 shards" in md
    assert "00024" in md and "| 00000 |" not in md  # the noisiest are shown, the cleanest cut
    assert "![score histograms](scores.png)" in md


def test_html_embeds_every_image_and_escapes_text(tmp_path):
    (tmp_path / "scores.png").write_bytes(PNG_1PX)
    qa = _qa(run={"run_id": "<script>", "pairs_dir": "/x", "manifest_path": None})
    page = render_html(qa, tmp_path)
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert page.count("data:image/png;base64,") == 1 and "src='scores.png'" not in page
    assert "class='fail'" in page and "class='pass'" in page


def _mode(name: str, auroc: float) -> dict:
    return {
        "mode": name,
        "available": True,
        "injected": 5,
        "injected_rate": 0.25,
        "auroc_clean_vs_injected": auroc,
        "injected_kept_fraction": 0.4,
        "clean_kept_fraction": 0.7,
        "examples": [{"person_id": 3, "original": "a green top", "injected": "a purple top"}],
    }


def test_injection_modes_get_one_row_each_and_say_why_one_is_missing(tmp_path):
    unavailable = {"mode": "attribute", "available": False, "reason": "no synth_identities.json in /d"}
    modes = {"any": _mode("any", 0.8125), "same-part": _mode("same-part", 0.6875), "attribute": unavailable}
    md = render_markdown(_qa(injection={**modes["any"], "modes": modes}))
    assert "## Estimator check: injected noise (mode any)" in md and "### Injection modes" in md
    assert "| any | 5 | 0.2500 | 0.8125 |" in md and "| same-part | 5 | 0.2500 | 0.6875 |" in md
    assert "| attribute | n/a |" in md and "unavailable: no synth_identities.json in /d" in md
    assert "| same-part | 3 | a green top | a purple top |" in md
    (tmp_path / "scores.png").write_bytes(PNG_1PX)
    page = render_html(_qa(injection={**modes["any"], "modes": modes}), tmp_path)
    assert "<th>AUROC part-naming</th>" in page and "unavailable: no synth_identities.json" in page
    # One mode alone: the table as before, no per-mode section; a first mode unavailable says why
    one = render_markdown(_qa(injection={**modes["any"], "modes": {"any": modes["any"]}}))
    assert "Injection modes" not in one and "| injected rate | 0.2500 |" in one
    first = render_markdown(_qa(injection={**unavailable, "modes": {"attribute": unavailable}}))
    assert "Mode attribute unavailable: no synth_identities.json in /d" in first
