"""qa.report end to end: known noise on a hand-built run with ground truth, the CLI on a mined tiny run,
a self-contained HTML page, and the injected-noise estimator check."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from qa.report import build_report, main, summary_markdown
from storage.plan import plan_shards
from storage.reader import read_pairs
from storage.schemas import PAIRS_SCHEMA, STATUS_SCHEMA, with_version
from storage.shards import begin_run, commit_shard, finalize_run
from storage.truth import judge_pairs, pair_quality
from tests.factories import pair_row, run_config, status_row

CAPTION = "Red hat on top. Blue shirt worn. Black pants below. Walks fast."
PHRASES = [("Red hat", 0), ("Blue shirt", 1), ("Black pants", 2)]
REGIONS = [
    {"id": 0, "label": "head", "bbox": [8.0, 0.0, 24.0, 16.0]},
    {"id": 1, "label": "upper", "bbox": [4.0, 16.0, 28.0, 40.0]},
    {"id": 2, "label": "lower", "bbox": [4.0, 40.0, 28.0, 64.0]},
]
# Per image: (region id the unit was matched to, reliability) for the 4 units; correct iff the unit's
# phrase links that region (unit 3 is ungroundable, so always wrong)
PLAN = {
    "a": [(0, 0.92), (2, 0.71), (2, 0.42), (1, 0.22)],  # correct, wrong, correct, wrong
    "b": [(0, 0.83), (1, 0.64), (0, 0.56), (1, 0.12)],  # correct, correct, wrong, wrong
}
CORRECT = {"a": [True, False, True, False], "b": [True, True, False, False]}
CONFIG = run_config()


def _units() -> list[tuple[int, int]]:
    spans, start = [], 0
    for sentence in CAPTION.split(". "):
        text = sentence if sentence.endswith(".") else sentence + "."
        spans.append((start, start + len(text)))
        start += len(text) + 1
    return spans


def make_known_run(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "data"
    links = []
    for (s, e), (phrase, rid) in zip(_units(), [*PHRASES, (None, None)], strict=True):
        p0 = CAPTION.find(phrase) if phrase else None
        entry = {"span": [s, e], "region_ids": [rid] if phrase else [], "phrases": []}
        if phrase:
            entry["phrases"] = [{"span": [p0, p0 + len(phrase)], "region_id": rid}]
        links.append(entry)
    rows = []
    for k, name in enumerate(PLAN):
        path = f"imgs/{name}.png"
        (root / "imgs").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((64, 32, 3), 60 + 80 * k, np.uint8)).save(root / path)
        rows.append(
            {
                "sample_id": f"{path}#0",
                "image_id": path,
                "person_id": k + 1,
                "split": ["train", "test"][k],
                "image_path": path,
                "caption_index": 0,
                "caption": CAPTION,
                "gt_regions": json.dumps(REGIONS),
                "gt_links": json.dumps(links),
            }
        )
    manifest = root / "manifest.parquet"
    pq.write_table(
        pa.Table.from_pylist(rows, schema=with_version("manifest", {"rsm.root": str(root)})), manifest
    )

    out = tmp_path / "run"
    plan = plan_shards(manifest, 1, CONFIG)
    begin_run(out, plan)
    for spec in plan.shards:
        (sample,) = plan.rows_for(spec.shard_id).to_pylist()
        name = Path(sample["image_path"]).stem
        pairs = []
        for u, ((s, e), (rid, rel)) in enumerate(zip(_units(), PLAN[name], strict=True)):
            pairs.append(
                pair_row(
                    sample,
                    sentence_index=u,
                    sentence=CAPTION[s:e],
                    char_start=s,
                    char_end=e,
                    part_tags=[REGIONS[u]["label"]] if u < 3 else [],
                    region_id=rid,
                    region_label=REGIONS[rid]["label"],
                    bbox_xyxy=REGIONS[rid]["bbox"],
                    clip_cosine=rel / 2,
                    softmax_prob=rel,
                    margin=0.1,
                    part_agreement=1.0,
                    reliability=rel,
                    kept=rel >= 0.5,
                )
            )
        status = status_row(
            sample, n_regions=3, n_sentences=4, n_pairs=4, n_kept=sum(p["kept"] for p in pairs)
        )
        commit_shard(
            out,
            plan,
            spec.shard_id,
            pa.Table.from_pylist(pairs, schema=PAIRS_SCHEMA),
            pa.Table.from_pylist([status], schema=STATUS_SCHEMA),
        )
    finalize_run(out, plan)
    return out, manifest


def test_known_noise_figures_equal_hand_values(tmp_path):
    out, _ = make_known_run(tmp_path)
    qa = build_report(out, tmp_path / "qa", sheet_samples=4, seed=1)
    rel = np.array([r for name in PLAN for _, r in PLAN[name]], dtype=np.float32).astype(np.float64)
    correct = np.array([c for name in PLAN for c in CORRECT[name]])
    kept = rel >= 0.5
    assert qa["pairs_total"] == 8 and qa["pairs_kept"] == 5
    assert qa["ground_truth"] is True and qa["pairs_judged"] == 8 and qa["groundable_units"] == 6
    # Hand values: kept = a0 a1 b0 b1 b2, of which a0 b0 b1 correct
    assert qa["precision_kept"] == pytest.approx(3 / 5)
    assert qa["noise_rate_true"] == pytest.approx(2 / 5)
    assert qa["coverage"] == pytest.approx(3 / 6)
    assert qa["ece"] == pytest.approx(np.abs(rel - correct).mean(), abs=1e-6)  # one pair per 0.1 bin
    assert qa["noise_rate_estimated"] == pytest.approx((1 - rel[kept]).mean(), abs=1e-6)
    assert qa["estimate_error"] == pytest.approx(abs((1 - rel[kept]).mean() - 0.4), abs=1e-6)
    assert 0.0 <= qa["noise_rate_mixture"] <= 1.0
    curve = {c["threshold"]: c for c in qa["curve"]}
    assert curve[0.0]["precision"] == pytest.approx(4 / 8) and curve[0.0]["coverage"] == pytest.approx(4 / 6)
    # Breakdowns: true noise per region label of kept pairs (head 3 kept / 2 right, lower 1/0, upper 1/1)
    by_label = {r["key"]: r for r in qa["breakdowns"]["region_label"]}
    assert by_label["head"]["noise_rate_true"] == pytest.approx(1 / 3)
    assert by_label["lower"]["noise_rate_true"] == pytest.approx(1.0)
    assert by_label["upper"]["noise_rate_true"] == pytest.approx(0.0)
    by_split = {r["key"]: r for r in qa["breakdowns"]["split"]}
    assert by_split["train"]["noise_rate_estimated"] == pytest.approx((0.08 + 0.29) / 2, abs=1e-6)
    assert by_split["test"]["kept"] == 3 and by_split["test"]["noise_rate_true"] == pytest.approx(1 / 3)
    assert {r["key"] for r in qa["breakdowns"]["shard"]} == {"00000", "00001"}
    assert set(qa["checks"].values()) == {"pass"}
    # Sheets: bands hold 2 (>= 0.8), 4 ([0.3, 0.8)), 2 (< 0.3) pairs, all shown, judged
    assert {b: (s["in_band"], s["shown"]) for b, s in qa["sheets"].items()} == {
        "high": (2, 2),
        "mid": (4, 4),
        "low": (2, 2),
    }
    # The summary the flow publishes carries the same figures
    md = summary_markdown(qa)
    assert "0.4000" in md and "status_accounting" in md


def test_cli_on_a_mined_run_writes_every_output(mined_run, tmp_path):
    out_dir = tmp_path / "qa"
    rc = main(["--pairs", str(mined_run), "--out", str(out_dir), "--sheet-samples", "6", "--seed", "3"])
    assert rc == 0
    pngs = {
        "scores.png",
        "noise_by_part.png",
        "precision_coverage.png",
        "reliability_diagram.png",
        "sheet_high.png",
        "sheet_mid.png",
        "sheet_low.png",
    }
    assert {p.name for p in out_dir.iterdir()} >= pngs | {"qa.json", "report.md", "report.html"}
    for name in pngs:
        with Image.open(out_dir / name) as img:
            assert img.format == "PNG" and img.width > 100
    qa = json.loads((out_dir / "qa.json").read_text())
    for key in (
        "pairs_total",
        "pairs_kept",
        "noise_rate_estimated",
        "noise_rate_mixture",
        "checks",
        "breakdowns",
    ):
        assert key in qa
    assert qa["injection"] is None

    # Streaming per-shard judging equals judging the whole table at once
    pairs = read_pairs(mined_run)
    manifest = pq.read_table(qa["run"]["manifest_path"])
    _, groundable, correct = judge_pairs(pairs, manifest)
    quality = pair_quality(pairs["kept"].to_numpy(), groundable, correct)
    assert qa["pairs_total"] == pairs.num_rows
    assert qa["precision_kept"] == pytest.approx(quality["precision_kept"])
    assert qa["coverage"] == pytest.approx(quality["coverage"])
    assert qa["noise_rate_true"] == pytest.approx(1 - quality["precision_kept"])

    # report.html is self-contained: every PNG inline, nothing fetched
    page = (out_dir / "report.html").read_text()
    assert "http://" not in page and "https://" not in page
    assert not re.search(r"""src=["'](?!data:)""", page) and 'src="file' not in page
    assert page.count("data:image/png;base64,") == len(pngs)
    md = (out_dir / "report.md").read_text()
    assert pngs and all(name in md for name in pngs)


