"""storage.shards: the commit protocol (cast, no-op recommit, races, crash recovery, validation, resume)."""

from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage.plan import RunPlan, plan_shards
from storage.reader import (
    read_pairs,
    read_run_manifest,
    read_status,
    verify_run,
)
from storage.schemas import PAIRS_SCHEMA
from storage.shards import (
    ALREADY_COMMITTED,
    REPLACED_ORPHANS,
    STAGING_DIR,
    RunConflictError,
    ShardCorruptError,
    ShardValidationError,
    begin_run,
    commit_shard,
    finalize_run,
    load_run_plan,
    pending_shards,
    publish_no_clobber,
)

# 12 images, 23 captions: with shard_size 5 no image may straddle a cut
from tests.storage.shard_helpers import (
    CONFIG,
    commit_all,
    fake_outputs,
    visible,
    write_manifest,
)


def test_input_is_cast_to_the_schema(run: tuple[Path, RunPlan, Path]) -> None:
    _, plan, out = run
    pairs, status = fake_outputs(plan.rows_for(0))
    # A worker may hand int64 / float64 / list columns in any order: cast, then stored as the schema says
    loose_pairs = pa.table({n: pairs.column(n) for n in reversed(PAIRS_SCHEMA.names)})
    loose_pairs = loose_pairs.set_column(
        loose_pairs.column_names.index("region_id"), "region_id", pairs.column("region_id").cast(pa.int64())
    )
    loose_pairs = loose_pairs.set_column(
        loose_pairs.column_names.index("bbox_xyxy"),
        "bbox_xyxy",
        pa.array(pairs.column("bbox_xyxy").to_pylist(), pa.list_(pa.float64())),
    )
    assert commit_shard(out, plan, 0, loose_pairs, status).committed
    stored = pq.read_table(out / "pairs-00000.parquet")
    assert stored.schema.equals(PAIRS_SCHEMA) and stored.equals(pairs)


def test_double_commit_is_a_noop(run: tuple[Path, RunPlan, Path]) -> None:
    _, plan, out = run
    pairs, status = commit_all(out, plan, [2])[2]
    names = ["pairs-00002.parquet", "status-00002.parquet", "00002.stats.json"]
    before = {n: ((out / n).stat().st_mtime_ns, (out / n).read_bytes()) for n in names}
    again = commit_shard(out, plan, 2, pairs, status, {"infer_s": 9.0})
    other = commit_shard(out, plan, 2, *fake_outputs(plan.rows_for(2), n_regions=3))  # first commit wins
    assert (again.committed, again.reason) == (False, ALREADY_COMMITTED)
    assert (other.committed, other.reason) == (False, ALREADY_COMMITTED)
    assert {n: ((out / n).stat().st_mtime_ns, (out / n).read_bytes()) for n in names} == before


def _race(out: str, plan_dict: dict, barrier, results) -> None:  # runs in a spawned process
    plan = RunPlan.from_dict(plan_dict)
    outputs = {k: fake_outputs(plan.rows_for(k), n_regions=1 + os.getpid() % 3) for k in range(3)}
    barrier.wait()
    for shard_id in range(3):
        result = commit_shard(out, plan, shard_id, *outputs[shard_id], {"pid": os.getpid()})
        results.put((shard_id, os.getpid(), result.committed, result.reason))


def test_concurrent_commits_have_exactly_one_winner(run: tuple[Path, RunPlan, Path]) -> None:
    _, plan, out = run
    ctx = mp.get_context("spawn")  # a fresh interpreter per attempt, as Ray workers are
    barrier, results = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(str(out), plan.to_dict(), barrier, results)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    outcomes = [results.get(timeout=5) for _ in range(9)]
    for shard_id in range(3):
        winners = [pid for k, pid, committed, _ in outcomes if k == shard_id and committed]
        losers = [reason for k, _, committed, reason in outcomes if k == shard_id and not committed]
        assert len(winners) == 1 and losers == [ALREADY_COMMITTED] * 2
        # The published files are the winner's, intact
        record = read_run_manifest(out, allow_partial=True)["shards"][shard_id]
        assert pq.read_table(out / record["pairs"]["file"]).num_rows == record["pairs"]["n_rows"]
    commit_all(out, plan, [3, 4, 5])
    finalize_run(out, plan, check_hashes=True)
    assert verify_run(out) == []
    assert not list((out / STAGING_DIR).iterdir())


# ---------------------------------------------------------------------------------------------- crash recovery


