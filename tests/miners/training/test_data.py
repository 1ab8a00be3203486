"""miners.training.data: manifest rows become model-size images, caption tokens and weighted local pairs;
unreadable images are skipped by name."""

from __future__ import annotations

import pyarrow.compute as pc
import pytest

from miners.clip_scorer import load_clip
from miners.encoders import input_size_hw
from miners.training.data import build_clip_data
from storage.manifest import read_manifest
from storage.reader import read_pairs


@pytest.fixture(scope="module")
def processor(tiny_clip_dir):
    return load_clip(tiny_clip_dir, "cpu")[1]


def test_images_and_captions_line_up(tiny_dataset, processor):
    table, meta = read_manifest(tiny_dataset / "manifest.parquet")
    data = build_clip_data(table, processor, root=meta["root"])
    assert len(data) == table.num_rows and not data.images_u8.dtype.is_floating_point
    assert tuple(data.images_u8.shape[2:]) == input_size_hw(processor)
    assert data.images_u8.shape[0] == len(set(table["image_id"].to_pylist())) == len(data.image_ids)
    # every caption points at its own image and person
    for i, sample_id in enumerate(data.sample_ids):
        row = table.filter(pc.equal(table["sample_id"], sample_id)).to_pylist()[0]
        assert data.image_ids[data.cap_image_index[i]] == row["image_id"]
        assert data.cap_pids[i] == row["person_id"] and data.cap_n_sentences[i] == len(
            data.cap_sentence_tokens[i]
        )
    assert not any(data.local_pairs)  # no pairs given: no local pairs


def test_local_pairs_carry_reliability_or_uniform_weights(tiny_dataset, tiny_run, processor):
    table, meta = read_manifest(tiny_dataset / "manifest.parquet")
    pairs = read_pairs(tiny_run)
    weighted = build_clip_data(table, processor, root=meta["root"], pairs=pairs, reliability_threshold=0.0)
    uniform = build_clip_data(
        table, processor, root=meta["root"], pairs=pairs, use_reliability=False, reliability_threshold=0.0
    )
    w = [p.weight for ps in weighted.local_pairs for p in ps]
    u = [p.weight for ps in uniform.local_pairs for p in ps]
    assert w and len(w) == len(u) and set(u) == {1.0}
    reliabilities = pairs["reliability"].to_numpy().astype(float)
    assert min(w) < 1.0 and all(abs(reliabilities - x).min() < 1e-6 for x in w)
    # a threshold drops the pairs below it
    strict = build_clip_data(table, processor, root=meta["root"], pairs=pairs, reliability_threshold=0.9)
    assert sum(len(ps) for ps in strict.local_pairs) < len(w)


def test_unreadable_image_is_skipped_by_name(tiny_dataset, processor, tmp_path):
    table, meta = read_manifest(tiny_dataset / "manifest.parquet")
    first = table.slice(0, 1).to_pylist()[0]
    broken = tmp_path / first["image_path"]
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"not an image")
    elsewhere = table.slice(0, 1).replace_schema_metadata({b"rsm.root": str(tmp_path).encode()})
    data = build_clip_data(elsewhere, processor)
    assert len(data) == 0 and first["image_id"] in data.skipped
    assert "unreadable_image" in data.skipped[first["image_id"]]


def test_an_image_swapped_for_a_symlink_out_of_the_root_is_skipped(tiny_dataset, processor, tmp_path):
    table, meta = read_manifest(tiny_dataset / "manifest.parquet")
    first = table.slice(0, 1).to_pylist()[0]
    root, outside = tmp_path / "root", tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes((tiny_dataset / first["image_path"]).read_bytes())
    link = root / first["image_path"]
    link.parent.mkdir(parents=True)
    link.symlink_to(outside / "secret.png")  # a readable image, but not inside the dataset root
    elsewhere = table.slice(0, 1).replace_schema_metadata({b"rsm.root": str(root).encode()})
    data = build_clip_data(elsewhere, processor)
    assert len(data) == 0 and data.skipped[first["image_id"]].startswith("unsafe_path: ")


def test_decoded_images_are_cached_across_runs_and_a_changed_image_is_decoded_again(
    tiny_dataset, tiny_clip_dir, tmp_path, monkeypatch
):
    import os
    import shutil

    import pyarrow.parquet as pq
    import torch

    from miners.clip_scorer import load_clip
    from miners.training.data import DECODE_CACHE_ENV, build_clip_data
    from storage.manifest import main as manifest_main

    data_root = tmp_path / "data"
    shutil.copytree(tiny_dataset, data_root, ignore=shutil.ignore_patterns("manifest.parquet"))
    assert (
        manifest_main(["--format", "pvlg", "--root", str(data_root), "--out", str(tmp_path / "m.parquet")])
        == 0
    )
    table = pq.read_table(tmp_path / "m.parquet")  # rooted at the copy, whose images the test changes
    _, processor = load_clip(tiny_clip_dir, "cpu")
    monkeypatch.setenv(DECODE_CACHE_ENV, "off")
    plain = build_clip_data(table, processor)
    assert plain.decode_cache == {}
    monkeypatch.setenv(DECODE_CACHE_ENV, str(tmp_path / "cache"))
    first = build_clip_data(table, processor)
    second = build_clip_data(table, processor)
    assert first.decode_cache["hit"] is False and second.decode_cache["hit"] is True
    assert second.decode_cache["mb"] > 0 and os.path.isfile(second.decode_cache["path"])
    for data in (first, second):  # the cache changes nothing the trainer sees
        assert torch.equal(data.images_u8, plain.images_u8) and data.image_ids == plain.image_ids
        assert data.sample_ids == plain.sample_ids and (data.image_scale_xy == plain.image_scale_xy).all()
    # An image replaced on disk (another size and mtime) is a new key: decoded again, never read stale
    target = data_root / table["image_path"][0].as_py()
    target.write_bytes(b"broken now")
    third = build_clip_data(table, processor)
    assert third.decode_cache["hit"] is False and table["image_id"][0].as_py() in third.skipped
