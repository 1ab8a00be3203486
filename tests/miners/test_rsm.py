"""The RSM entry point on a tiny dataset: every row accounted for, pairs well-formed, bad images named."""

import os
import shutil
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from miners.rsm import RSMConfig, RSMMiner, matches_from_pairs, split_by_pixel_budget
from storage.manifest import read_manifest
from storage.schemas import PAIRS_SCHEMA, STATUS_SCHEMA


@pytest.fixture(scope="module")
def miner(tiny_clip_dir):
    return RSMMiner(RSMConfig(clip_model=str(tiny_clip_dir), images_per_batch=4))


def test_mine_accounts_for_every_row(miner, tiny_dataset):
    table, meta = read_manifest(tiny_dataset / "manifest.parquet")
    result = miner.mine(table, meta["root"])
    assert result.pairs.schema.equals(PAIRS_SCHEMA) and result.status.schema.equals(STATUS_SCHEMA)
    assert result.status["sample_id"].to_pylist() == table["sample_id"].to_pylist()
    assert set(result.status["status"].to_pylist()) == {"ok"}
    # One pair per text unit; keys unique; spans index the caption.
    keys = list(
        zip(*(result.pairs[c].to_pylist() for c in ("sample_id", "sentence_index", "region_id")), strict=True)
    )
    assert len(keys) == len(set(keys))
    n_units = pc.sum(result.status["n_sentences"]).as_py()
    assert result.pairs.num_rows == n_units
    captions = dict(zip(table["sample_id"].to_pylist(), table["caption"].to_pylist(), strict=True))
    for row in result.pairs.slice(0, 20).to_pylist():
        assert captions[row["sample_id"]][row["char_start"] : row["char_end"]] == row["sentence"]
        assert 0.0 <= row["reliability"] <= 1.0
        assert row["kept"] == (row["reliability"] >= 0.5)
        assert row["region_source"] == "prior"
    # Features round-trip to the calibrator's input.
    m = matches_from_pairs(result.pairs)
    np.testing.assert_allclose(miner.calibrator.predict(m), result.pairs["reliability"].to_numpy(), rtol=1e-5)
    assert list(result.seconds) == ["load", "regions", "sentences", "scoring", "matching", "tables"]
    assert all(v >= 0 for v in result.seconds.values()) and result.seconds["scoring"] > 0


