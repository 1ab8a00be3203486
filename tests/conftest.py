"""Shared fixtures: a tiny synthetic pvlg dataset with its manifest, and a tiny (untrained) CLIP folder.

Session-scoped so the whole suite builds them once. The CLIP here is randomly initialised: tests that
need *meaningful* scores train their own; pipeline tests only need the real loading/scoring code path.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from flows.env import apply_offline_defaults

apply_offline_defaults()
# The training data's decode cache of this test session: never the user's ~/.cache, never a stale entry
os.environ.setdefault("RSM_DECODE_CACHE", tempfile.mkdtemp(prefix="rsm-decode-cache-"))


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """A 6-identity x 3-image synthetic pvlg dataset (36 captions) with `manifest.parquet` inside."""
    from storage.manifest import main as manifest_main
    from storage.synth import generate

    root = tmp_path_factory.mktemp("tiny_pvlg")
    generate(root, identities=6, images_per_id=3, seed=11, workers=1)
    rc = manifest_main(["--format", "pvlg", "--root", str(root), "--out", str(root / "manifest.parquet")])
    assert rc == 0
    return root


@pytest.fixture(scope="session")
def tiny_clip_dir(tiny_dataset, tmp_path_factory) -> Path:
    """An untrained tiny CLIP saved in the from_pretrained layout, vocabulary from the tiny dataset."""
    import pyarrow.parquet as pq

    from miners.training.tiny_clip import TinyClipConfig, build_model, build_processor, build_tokenizer

    cfg = TinyClipConfig(vision_layers=1, text_layers=1, vision_width=64, text_width=64, embed_dim=64)
    captions = pq.read_table(tiny_dataset / "manifest.parquet")["caption"].to_pylist()
    tokenizer = build_tokenizer(captions, cfg)
    out = tmp_path_factory.mktemp("tiny_clip")
    build_model(len(tokenizer), cfg, seed=0).save_pretrained(out)
    build_processor(tokenizer, cfg).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_run(tiny_dataset, tiny_clip_dir, tmp_path_factory) -> Path:
    """The tiny dataset mined with the tiny CLIP and committed as a finalized shard run (3 shards),
    through the storage layer directly (no Ray/Prefect: those are tested in tests/flows)."""
    from miners.rsm import RSMConfig, RSMMiner
    from miners.run_config import run_config_for
    from storage.plan import load_shard_rows, plan_shards
    from storage.shards import begin_run, commit_shard, finalize_run

    cfg = RSMConfig(clip_model=str(tiny_clip_dir))
    out = tmp_path_factory.mktemp("tiny_run") / "shards"
    plan = plan_shards(tiny_dataset / "manifest.parquet", 12, run_config_for(cfg).to_dict())
    miner = RSMMiner(cfg)
    for shard_id in begin_run(out, plan):
        rows = load_shard_rows(plan, shard_id)
        result = miner.mine(rows, tiny_dataset)
        commit_shard(out, plan, shard_id, result.pairs, result.status, {"seconds": result.seconds})
    finalize_run(out, plan)
    return out
