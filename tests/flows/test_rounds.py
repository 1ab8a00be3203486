"""Re-mining rounds (flows.rounds) on a real local Ray: every round is its own exactly-once run, the
last one names the refined CLIP and its calibrator, an interrupted round resumes without redoing the
finished steps, and QA shows the rounds side by side."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.mine_rsm import main, run_mining
from flows.options import build_options, params_from
from flows.rounds import round_out, rounds_dir, run_rounds
from miners.refine_clip import REFINE_FILENAME
from miners.run_config import read_run_config
from storage.reader import read_run_manifest, verify_run

pytestmark = pytest.mark.timeout(600)


class Interrupted(RuntimeError):
    pass


def _opts(tiny_dataset, tiny_clip_dir, out: Path, rounds: int = 1):
    manifest = str(tiny_dataset / "manifest.parquet")
    return build_options(
        params_from(
            manifest=manifest,
            out=str(out),
            clip_model=str(tiny_clip_dir),
            shard_size=12,
            max_workers=1,
            rounds=rounds,
            refine_epochs=1,
            calibration_manifest=manifest,
        )
    )


def test_rounds_are_exactly_once_and_an_interrupted_round_resumes(
    ray_local, tiny_dataset, tiny_clip_dir, tmp_path
):
    out = tmp_path / "shards"
    opts = _opts(tiny_dataset, tiny_clip_dir, out)
    calls: list[str] = []

    def interrupted(o):
        calls.append(o.out)
        if o.out == str(out):
            raise Interrupted("the driver died before the last round")
        return run_mining(o)

    with pytest.raises(Interrupted):
        run_rounds(opts, interrupted)
    round0 = round_out(opts, 0)
    clip1 = rounds_dir(out) / "round-1" / "clip"
    assert (round0 / "_SUCCESS").is_file() and (clip1 / REFINE_FILENAME).is_file() and not out.exists()
    success0, refine1 = (round0 / "_SUCCESS").read_bytes(), (clip1 / REFINE_FILENAME).read_bytes()

    summary = run_rounds(opts, run_mining)
    # The finished round wrote nothing and the refined model was reused, not retrained.
    assert (round0 / "_SUCCESS").read_bytes() == success0
    assert (clip1 / REFINE_FILENAME).read_bytes() == refine1
    assert [r["round"] for r in summary["rounds"]] == [0, 1] and summary["rounds"][0]["out"] == str(round0)
    for folder in (round0, out):
        assert verify_run(folder) == []
        listed = {s[k]["file"] for s in read_run_manifest(folder)["shards"] for k in ("pairs", "status")}
        assert {p.name for p in folder.glob("*.parquet")} == listed
    last = read_run_config(out)
    assert last.rsm.clip_model == str(clip1)
    assert last.rsm.calibrator == str(clip1 / "rsm-calibrator.json")
    assert last.fingerprints["bank"] not in ("none", "")
    assert read_run_config(round0).rsm.clip_model == str(tiny_clip_dir)


def test_the_cli_runs_rounds_and_qa_compares_them(ray_local, tiny_dataset, tiny_clip_dir, tmp_path):
    out, qa = tmp_path / "shards", tmp_path / "qa"
    argv = [
        "--manifest",
        str(tiny_dataset / "manifest.parquet"),
        "--out",
        str(out),
        "--clip-model",
        str(tiny_clip_dir),
    ]
    argv += [
        "--shard-size",
        "12",
        "--max-workers",
        "1",
        "--rounds",
        "1",
        "--refine-epochs",
        "1",
        "--no-prefect",
    ]
    argv += ["--calibration-manifest", str(tiny_dataset / "manifest.parquet"), "--qa-out", str(qa)]
    assert main(argv) == 0
    rows = json.loads((qa / "rounds.json").read_text())["rounds"]
    assert [r["round"] for r in rows] == [0, 1]
    assert all(r["precision_kept"] is not None and r["pairs_total"] > 0 for r in rows)
    assert (qa / "rounds.png").stat().st_size > 0 and "| round |" in (qa / "rounds.md").read_text()
    assert (qa / "qa.json").is_file() and (qa / "rounds" / "round-0" / "qa.json").is_file()
