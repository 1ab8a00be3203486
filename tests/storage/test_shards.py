"""Tests of storage.shards (planning, commit protocol) and storage.reader on tiny synthetic runs."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from polars.testing import assert_frame_equal

from storage.plan import RunPlan, plan_shards
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
from storage.schemas import PAIRS_SCHEMA, STATUS_SCHEMA, check_version, with_version
from storage.shards import (
    ALREADY_COMMITTED,
    COMMITTED,
    REPLACED_ORPHANS,
    STAGING_DIR,
    RunConflictError,
    RunIncompleteError,
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
CAPTIONS_PER_IMAGE = [2, 1, 3, 2, 2, 1, 2, 3, 1, 2, 2, 2]
CONFIG = {"clip": {"dir": "models/tiny-clip", "temperature": 0.05}, "keep_threshold": 0.5}


def write_manifest(path: Path, shuffle_seed: int | None = None, caption_edit: str = "") -> Path:
    rows = []
    for k, n_captions in enumerate(CAPTIONS_PER_IMAGE):
        image_id = f"train/{k // 2:04d}/{k:04d}_0{k % 2}.png"
        for c in range(n_captions):
            rows.append(
                {
                    "sample_id": f"{image_id}#{c}",
                    "image_id": image_id,
                    "person_id": k // 2 + 1,
                    "split": "train",
                    "image_path": image_id,
                    "caption_index": c,
                    "caption": f"A man in a red jacket {k}.{c}. He carries a bag.{caption_edit}",
                    "gt_regions": None,
                    "gt_links": None,
                }
            )
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(rows)
    pq.write_table(
        pa.Table.from_pylist(rows, schema=with_version("manifest", {"rsm.root": "/data/synth"})), path
    )
    return path


def fake_outputs(rows: pa.Table, n_regions: int = 2) -> tuple[pa.Table, pa.Table]:
    """Hand-built worker output: 2 sentences x n_regions pairs per ok sample; every 4th sample fails."""
    pairs, status = [], []
    for i, r in enumerate(rows.to_pylist()):
        failed = i % 4 == 3
        n_pairs = 0 if failed else 2 * n_regions
        status.append(
            {
                "sample_id": r["sample_id"],
                "image_id": r["image_id"],
                "status": "unreadable" if failed else "ok",
                "error_message": "truncated PNG" if failed else None,
                "n_regions": 0 if failed else n_regions,
                "n_sentences": 0 if failed else 2,
                "n_pairs": n_pairs,
                "n_kept": n_pairs // 2,
            }
        )
        for s in range(0 if failed else 2):
            for g in range(n_regions):
                pairs.append(
                    {
                        "sample_id": r["sample_id"],
                        "image_id": r["image_id"],
                        "person_id": r["person_id"],
                        "split": r["split"],
                        "caption_index": r["caption_index"],
                        "sentence_index": s,
                        "sentence": f"sentence {s}",
                        "char_start": 20 * s,
                        "char_end": 20 * s + 15,
                        "part_tags": ["upper"] if s == 0 else [],
                        "region_id": g,
                        "region_source": "prior",
                        "region_label": "upper" if g == 0 else None,
                        "bbox_xyxy": [1.0, 2.0 + g, 30.0, 60.5],
                        "mask_rle": None,
                        "region_quality": 0.9,
                        "clip_cosine": 0.25 + 0.01 * g,
                        "softmax_prob": 0.5,
                        "margin": 0.01,
                        "mutual_best": g == s,
                        "part_agreement": 1.0,
                        "reliability": 0.75 - 0.5 * g,
                        "kept": g == 0,
                        "clip_fingerprint": "clip-abc",
                        "config_fingerprint": "cfg-123",
                    }
                )
    return pa.Table.from_pylist(pairs, schema=PAIRS_SCHEMA), pa.Table.from_pylist(
        status, schema=STATUS_SCHEMA
    )


@pytest.fixture
def run(tmp_path: Path) -> tuple[Path, RunPlan, Path]:
    manifest = write_manifest(tmp_path / "manifest.parquet", shuffle_seed=3)
    plan = plan_shards(manifest, 5, CONFIG)
    out = tmp_path / "out"
    assert begin_run(out, plan) == list(range(len(plan.shards)))
    return manifest, plan, out


def commit_all(
    out: Path, plan: RunPlan, shard_ids: list[int] | None = None
) -> dict[int, tuple[pa.Table, pa.Table]]:
    outputs = {}
    for shard_id in shard_ids if shard_ids is not None else range(len(plan.shards)):
        outputs[shard_id] = fake_outputs(plan.rows_for(shard_id))
        result = commit_shard(out, plan, shard_id, *outputs[shard_id], {"infer_s": 0.5})
        assert result.committed and result.reason == COMMITTED
    return outputs


def visible(out: Path) -> set[str]:
    return {p.name for p in out.iterdir() if not p.name.startswith(".")}


# ---------------------------------------------------------------------------------------------- planning


def test_plan_is_deterministic_and_groups_images(tmp_path: Path) -> None:
    plan = plan_shards(write_manifest(tmp_path / "a.parquet", shuffle_seed=1), 5, CONFIG)
    again = plan_shards(
        write_manifest(tmp_path / "b.parquet", shuffle_seed=2), 5, dict(reversed(CONFIG.items()))
    )
    # Same content in another row order / key order -> same run and shards
    assert (again.run_id, again.manifest_fingerprint, again.config_fingerprint, again.shards) == (
        plan.run_id,
        plan.manifest_fingerprint,
        plan.config_fingerprint,
        plan.shards,
    )
    assert RunPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan  # JSON-serialisable
    assert plan.manifest_root == "/data/synth"

    seen_images: dict[str, int] = {}
    all_ids = []
    for spec in plan.shards:
        rows = plan.rows_for(spec.shard_id)
        assert rows.num_rows == spec.n_rows <= 5
        assert rows.schema.metadata[b"rsm.root"] == b"/data/synth"
        ids = rows.column("sample_id").to_pylist()
        assert (ids[0], ids[-1]) == (spec.first_sample_id, spec.last_sample_id)
        for image_id in set(rows.column("image_id").to_pylist()):
            assert image_id not in seen_images, f"image {image_id} split over shards"
            seen_images[image_id] = spec.shard_id
        all_ids += ids
    assert len(all_ids) == len(set(all_ids)) == sum(CAPTIONS_PER_IMAGE) == plan.n_rows
    assert len(seen_images) == len(CAPTIONS_PER_IMAGE)
    # Greedy cuts: each shard is full unless the next image would not fit
    assert [s.n_rows for s in plan.shards] == [3, 5, 5, 4, 4, 2]


def test_plan_fingerprints_track_config_and_manifest(tmp_path: Path) -> None:
    plan = plan_shards(write_manifest(tmp_path / "a.parquet"), 5, CONFIG)
    other_config = plan_shards(tmp_path / "a.parquet", 5, {**CONFIG, "keep_threshold": 0.6})
    other_manifest = plan_shards(write_manifest(tmp_path / "b.parquet", caption_edit="!"), 5, CONFIG)
    other_size = plan_shards(tmp_path / "a.parquet", 4, CONFIG)
    assert other_config.manifest_fingerprint == plan.manifest_fingerprint
    assert other_config.config_fingerprint != plan.config_fingerprint
    assert other_manifest.manifest_fingerprint != plan.manifest_fingerprint
    assert len({plan.run_id, other_config.run_id, other_manifest.run_id, other_size.run_id}) == 4
    # An image larger than shard_size gets a shard of its own rather than being split
    tiny = plan_shards(tmp_path / "a.parquet", 1, CONFIG)
    assert len(tiny.shards) == len(CAPTIONS_PER_IMAGE)
    assert max(s.n_rows for s in tiny.shards) == 3


def test_plan_rejects_bad_input(tmp_path: Path) -> None:
    path = write_manifest(tmp_path / "m.parquet")
    with pytest.raises(ValueError, match="shard_size"):
        plan_shards(path, 0, CONFIG)
    with pytest.raises(TypeError, match="JSON"):
        plan_shards(path, 5, {"bad": {1, 2}})
    table = pq.read_table(path)
    pq.write_table(pa.concat_tables([table, table.slice(0, 1)]), tmp_path / "dup.parquet")
    with pytest.raises(ValueError, match="more than once"):
        plan_shards(tmp_path / "dup.parquet", 5, CONFIG)


# ---------------------------------------------------------------------------------------------- commit + read


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
    assert "run not finalized" in verify_run(out / "nowhere")[0]