def test_report_refuses_bad_inputs(mined_run, tmp_path, capsys):
    assert main(["--pairs", str(tmp_path / "nope"), "--out", str(tmp_path / "qa")]) == 2
    assert f"error: {tmp_path / 'nope'} does not exist: pass the --out folder" in capsys.readouterr().err
    with pytest.raises(ValueError, match="inside the run folder"):
        build_report(mined_run, mined_run / "qa")
    # A dataset root passed as --pairs, with --out inside it: the --pairs mistake is the one named
    # (before: "--out ... lies inside the run folder", calling a non-run a run folder)
    dataset = tmp_path / "cuhk-pedes"
    dataset.mkdir()
    (dataset / "reid_raw.json").write_text("[]")
    assert main(["--pairs", str(dataset), "--out", str(dataset / "qa2")]) == 2
    err = capsys.readouterr().err
    assert f"{dataset} is not a mining run folder (it has no _run.json)" in err and "lies inside" not in err
    assert sorted(p.name for p in dataset.iterdir()) == ["reid_raw.json"]


def test_attribute_injection_is_unavailable_without_an_identity_file(tmp_path, tiny_clip_dir):
    # A user's own dataset: no synth_identities.json next to the images
    out, _ = make_known_run(tmp_path)
    qa = build_report(
        out,
        tmp_path / "qa",
        sheet_samples=0,
        inject_noise=0.5,
        clip_model=str(tiny_clip_dir),
        inject_modes=("any", "attribute"),
    )
    modes = qa["injection"]["modes"]
    assert modes["any"]["available"] is True and modes["any"]["injected"] > 0
    assert modes["attribute"]["available"] is False
    assert "synth_identities.json" in modes["attribute"]["reason"]
    assert qa["injection"]["mode"] == "any" and "recovered_rate" in qa["injection"]
    assert "unavailable: no synth_identities.json" in (tmp_path / "qa" / "report.md").read_text()
    # Only the unavailable mode: still a report, the block says why, nothing is re-mined
    qa2 = build_report(
        out,
        tmp_path / "qa2",
        sheet_samples=0,
        inject_noise=0.5,
        clip_model=str(tiny_clip_dir),
        inject_modes=("attribute",),
    )
    alone = qa2["injection"]
    assert alone["available"] is False and alone["modes"] == {"attribute": modes["attribute"]}
    assert "injection_modes" not in qa2["figures"]  # no plot of nothing
    assert "Mode attribute unavailable" in (tmp_path / "qa2" / "report.md").read_text()


