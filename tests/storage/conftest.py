"""Fixtures of the storage tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from storage.plan import RunPlan, plan_shards
from storage.shards import begin_run
from tests.storage.shard_helpers import CONFIG, write_manifest


@pytest.fixture
def run(tmp_path: Path) -> tuple[Path, RunPlan, Path]:
    manifest = write_manifest(tmp_path / "manifest.parquet", shuffle_seed=3)
    plan = plan_shards(manifest, 5, CONFIG)
    out = tmp_path / "out"
    assert begin_run(out, plan) == list(range(len(plan.shards)))
    return manifest, plan, out
