"""storage.plan: deterministic, image-grouped shards; fingerprints track config and manifest."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage.errors import ShardStoreError
from storage.plan import RunPlan, plan_shards, read_manifest_table, read_sorted_manifest

# 12 images, 23 captions: with shard_size 5 no image may straddle a cut
from tests.storage.shard_helpers import (
    CAPTIONS_PER_IMAGE,
    CONFIG,
    write_manifest,
)


def test_plan_is_deterministic_and_groups_images(tmp_path: Path) -> None:
    plan = plan_shards(write_manifest(tmp_path / "a.parquet", shuffle_seed=1), 5, CONFIG)
    again = plan_shards(
        write_manifest(tmp_path / "b.parquet", shuffle_seed=2), 5, dict(reversed(CONFIG.items()))
    )
    # Same content in another row order / key order -> same run and shards
    assert (again.run_id, again.manifest_fingerprint, again.run_config_sha256, again.shards) == (
        plan.run_id,
        plan.manifest_fingerprint,
        plan.run_config_sha256,
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


def test_shards_slice_one_sorted_read_and_refuse_an_unsorted_table(tmp_path: Path) -> None:
    plan = plan_shards(write_manifest(tmp_path / "a.parquet", shuffle_seed=1), 5, CONFIG)
    sorted_table = read_sorted_manifest(plan.manifest_path)
    for spec in plan.shards:  # one read and one sort for the whole run, the same rows as a fresh read
        assert plan.rows_for(spec.shard_id, sorted_table) == plan.rows_for(spec.shard_id)
    # The file order is shuffled: slicing it unsorted would give other rows, which the digest refuses.
    with pytest.raises(ShardStoreError, match="differ from the plan"):
        plan.rows_for(0, read_manifest_table(plan.manifest_path))


def test_plan_fingerprints_track_config_and_manifest(tmp_path: Path) -> None:
    plan = plan_shards(write_manifest(tmp_path / "a.parquet"), 5, CONFIG)
    other_config = plan_shards(tmp_path / "a.parquet", 5, {**CONFIG, "keep_threshold": 0.6})
    other_manifest = plan_shards(write_manifest(tmp_path / "b.parquet", caption_edit="!"), 5, CONFIG)
    other_size = plan_shards(tmp_path / "a.parquet", 4, CONFIG)
    assert other_config.manifest_fingerprint == plan.manifest_fingerprint
    assert other_config.run_config_sha256 != plan.run_config_sha256
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