def test_cli_reads_the_injection_modes(mined_run, tmp_path, tiny_clip_dir, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--pairs", str(mined_run), "--out", str(tmp_path / "qa"), "--inject-modes", "any,colour"])
    assert exc.value.code == 2 and "inject modes" in capsys.readouterr().err
    with pytest.raises(ValueError, match="inject modes"):
        build_report(mined_run, tmp_path / "qa", inject_noise=0.2, inject_modes=())
    rc = main(
        [
            "--pairs",
            str(mined_run),
            "--out",
            str(tmp_path / "qa"),
            "--sheet-samples",
            "0",
            "--no-hashes",
            "--inject-noise",
            "0.2",
            "--clip-model",
            str(tiny_clip_dir),
            "--inject-max-samples",
            "4",
            "--inject-modes",
            "same-part,any",
        ]
    )
    assert rc == 0
    qa = json.loads((tmp_path / "qa" / "qa.json").read_text())
    assert qa["config"]["inject_modes"] == ["same-part", "any"]
    assert qa["injection"]["mode"] == "same-part" and list(qa["injection"]["modes"]) == ["same-part", "any"]
    with Image.open(tmp_path / "qa" / qa["figures"]["injection_modes"]) as img:
        assert img.format == "PNG"
    assert "### Injection modes" in (tmp_path / "qa" / "report.md").read_text()


@pytest.fixture(scope="module")
def mined_run(tiny_run) -> Path:
    """The tiny dataset mined through RSMMiner into a committed, finalized run (tests/conftest.py)."""
    return tiny_run


def test_a_failed_report_leaves_nothing_and_a_finished_one_keeps_its_neighbours(
    tiny_run, tmp_path, monkeypatch
):
    import qa.inject
    import qa.report as report_module

    def broken_injection(*args, **kwargs):
        raise RuntimeError("injection broke after the plots were drawn")

    # qa.report imports the injection check where it runs it (not at the top: --help stays light)
    monkeypatch.setattr(qa.inject, "run_injection", broken_injection)
    out = tmp_path / "qa"
    with pytest.raises(RuntimeError, match="after the plots"):
        report_module.build_report(tiny_run, out, sheet_samples=0, inject_noise=0.2)
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no partial folder, no staging left
    monkeypatch.undo()
    (out / "rounds" / "round-0").mkdir(parents=True)
    (out / "rounds" / "round-0" / "qa.json").write_text("{}")
    report_module.build_report(tiny_run, out, sheet_samples=0)
    assert (out / "qa.json").is_file() and (out / "report.html").is_file()
    assert (out / "rounds" / "round-0" / "qa.json").read_text() == "{}"
    assert [p.name for p in tmp_path.iterdir()] == ["qa"]


def test_a_mixture_that_did_not_converge_is_shown_as_na_with_the_reason(tmp_path, monkeypatch):
    """The user's run: EM stopped at its iteration cap, yet the report showed its noise as a figure."""
    import functools

    import qa.noise
    from qa.mixture import fit_mixture

    out, _ = make_known_run(tmp_path)
    monkeypatch.setattr(qa.noise, "fit_mixture", functools.partial(fit_mixture, max_iter=2))
    qa = build_report(out, tmp_path / "qa", sheet_samples=0, seed=1)
    assert qa["mixture"]["converged"] is False and qa["mixture"]["n_iter"] == 2
    assert qa["noise_rate_mixture"] is None and qa["noise_rate_mixture_all_pairs"] is None
    why = "the gaussian mixture did not converge: EM stopped at its cap of 2 iterations"
    assert qa["noise_rate_mixture_why_na"] == why
    assert qa["mixture_check"]["status"] == "not_converged"
    assert all(
        r["noise_rate_mixture"] is None for r in qa["breakdowns"]["region_label"] if "noise_rate_mixture" in r
    )
    on_disk = json.loads((tmp_path / "qa" / "qa.json").read_text())
    assert on_disk["noise_rate_mixture"] is None and on_disk["mixture_check"]["why"].startswith(why)
    md = (tmp_path / "qa" / "report.md").read_text()
    row = next(
        line for line in md.splitlines() if line.startswith("| estimated noise of kept pairs: 2-component")
    )
    assert f"n/a: {why}" in row and row.rstrip(" |").endswith("n/a")
