"""The RSM entry point on a tiny dataset: every row accounted for, pairs well-formed, bad images named."""

import shutil

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from miners.rsm import RSMConfig, RSMMiner, matches_from_pairs
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
    assert {"load", "regions", "split", "clip", "match"} <= set(result.seconds)


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
