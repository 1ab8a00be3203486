"""bench/methods.py in tiny mode: the script runs end to end as a subprocess (a tiny held-out benchmark,
mined and noised, rogle and irra in every row) and writes every row and column, as numbers, to --results
and --json; a method that cannot be built fails the script before anything is trained."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
ROWS = [
    "alone",
    "+ rsm",
    "+ rsm, noisy pairs, reliability on",
    "+ rsm, noisy pairs, reliability off",
]
KEYS = ["R1", "R5", "mAP", "mINP", "long_R1", "local_grounding_acc", "train_seconds"]
HEADINGS = ["R1", "R5", "mAP", "mINP", "long-query R1", "local grounding", "train seconds"]


def _env(tmp_path: Path) -> dict:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "RSM_DECODE_CACHE": str(tmp_path / "decode-cache"),
    }


def _script(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "bench" / "methods.py"), *args]


@pytest.mark.timeout(300)
def test_methods_table_runs_in_tiny_mode_with_every_row_and_column(tmp_path, tiny_clip_dir):
    out, results, raw = tmp_path / "work", tmp_path / "RESULTS.md", tmp_path / "methods.json"
    argv = _script(
        "--tiny",
        "--methods",
        "rogle",
        "irra",
        "--seeds",
        "0",
        "--epochs",
        "1",
        "--clip-model",
        str(tiny_clip_dir),
        "--out",
        str(out),
        "--results",
        str(results),
        "--json",
        str(raw),
    )
    proc = subprocess.run(argv, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=290)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])

    report = json.loads(raw.read_text())
    settings = report["settings"]
    assert settings["methods"] == ["rogle", "irra"] and settings["seeds"] == [0] and settings["epochs"] == 1
    assert settings["bench_seed"] not in (0, 1000)  # neither the demo's benchmark nor its calibration set
    assert settings["noise_units_injected"] > 0 and settings["image_size"] == "192x64"
    assert "--tiny" in report["command"]
    # The table: every method x row once, each figure a number (the tiny benchmark has long queries and
    # ground-truth regions in its test split), one seed -> no sd
    assert [(e["method"], e["row"]) for e in report["table"]] == [
        (m, r) for m in ("rogle", "irra") for r in ROWS
    ]
    for entry in report["table"]:
        assert entry["n"] == 1
        for key in KEYS:
            s = entry[key]
            assert isinstance(s["mean"], float) and np.isfinite(s["mean"]) and s["sd"] is None, (entry, key)
            assert s["n"] == 1
            if key != "train_seconds":
                assert 0.0 <= s["mean"] <= 100.0, (entry, key)
            else:
                assert s["mean"] > 0.0
    # The runs: one per cell, all from the one start model with the same epochs and batch; the flags that
    # make each row what its label says
    runs = report["runs"]
    assert len(runs) == 8
    for r in runs:
        cfg = r["config"]
        assert (cfg["method"], cfg["epochs"], cfg["batch_size"], cfg["seed"]) == (r["method"], 1, 8, 0)
        assert Path(r["init"]).resolve() == tiny_clip_dir.resolve()
        assert r["text_mode"] in r["text_modes"]  # headline figures in the method's mode, both kept
        assert cfg["local"] == ("none" if r["row"] == "alone" else "rsm"), r["row"]
        assert cfg["use_reliability"] is (r["row"] != ROWS[3]), r["row"]
        assert (r["data"] == "noisy") is ("noisy" in r["row"])
        assert ("noise" in Path(r["argv"][r["argv"].index("--manifest") + 1]).name) is (r["data"] == "noisy")
        history = Path(r["run_dir"], "history.jsonl").read_text().splitlines()
        seconds = sum(json.loads(ln)["epoch_seconds"] for ln in history if ln.strip())
        assert r["train_seconds"] == pytest.approx(seconds)
        metrics = json.loads(Path(r["run_dir"], "metrics.json").read_text())
        truncated = metrics["text_modes"]["truncate"]  # every row under one evaluation mode
        assert r["eval_text_mode"] == "truncate"
        assert (r["R1"], r["mINP"], r["long_R1"]) == (
            truncated["R1"],
            truncated["mINP"],
            truncated["long_query_R1"],
        )
    # The table's means are the runs' figures (one seed each)
    for entry in report["table"]:
        (run,) = [r for r in runs if (r["method"], r["row"]) == (entry["method"], entry["row"])]
        assert all(entry[k]["mean"] == pytest.approx(run[k]) for k in KEYS)

    section = results.read_text()
    assert re.search(r"## Training methods compared \(\d{4}-\d{2}-\d{2}, tiny mode\)", section)
    assert "Machine: " in section and "bench/methods.py --tiny" in section
    assert (
        "evaluated with queries truncated at 77 tokens (truncate" in section
        and "train in their own text mode (rogle " in section
    )
    header = next(ln for ln in section.splitlines() if ln.startswith("| method |"))
    assert [c.strip() for c in header.strip("|").split("|")] == ["method", "variant", "n", *HEADINGS]
    table_rows = [ln for ln in section.splitlines() if ln.startswith(("| rogle |", "| irra |"))]
    assert len(table_rows) == 8
    for line in table_rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1] in ROWS and cells[2] == "1"
        assert len(cells) == 3 + len(KEYS)
        for c in cells[3:]:
            assert re.fullmatch(r"\d+\.\d ± —", c), line

    # A second run reuses every finished run (same argv) and trains nothing
    proc = subprocess.run(argv, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train_rogle:" not in proc.stdout
    assert json.loads(raw.read_text())["runs"] == runs


def test_a_method_that_cannot_be_built_fails_the_script_before_any_work(tmp_path, tiny_clip_dir):
    """A method whose module does not exist (yet) is an error, not a silently shorter table."""
    # The registry, in the script's process only, points `irra` at a module nobody wrote
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "sitecustomize.py").write_text(
        "import miners.training.methods as m\n"
        "m.METHODS['irra'] = 'miners.training.methods.not_written_yet:IrraMethod'\n"
    )
    work, results, raw = tmp_path / "work", tmp_path / "RESULTS.md", tmp_path / "methods.json"
    argv = _script(
        "--tiny",
        "--methods",
        "rogle",
        "irra",
        "--clip-model",
        str(tiny_clip_dir),
        "--out",
        str(work),
        "--results",
        str(results),
        "--json",
        str(raw),
    )
    env = _env(tmp_path) | {"PYTHONPATH": f"{shadow}{os.pathsep}{ROOT}"}
    proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, (proc.stdout[-2000:], proc.stderr[-2000:])
    assert "method irra cannot be built" in proc.stdout and "--methods without them" in proc.stdout
    assert "method rogle" not in proc.stdout
    assert not work.exists() and not results.exists() and not raw.exists()  # nothing generated or written


def test_without_the_start_model_the_script_says_how_to_make_it(tmp_path):
    argv = _script("--tiny", "--clip-model", str(tmp_path / "no-clip"), "--out", str(tmp_path / "work"))
    proc = subprocess.run(argv, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "python -m flows.demo" in proc.stdout, proc.stdout
    assert not (tmp_path / "work").exists()
