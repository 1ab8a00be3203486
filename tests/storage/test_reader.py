"""storage.reader: committed shards read back through the run manifest by pyarrow and polars; verify_run."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from polars.testing import assert_frame_equal

from storage.plan import RunPlan
from storage.reader import (
    RunNotFinalizedError,
    pair_files,
    read_pairs,
    read_run_manifest,
    read_status,
    scan_pairs,
    scan_status,
    status_files,
    verify_run,
)
from storage.schemas import PAIRS_SCHEMA, STATUS_SCHEMA, check_version
from storage.shards import (
    RunIncompleteError,
    ShardStoreError,
    finalize_run,
    load_run_plan,
)

# 12 images, 23 captions: with shard_size 5 no image may straddle a cut
from tests.storage.shard_helpers import (
    commit_all,
)


def test_commit_then_read_back_with_pyarrow_and_polars(run: tuple[Path, RunPlan, Path]) -> None:
    _, plan, out = run
    outputs = commit_all(out, plan)
    finalize_run(out, plan, check_hashes=True)
    want_pairs = pa.concat_tables([outputs[k][0] for k in sorted(outputs)])
    want_status = pa.concat_tables([outputs[k][1] for k in sorted(outputs)])
    assert want_pairs.num_rows > 0 and want_status.num_rows == plan.n_rows

    # pyarrow
    got_pairs, got_status = read_pairs(out), read_status(out)
    assert got_pairs.schema.equals(PAIRS_SCHEMA) and got_status.schema.equals(STATUS_SCHEMA)
    assert got_pairs.equals(want_pairs) and got_status.equals(want_status)
    check_version("pairs", got_pairs.schema, "read_pairs")
    assert read_pairs(out, columns=["sample_id", "reliability"]).equals(
        want_pairs.select(["sample_id", "reliability"])
    )
    # polars, an independent Parquet reader
    assert_frame_equal(scan_pairs(out).collect(), pl.from_arrow(want_pairs))
    assert_frame_equal(scan_status(out).collect(), pl.from_arrow(want_status))

    # File metadata and stats
    meta = pq.read_schema(pair_files(out)[1]).metadata
    assert meta[b"rsm.run_id"] == plan.run_id.encode() and meta[b"rsm.shard_id"] == b"1"
    manifest = read_run_manifest(out)
    assert manifest["run_id"] == plan.run_id and manifest["finalized"] is True
    assert manifest["totals"]["pairs_rows"] == want_pairs.num_rows
    assert manifest["totals"]["status_rows"] == plan.n_rows
    assert sum(manifest["status_counts"].values()) == plan.n_rows
    assert all(len(s["pairs"]["sha256"]) == 64 for s in manifest["shards"])
    assert verify_run(out) == []


def test_glob_equals_the_run_manifest_after_finalize(run: tuple[Path, RunPlan, Path]) -> None:
    _, plan, out = run
    commit_all(out, plan, [0, 1, 2])
    with pytest.raises(RunIncompleteError, match="3 of 6 shards"):
        finalize_run(out, plan)
    with pytest.raises(RunNotFinalizedError, match="run not finalized"):
        read_run_manifest(out)
    commit_all(out, plan, [3, 4, 5])
    success = finalize_run(out, plan)
    assert finalize_run(out, plan) == success  # idempotent
    assert sorted(out.glob("*.parquet")) == sorted(pair_files(out) + status_files(out))
    assert len(pair_files(out)) == len(plan.shards)


def test_verify_run_flags_stray_missing_and_corrupted_files(run: tuple[Path, RunPlan, Path]) -> None:
    _, plan, out = run
    commit_all(out, plan)
    finalize_run(out, plan)
    assert verify_run(out) == []
    (out / "pairs-00099.parquet").write_bytes(b"stray")
    data = bytearray((out / "pairs-00001.parquet").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (out / "pairs-00001.parquet").write_bytes(bytes(data))
    (out / "status-00002.parquet").unlink()
    problems = verify_run(out)
    assert len(problems) == 3
    assert any("pairs-00099.parquet" in p and "stray" in p for p in problems)
    assert any("pairs-00001.parquet" in p and "sha256" in p for p in problems)
    assert any("status-00002.parquet" in p and "missing" in p for p in problems)
    # Without hashes: existence, sizes, footers and schema versions are still checked
    cheap = verify_run(out, check_hashes=False)
    assert any("status-00002" in p for p in cheap) and any("stray" in p for p in cheap)
    # Not a run at all: said in the user's terms (before: "... is not a run folder (begin_run was never
    # called)", naming an internal function and not saying the folder is missing)
    assert verify_run(out / "nowhere")[0].endswith(
        "nowhere does not exist: pass the --out folder of a `python -m flows.mine_rsm` run"
    )
    (out / "plain").mkdir()
    assert "plain is not a mining run folder (it has no _run.json)" in verify_run(out / "plain")[0]
    with pytest.raises(ShardStoreError, match="does not exist: pass the --out folder"):
        load_run_plan(out / "nowhere")
    assert "begin_run" not in verify_run(out / "plain")[0]