def _die_before_stats(out: str, plan_dict: dict, shard_id: int) -> None:  # runs in a spawned process
    import storage.shards as shards

    def die(*_args, **_kwargs) -> None:
        os._exit(3)  # a worker killed after publishing its Parquet files, before the stats file

    shards._publish_stats = die
    plan = RunPlan.from_dict(plan_dict)
    shards.commit_shard(out, plan, shard_id, *fake_outputs(plan.rows_for(shard_id), n_regions=3))


def test_crash_between_publish_and_stats_is_recovered(run: tuple[Path, RunPlan, Path]) -> None:
    _, plan, out = run
    proc = mp.get_context("spawn").Process(target=_die_before_stats, args=(str(out), plan.to_dict(), 1))
    proc.start()
    proc.join(timeout=120)
    assert proc.exitcode == 3
    assert {"pairs-00001.parquet", "status-00001.parquet"} <= visible(out)
    assert "00001.stats.json" not in visible(out)
    assert 1 in pending_shards(out, plan)

    pairs, status = fake_outputs(plan.rows_for(1), n_regions=2)
    result = commit_shard(out, plan, 1, pairs, status)
    assert (result.committed, result.reason) == (True, REPLACED_ORPHANS)
    assert pq.read_table(out / "pairs-00001.parquet").equals(pairs)
    assert pq.read_table(out / "status-00001.parquet").equals(status)
    assert read_pairs(out, allow_partial=True).equals(pairs)


def test_stale_staging_files_are_cleaned(run: tuple[Path, RunPlan, Path]) -> None:
    _, plan, out = run
    staging = out / STAGING_DIR
    (staging / "pairs-00000.deadhost-77-aaaa.tmp").write_bytes(b"PAR1 half written")
    (staging / "stats-00000.deadhost-77-aaaa.tmp").write_bytes(b"{")
    (staging / "status-00003.deadhost-78-bbbb.tmp").write_bytes(b"PAR1")
    commit_all(out, plan, [0])
    assert sorted(p.name for p in staging.iterdir()) == ["status-00003.deadhost-78-bbbb.tmp"]
    assert sorted(p.name for p in out.glob("*.parquet")) == ["pairs-00000.parquet", "status-00000.parquet"]
    commit_all(out, plan, [1, 2, 3, 4, 5])
    finalize_run(out, plan)
    assert list(staging.iterdir()) == []