def test_bad_images_and_empty_captions_are_reported_not_lost(miner, tiny_dataset, tmp_path):
    table, meta = read_manifest(tiny_dataset / "manifest.parquet")
    root = tmp_path / "root"
    shutil.copytree(meta["root"], root)
    rows = table.slice(0, 6).to_pylist()
    # Corrupt one image (truncate it), delete another, blank one caption.
    paths = list(dict.fromkeys(r["image_path"] for r in rows))
    data = (root / paths[0]).read_bytes()
    (root / paths[0]).write_bytes(data[: len(data) // 3])
    (root / paths[1]).unlink()
    rows[-1]["caption"] = " . . "
    result = miner.mine(pa.Table.from_pylist(rows, schema=table.schema), root)
    status = {r["sample_id"]: r for r in result.status.to_pylist()}
    assert len(status) == len(rows) == result.status.num_rows
    for r in rows:
        s = status[r["sample_id"]]
        if r["image_path"] == paths[0]:
            assert s["status"] == "corrupt_image" and paths[0].split("/")[-1] in s["error_message"]
        elif r["image_path"] == paths[1]:
            assert s["status"] == "missing_image" and paths[1].split("/")[-1] in s["error_message"]
        elif r is rows[-1]:
            assert s["status"] == "no_sentences"
        else:
            assert s["status"] == "ok"
    bad = {r["sample_id"] for r in rows if r["image_path"] in paths[:2]} | {rows[-1]["sample_id"]}
    assert not bad & set(result.pairs["sample_id"].to_pylist())


def _copy_root(tiny_dataset, tmp_path):
    table, meta = read_manifest(tiny_dataset / "manifest.parquet")
    root = tmp_path / "root"
    shutil.copytree(meta["root"], root)
    return table, root


def _first_images(table, n_images: int) -> list[dict]:
    """The manifest rows of the first `n_images` images, in manifest order."""
    rows = table.to_pylist()
    keep = list(dict.fromkeys(r["image_path"] for r in rows))[:n_images]
    return [r for r in rows if r["image_path"] in keep]


def _statuses(result) -> list[tuple[str, str]]:
    return list(zip(result.status["sample_id"].to_pylist(), result.status["status"].to_pylist(), strict=True))


def test_a_batch_of_only_unloadable_images_yields_status_rows_not_a_crash(miner, tiny_dataset, tmp_path):
    # images_per_batch=4: the first four images are one batch, and not one of them loads.
    table, root = _copy_root(tiny_dataset, tmp_path)
    rows = _first_images(table, 4)
    paths = list(dict.fromkeys(r["image_path"] for r in rows))
    (root / paths[0]).write_bytes(b"")
    (root / paths[1]).write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (root / paths[2]).write_bytes(b"")
    (root / paths[3]).unlink()
    result = miner.mine(pa.Table.from_pylist(rows, schema=table.schema), root)
    assert result.pairs.num_rows == 0 and result.pairs.schema.equals(PAIRS_SCHEMA)
    expected = {paths[0]: "unreadable_image", paths[1]: "unreadable_image"}
    expected |= {paths[2]: "unreadable_image", paths[3]: "missing_image"}
    assert _statuses(result) == [(r["sample_id"], expected[r["image_path"]]) for r in rows]
    assert all(msg for msg in result.status["error_message"].to_pylist())


def test_a_batch_of_only_empty_captions_yields_no_sentences(miner, tiny_dataset):
    table, meta = read_manifest(tiny_dataset / "manifest.parquet")
    rows = _first_images(table, 4)
    for r, caption in zip(
        rows, [" . . ", "!!! ???", "🙂🙂🙂", "…", " ", "-- ; --", "👍 🎉", ":)"], strict=False
    ):
        r["caption"] = caption
    result = miner.mine(pa.Table.from_pylist(rows, schema=table.schema), meta["root"])
    assert result.pairs.num_rows == 0
    assert _statuses(result) == [(r["sample_id"], "no_sentences") for r in rows]


def test_a_batch_without_regions_yields_no_regions(miner, tiny_dataset, monkeypatch):
    from miners.regions import Regions

    class NoRegions:
        name = "prior"

        def propose_batch(self, images):
            return [Regions.empty("prior") for _ in images]

    monkeypatch.setattr(miner, "proposer", NoRegions())
    table, meta = read_manifest(tiny_dataset / "manifest.parquet")
    rows = _first_images(table, 4)
    result = miner.mine(pa.Table.from_pylist(rows, schema=table.schema), meta["root"])
    assert result.pairs.num_rows == 0
    assert _statuses(result) == [(r["sample_id"], "no_regions") for r in rows]


def test_one_zero_byte_image_costs_only_its_own_rows(miner, tiny_dataset, tmp_path):
    table, root = _copy_root(tiny_dataset, tmp_path)
    rows = _first_images(table, 4)
    good = miner.mine(pa.Table.from_pylist(rows, schema=table.schema), root)
    bad_path = rows[0]["image_path"]
    (root / bad_path).write_bytes(b"")
    result = miner.mine(pa.Table.from_pylist(rows, schema=table.schema), root)
    assert _statuses(result) == [
        (r["sample_id"], "unreadable_image" if r["image_path"] == bad_path else "ok") for r in rows
    ]
    survivors = pc.invert(pc.equal(good.pairs["image_id"], bad_path))
    want = good.pairs.filter(survivors)
    assert result.pairs.num_rows == want.num_rows > 0
    for name in want.column_names:  # CLIP features to float32 noise: the batch holds one image less
        if pa.types.is_floating(want.schema.field(name).type):
            np.testing.assert_allclose(result.pairs[name].to_numpy(), want[name].to_numpy(), atol=1e-5)
        else:
            assert result.pairs[name].equals(want[name]), name


def test_split_by_pixel_budget_keeps_order_and_never_drops_an_image():
    assert split_by_pixel_budget([30, 30, 50, 10, 200, 5], 64) == [[0, 1], [2, 3], [4], [5]]
    assert split_by_pixel_budget([0, 0, 0], 1) == [[0, 1, 2]]  # refused-unread images cost nothing
    assert split_by_pixel_budget([], 64) == []


def test_the_pixel_budget_splits_batches_without_changing_the_output(miner, tiny_dataset, monkeypatch):
    table, meta = read_manifest(tiny_dataset / "manifest.parquet")
    rows = pa.Table.from_pylist(_first_images(table, 8), schema=table.schema)
    decoded_together: list[int] = []  # images per load: what the budget bounds
    real_load = miner._load_images

    def counting_load(chunk, root, status, seconds):
        decoded_together.append(len(chunk))
        return real_load(chunk, root, status, seconds)

    monkeypatch.setattr(miner, "_load_images", counting_load)
    by_budget = {}
    image_px = 128 * 256  # every synthetic image: a budget of two images never holds three
    for budget in (1, 2 * image_px, 10**12):
        decoded_together.clear()
        monkeypatch.setattr(miner, "cfg", replace(miner.cfg, max_batch_pixels=budget))
        by_budget[budget] = (miner.mine(rows, meta["root"]), list(decoded_together))
    assert [loads for _, loads in by_budget.values()] == [[1] * 8, [2, 2, 2, 2], [4, 4]]
    reference = by_budget[10**12][0]
    assert reference.pairs.num_rows > 0
    for result, _ in by_budget.values():  # identical, not merely close: CLIP still sees whole batches
        assert result.pairs.equals(reference.pairs) and result.status.equals(reference.status)
    assert "max_batch_pixels" not in miner.cfg.identity_dict()  # speed only: not the run's identity


def test_a_symlink_swapped_in_after_import_is_refused(miner, tiny_dataset, tmp_path):
    table, root = _copy_root(tiny_dataset, tmp_path)  # the manifest was written before the swap
    rows = _first_images(table, 3)
    paths = list(dict.fromkeys(r["image_path"] for r in rows))
    outside = tmp_path / "secret.png"
    shutil.copy(root / paths[0], outside)  # a perfectly valid image, just not in the dataset
    (root / paths[0]).unlink()
    (root / paths[0]).symlink_to(outside)
    (root / paths[1]).unlink()
    (root / paths[1]).symlink_to(root / paths[2])  # a link that stays inside the root is fine
    result = miner.mine(pa.Table.from_pylist(rows, schema=table.schema), root)
    status = {r["sample_id"]: r for r in result.status.to_pylist()}
    for r in rows:
        s = status[r["sample_id"]]
        if r["image_path"] == paths[0]:
            assert s["status"] == "unsafe_path"
            assert paths[0] in s["error_message"] and str(outside.resolve()) in s["error_message"]
        else:
            assert s["status"] == "ok"
    assert paths[0] not in set(result.pairs["image_id"].to_pylist())


def test_fifos_and_directories_are_named_not_missing(miner, tiny_dataset, tmp_path):
    table, root = _copy_root(tiny_dataset, tmp_path)
    rows = _first_images(table, 3)
    paths = list(dict.fromkeys(r["image_path"] for r in rows))
    (root / paths[0]).unlink()
    os.mkfifo(root / paths[0])
    (root / paths[1]).unlink()
    (root / paths[1]).mkdir()
    result = miner.mine(pa.Table.from_pylist(rows, schema=table.schema), root)
    status = {r["sample_id"]: r for r in result.status.to_pylist()}
    for r in rows:
        s = status[r["sample_id"]]
        if r["image_path"] in paths[:2]:
            what = "FIFO" if r["image_path"] == paths[0] else "directory"
            assert s["status"] == "not_a_regular_file" and what in s["error_message"]
        else:
            assert s["status"] == "ok"


def test_a_shard_mines_to_the_same_bytes_whatever_the_worker_mined_before(tiny_clip_dir, tiny_dataset):
    """The text cache lives for one `mine` call: a re-mined shard (another worker, after a fault) must
    equal the first attempt byte for byte, so the worker's history may not leak into it."""
    table, meta = read_manifest(tiny_dataset / "manifest.parquet")
    rows = _first_images(table, 12)
    first = pa.Table.from_pylist(rows[: len(rows) // 2], schema=table.schema)
    second = pa.Table.from_pylist(rows[len(rows) // 2 :], schema=table.schema)
    cfg = RSMConfig(clip_model=str(tiny_clip_dir), images_per_batch=2)
    fresh = RSMMiner(cfg).mine(second, meta["root"])
    used = RSMMiner(cfg)
    used.mine(first, meta["root"])
    assert len(used.scorer._text_cache) > 0  # the cache was in use, so this test can see a leak
    after = used.mine(second, meta["root"])
    assert fresh.pairs.num_rows > 0
    assert after.pairs.equals(fresh.pairs) and after.status.equals(fresh.status)
