"""The `mine-rsm` flow end to end on a real local Ray and a temporary Prefect API.

Runs the flow on the tiny synthetic dataset (36 rows, shards of 8) and checks the exactly-once contract
through the readers, resume after a failed shard (a fault-injecting actor class, tests/faults.py), reruns that change
nothing, refusal of a changed config, the CLI and the Prefect artifacts. Ray starts once per module.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from prefect import flow

from flows.mine_rsm import ShardsFailedError, _as_task, main, mine_rsm, run_mining
from flows.options import build_options, params_from
from flows.reporting import LogReporter
from storage.reader import read_pairs, read_run_manifest, read_status, scan_pairs, scan_status, verify_run
from storage.shards import RunConflictError, pairs_name, stats_name, status_name
from tests.faults import faulty_miner

pytestmark = pytest.mark.timeout(300)
SHARD_SIZE = 8


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    """A throwaway Prefect API (temporary database and PREFECT_HOME) for in-process flow runs."""
    from prefect.settings import PREFECT_HOME, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    home = tmp_path_factory.mktemp("prefect_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        mp.setenv("DO_NOT_TRACK", "1")
        with temporary_settings(updates={PREFECT_HOME: str(home)}), prefect_test_harness(120):
            yield


@pytest.fixture(scope="module")
def params(tiny_dataset, tiny_clip_dir) -> dict:
    return {
        "manifest": str(tiny_dataset / "manifest.parquet"),
        "clip_model": str(tiny_clip_dir),
        "shard_size": SHARD_SIZE,
        "max_retries": 1,
    }


@flow(name="mine-rsm-faulty")
def faulty_flow(out: str, faults: dict[int, str], **params) -> dict:
    """The mine-rsm pipeline as a flow, with actors that fail on `faults` (shard id -> fault)."""
    import logging

    opts = build_options(params_from(out=out, **params))
    reporters = [LogReporter(logging.getLogger("mine-rsm-faulty"))]
    return run_mining(opts, reporters, stage=_as_task, actor_cls=faulty_miner(faults))


@pytest.fixture(scope="module")
def reference(ray_local, prefect_api, params, tmp_path_factory):
    """One uninterrupted flow run: (out folder, its final state)."""
    out = tmp_path_factory.mktemp("reference") / "shards"
    state = mine_rsm(out=str(out), **params, return_state=True)
    return out, state


def snapshot(out: Path) -> dict[str, tuple[int, int, str]]:
    """name -> (inode, mtime_ns, sha256) of every file under OUT, hidden ones included."""
    files = sorted(p for p in out.rglob("*") if p.is_file())
    return {
        str(p.relative_to(out)): (
            p.stat().st_ino,
            p.stat().st_mtime_ns,
            hashlib.sha256(p.read_bytes()).hexdigest(),
        )
        for p in files
    }


def parquet_hashes(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.parquet"))}


def test_flow_commits_every_manifest_row_exactly_once(reference, params):
    out, state = reference
    assert state.is_completed(), state.message
    summary = state.result()
    manifest_ids = pq.read_table(params["manifest"], columns=["sample_id"])["sample_id"].to_pylist()
    n_shards = summary["n_shards"]
    assert n_shards >= 4 and summary["finalized"] and summary["shards_mined_now"] == n_shards

    # Status: one row per manifest row, via pyarrow and polars
    status = read_status(out)
    assert sorted(status["sample_id"].to_pylist()) == sorted(manifest_ids)
    lazy = scan_status(out).collect()
    assert lazy.height == len(manifest_ids) == lazy["sample_id"].n_unique()
    assert summary["ok_rows"] + summary["mining_error_rows"] == len(manifest_ids)

    # Pairs: keys unique, every pair belongs to a manifest row
    pairs = read_pairs(out)
    keys = list(
        zip(*(pairs[c].to_pylist() for c in ("sample_id", "sentence_index", "region_id")), strict=True)
    )
    assert pairs.num_rows == summary["pairs"] > 0 and len(set(keys)) == len(keys)
    assert set(pairs["sample_id"].to_pylist()) <= set(manifest_ids)
    polars_pairs = scan_pairs(out).collect()
    assert polars_pairs.height == pairs.num_rows
    assert polars_pairs.select(["sample_id", "sentence_index", "region_id"]).is_duplicated().sum() == 0
    assert summary["kept_pairs"] == pc.sum(pairs["kept"].cast("int64")).as_py()

    # _SUCCESS lists every shard, and a raw glob sees exactly the listed files
    run_manifest = read_run_manifest(out)
    assert json.loads((out / "_SUCCESS").read_text())["finalized"] is True
    assert [s["shard_id"] for s in run_manifest["shards"]] == list(range(n_shards))
    listed = {s[k]["file"] for s in run_manifest["shards"] for k in ("pairs", "status")}
    assert {p.name for p in out.glob("*.parquet")} == listed
    assert verify_run(out) == []
    # Every shard was mined by a Ray actor (another process) and says so in its stats file
    workers = {
        json.loads((out / stats_name(s)).read_text())["worker"]["worker"]["pid"] for s in range(n_shards)
    }
    assert workers and os.getpid() not in workers
    # ... with its stage profile; the summary sums the stages over the shards (plus the driver's write)
    stages = ["load", "regions", "sentences", "scoring", "matching", "tables"]
    per_shard = [json.loads((out / stats_name(s)).read_text())["worker"]["stage_s"] for s in range(n_shards)]
    assert all(sorted(p) == sorted(stages) for p in per_shard), per_shard
    assert list(summary["stage_s"]) == [*stages, "write"]
    assert summary["stage_s"]["scoring"] == pytest.approx(sum(p["scoring"] for p in per_shard), abs=1e-2)
    assert summary["stage_s"]["write"] > 0


def test_flow_publishes_progress_and_summary_artifacts(reference):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    _, state = reference
    run_filter = FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
    with get_client(sync_client=True) as client:
        artifacts = {a.key: a for a in client.read_artifacts(flow_run_filter=run_filter)}
    assert {"mine-rsm-progress", "mine-rsm-summary", "mine-rsm-shards"} <= set(artifacts)
    assert float(artifacts["mine-rsm-progress"].data) == pytest.approx(100.0)
    summary = state.result()
    markdown = artifacts["mine-rsm-summary"].data
    assert f"| manifest rows | {summary['manifest_rows']} |" in markdown, markdown
    assert f"| pairs / kept | {summary['pairs']} / {summary['kept_pairs']} |" in markdown
    assert f"run `{summary['run_id']}`: complete" in markdown
    assert "## Where the time went" in markdown and "| scoring |" in markdown and "| write |" in markdown
    table = json.loads(artifacts["mine-rsm-shards"].data)
    assert [row["shard_id"] for row in table] == list(range(state.result()["n_shards"]))
    assert all(row["scoring_s"] > 0 and row["write_s"] > 0 for row in table)


def test_failed_shard_fails_the_flow_and_a_rerun_resumes_only_it(reference, params, tmp_path, capsys):
    ref_out, ref_state = reference
    n_shards = ref_state.result()["n_shards"]
    bad = n_shards // 2
    out = tmp_path / "shards"

    # First run: shard `bad` raises on every attempt; the others commit
    state = faulty_flow(out=str(out), faults={bad: "raise"}, **params, return_state=True)
    assert state.is_failed() and f"shard {bad}" in state.message
    with pytest.raises(ShardsFailedError, match=rf"shard {bad}: InjectedShardFailure"):
        state.result()
    assert not (out / "_SUCCESS").exists() and not (out / stats_name(bad)).exists()
    others = [s for s in range(n_shards) if s != bad]
    assert all((out / stats_name(s)).is_file() for s in others)
    before = snapshot(out)

    # Rerun through the CLI: only the failed shard is mined; the others' files are untouched
    argv = ["--manifest", params["manifest"], "--out", str(out), "--clip-model", params["clip_model"]]
    assert main([*argv, "--shard-size", str(SHARD_SIZE)]) == 0
    assert f"{n_shards}/{n_shards} shards (1 mined now)" in capsys.readouterr().out
    after = snapshot(out)
    for s in others:
        for name in (pairs_name(s), status_name(s), stats_name(s)):
            assert after[name] == before[name], f"{name} was rewritten by the resume"
    assert {pairs_name(bad), status_name(bad), stats_name(bad), "_SUCCESS"} <= set(after) - set(before)
    assert json.loads((out / stats_name(bad)).read_text())["worker"]["attempt"] == 1
    # Same content as the uninterrupted run (the stats files hold timings, the parquet files do not)
    assert parquet_hashes(out) == parquet_hashes(ref_out)
    assert verify_run(out) == []


def test_rerun_of_a_finished_run_adds_and_changes_nothing(reference, params):
    out, _ = reference
    before = snapshot(out)
    summary = mine_rsm(out=str(out), **params)
    assert summary["shards_mined_now"] == 0 and summary["finalized"]
    assert snapshot(out) == before


def test_the_cli_rerun_of_a_finished_run_says_so_in_plain_figures(reference, params, tmp_path, capsys):
    out, _ = reference
    argv = ["--manifest", params["manifest"], "--out", str(out), "--clip-model", params["clip_model"]]
    argv += ["--shard-size", str(SHARD_SIZE), "--no-prefect", "--qa-out", str(tmp_path / "qa")]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "nothing left to mine (already committed)" in printed and "None images/s" not in printed
    qa_line = next(line for line in printed.splitlines() if line.startswith("QA report in"))
    figures = dict(item.split("=") for item in qa_line.split(": ", 1)[1].split(", "))
    assert all(
        len(v.replace("0.", "").lstrip("0").replace(".", "")) <= 3 for v in figures.values() if "." in v
    )


def test_changed_config_is_refused_with_a_clear_message(reference, params, capsys):
    out, _ = reference
    before = snapshot(out)
    # The flow (a deployment's run) refuses in its preflight, before any task, naming old and new value
    state = mine_rsm(out=str(out), **params, crop_mode="mask", return_state=True)
    assert state.is_failed() and "rsm.crop_mode 'box' -> 'mask'" in state.message
    argv = ["--manifest", params["manifest"], "--out", str(out), "--clip-model", params["clip_model"]]
    rc = main([*argv, "--shard-size", str(SHARD_SIZE), "--match-mode", "clip", "--no-prefect"])
    err = capsys.readouterr().err
    assert rc == 2 and "match.mode" in err and "new --out folder" in err
    assert snapshot(out) == before


def test_cli_requires_a_clip_model(params, tmp_path, capsys):
    rc = main(["--manifest", params["manifest"], "--out", str(tmp_path / "o"), "--no-prefect"])
    assert rc == 2 and "--clip-model" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_errors_are_one_line_and_debug_keeps_the_traceback(params, tmp_path, capsys):
    import io
    import logging

    from flows.mine_rsm import _NoTraceback

    argv = ["--manifest", params["manifest"], "--out", str(tmp_path / "o"), "--no-prefect"]
    with pytest.raises((ValueError, FileNotFoundError)):
        main([*argv, "--debug"])
    # Prefect's task-run error records lose their traceback (the CLI prints the error once, as one line)
    logger = logging.getLogger("rsm.tests.no_traceback")  # outside prefect.*: no API log handler
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    logger.addFilter(_NoTraceback())
    try:
        try:
            raise RunConflictError("holds another run")
        except RunConflictError:
            logger.exception("Task run failed with exception: RunConflictError('holds another run')")
    finally:
        logger.removeHandler(handler)
    assert stream.getvalue().count("\n") == 1 and "Traceback" not in stream.getvalue()


def test_flow_writes_the_qa_report_and_publishes_it(reference, params, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    out, _ = reference
    qa_dir = tmp_path / "qa"
    state = mine_rsm(out=str(out), **params, qa_out=str(qa_dir), return_state=True)  # finished run: QA only
    assert state.is_completed(), state.message
    qa = json.loads((qa_dir / "qa.json").read_text())
    assert qa["pairs_total"] == read_pairs(out).num_rows and (qa_dir / "report.html").is_file()
    assert state.result()["qa"]["pairs_kept"] == qa["pairs_kept"]
    run_filter = FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
    with get_client(sync_client=True) as client:
        artifacts = {a.key: a for a in client.read_artifacts(flow_run_filter=run_filter)}
    assert {"rsm-qa-summary", "rsm-qa-figures"} <= set(artifacts)
    figures = {row["figure"]: row["value"] for row in json.loads(artifacts["rsm-qa-figures"].data)}
    assert figures["pairs_total"] == qa["pairs_total"]


def test_a_deployment_with_bad_parameters_fails_with_every_problem_in_its_state(
    prefect_api, params, tmp_path, caplog
):
    """What `prefect deployment run --watch` shows: before, only "Flow run finished in state 'Failed'"
    (the PreflightError sat between two engine tracebacks in the worker's terminal)."""
    bad = {**params, "clip_model": str(tmp_path / "no-model"), "manifest": str(tmp_path / "no.parquet")}
    with caplog.at_level(logging.ERROR):
        state = mine_rsm(out=str(tmp_path / "o"), **bad, return_state=True)
    assert state.is_failed()
    assert state.message.startswith("preflight: 2 problems before mining: (1) CLIP model folder")
    assert "--param clip_model=DIR" in state.message and "python -m storage.manifest" in state.message
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("preflight: ")]
    assert logged == [state.message]  # one line, streamed to --watch (PREFECT_SERVER_LOGS_STREAM_*)
    assert not any(r.exc_info for r in caplog.records if r.levelno >= logging.ERROR)  # no traceback
    assert not (tmp_path / "o").exists()