def test_committed_shard_that_was_damaged_is_refused(run: tuple[Path, RunPlan, Path]) -> None:
    _, plan, out = run
    pairs, status = commit_all(out, plan, [0])[0]
    data = bytearray((out / "pairs-00000.parquet").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (out / "pairs-00000.parquet").write_bytes(bytes(data))
    with pytest.raises(ShardCorruptError, match="pairs-00000.parquet"):
        commit_shard(out, plan, 0, pairs, status)
    (out / "status-00000.parquet").unlink()
    with pytest.raises(ShardCorruptError, match="missing"):
        pending_shards(out, plan)


def test_publish_no_clobber_never_overwrites(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(b"new")
    dst.write_bytes(b"old")
    with pytest.raises(FileExistsError):
        publish_no_clobber(src, dst)
    assert dst.read_bytes() == b"old" and src.exists()
    dst.unlink()
    publish_no_clobber(src, dst)
    assert dst.read_bytes() == b"new" and not src.exists()


# ---------------------------------------------------------------------------------------------- validation


def _swap_sample(pairs: pa.Table, sample_id: str) -> pa.Table:
    ids = pairs.column("sample_id").to_pylist()
    ids[0] = sample_id
    return pairs.set_column(0, "sample_id", pa.array(ids))


def _set(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    return table.set_column(table.column_names.index(name), name, values)


BAD_OUTPUTS = {
    "status missing a row": (
        lambda p, s, o: (p.filter(pa.compute.not_equal(p["sample_id"], s["sample_id"][0])), s.slice(1)),
        "missing 1",
    ),
    "status extra row": (lambda p, s, o: (p, pa.concat_tables([s, o[1].slice(0, 1)])), "not in shard 1"),
    "status duplicate row": (lambda p, s, o: (p, pa.concat_tables([s, s.slice(0, 1)])), "several rows"),
    "status duplicate in place of a row (right count)": (
        lambda p, s, o: (p, pa.concat_tables([s.slice(0, 1), s.slice(0, len(s) - 1)])),
        "several rows",
    ),
    "duplicate pair key": (lambda p, s, o: (pa.concat_tables([p, p.slice(2, 1)]), s), "more than once"),
    "pair of another shard": (
        lambda p, s, o: (_swap_sample(p, o[1]["sample_id"][0].as_py()), s),
        "not a row",
    ),
    "missing column": (lambda p, s, o: (p.drop_columns(["reliability"]), s), "missing \\['reliability'\\]"),
    "uncastable type": (
        lambda p, s, o: (p, _set(s, "n_regions", pa.array(["many"] * len(s)))),
        "cannot cast",
    ),
    "null in non-nullable": (
        lambda p, s, o: (p, _set(s, "status", pa.array([None] * len(s), pa.string()))),
        "null",
    ),
    "not a table": (lambda p, s, o: (p.to_pylist(), s), "pyarrow.Table"),
}


@pytest.mark.parametrize("case", sorted(BAD_OUTPUTS))
def test_validation_rejects_bad_outputs_and_publishes_nothing(
    run: tuple[Path, RunPlan, Path], case: str
) -> None:
    _, plan, out = run
    mutate, message = BAD_OUTPUTS[case]
    pairs, status = fake_outputs(plan.rows_for(0))
    bad_pairs, bad_status = mutate(pairs, status, fake_outputs(plan.rows_for(1)))
    with pytest.raises(ShardValidationError, match=message):
        commit_shard(out, plan, 0, bad_pairs, bad_status)
    assert visible(out) == {"_run.json"}
    assert list((out / STAGING_DIR).iterdir()) == []
    assert 0 in pending_shards(out, plan)


# ---------------------------------------------------------------------------------------------- run lifecycle


def test_changed_config_or_manifest_is_refused(tmp_path: Path, run: tuple[Path, RunPlan, Path]) -> None:
    manifest, plan, out = run
    commit_all(out, plan, [0])
    # Same content, re-imported in another row order: resume
    shuffled = plan_shards(write_manifest(tmp_path / "again.parquet", shuffle_seed=9), 5, CONFIG)
    assert begin_run(out, shuffled) == [1, 2, 3, 4, 5]

    new_config = plan_shards(manifest, 5, {**CONFIG, "clip": {**CONFIG["clip"], "temperature": 0.1}})
    with pytest.raises(RunConflictError, match="CONFIG changed") as info:
        begin_run(out, new_config)
    assert "clip.temperature" in str(info.value) and "MANIFEST" not in str(info.value)
    old_t = CONFIG["clip"]["temperature"]
    assert f"clip.temperature {old_t!r} -> 0.1" in str(info.value)  # the old and the new value
    assert "new --out" in str(info.value)

    new_manifest = plan_shards(
        write_manifest(tmp_path / "edited.parquet", caption_edit=" Edited."), 5, CONFIG
    )
    with pytest.raises(RunConflictError, match="MANIFEST changed") as info:
        begin_run(out, new_manifest)
    assert "CONFIG" not in str(info.value)
    with pytest.raises(RunConflictError, match="begin_run"):
        commit_shard(out, new_manifest, 1, *fake_outputs(new_manifest.rows_for(1)))
    assert load_run_plan(out) == plan


def test_resume_lists_pending_shards(run: tuple[Path, RunPlan, Path]) -> None:
    _, plan, out = run
    commit_all(out, plan, [0, 3])
    assert pending_shards(out, plan) == [1, 2, 4, 5]
    assert begin_run(out, plan) == [1, 2, 4, 5]
    partial = read_pairs(out, allow_partial=True)
    assert set(partial.column("sample_id").to_pylist()) <= {
        *plan.rows_for(0).column("sample_id").to_pylist(),
        *plan.rows_for(3).column("sample_id").to_pylist(),
    }
    assert read_status(out, allow_partial=True).num_rows == plan.shards[0].n_rows + plan.shards[3].n_rows


def test_a_folder_taken_over_by_another_run_refuses_the_old_plans_commits(
    run: tuple[Path, RunPlan, Path],
) -> None:
    # commit_shard remembers the folder's run id by its _run.json's identity (inode, mtime, size);
    # a folder removed and begun again by another run must not pass for the old run.
    import shutil

    manifest, plan, out = run
    commit_shard(out, plan, 0, *fake_outputs(plan.rows_for(0)))  # the run id is now remembered
    other = plan_shards(manifest, 4, CONFIG)
    shutil.rmtree(out)
    begin_run(out, other)
    with pytest.raises(RunConflictError, match=f"holds run {other.run_id}, not {plan.run_id}"):
        commit_shard(out, plan, 1, *fake_outputs(plan.rows_for(1)))
    assert commit_shard(out, other, 0, *fake_outputs(other.rows_for(0))).committed