def test_no_prefect_mining_prints_progress_lines_and_the_caption_vocabulary(
    ray_local, params, tmp_path, capsys
):
    """The user's `--no-prefect --qa-out` run was silent for 27.7 s: now a line per phase (Ray, workers,
    the fan-out with its shard count) and per committed shard (done/total), then the QA report's own lines,
    and the summary names the caption words outside the CLIP's vocabulary."""
    import pyarrow.parquet as pq

    from qa.domain import clip_vocabulary, vocabulary_coverage

    out = tmp_path / "shards"
    argv = ["--manifest", params["manifest"], "--out", str(out), "--clip-model", params["clip_model"]]
    rc = main([*argv, "--shard-size", str(SHARD_SIZE), "--no-prefect", "--qa-out", str(tmp_path / "qa")])
    assert rc == 0
    printed = capsys.readouterr()
    # What the terminal shows (not what a log capture sees: the lines once went to no handler at all)
    lines = [line.split(" INFO ", 1)[1] for line in printed.err.splitlines() if " INFO " in line]
    n_shards = len(read_run_manifest(out)["shards"])
    ready = next(k for k, line in enumerate(lines) if "worker(s) ready; mining" in line)
    assert f"mining {n_shards} shard(s) (0/{n_shards} committed so far)" in lines[ready]
    per_shard = [line for line in lines[ready:] if line.startswith("shard ") and " committed (" in line]
    assert [line.rsplit("; ", 1)[1] for line in per_shard] == [
        f"{k}/{n_shards} shards" for k in range(1, n_shards + 1)
    ]
    assert any(line.startswith("writing the QA report into") for line in lines[ready:])
    assert "qa.report [" in printed.err  # the report's own progress lines
    captions = pq.read_table(params["manifest"], columns=["caption"])["caption"].to_pylist()
    expected = vocabulary_coverage(captions, clip_vocabulary(params["clip_model"]))["why"]
    assert f"caption vocabulary: {expected}" in printed.out
