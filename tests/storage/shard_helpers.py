"""Helpers for the storage tests: a 12-image manifest, fake worker outputs, committing a whole run."""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from storage.plan import RunPlan
from storage.schemas import PAIRS_SCHEMA, STATUS_SCHEMA, with_version
from storage.shards import (
    COMMITTED,
    commit_shard,
)
from tests.factories import pair_row

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
                    pair_row(
                        r,
                        sentence_index=s,
                        sentence=f"sentence {s}",
                        char_start=20 * s,
                        char_end=20 * s + 15,
                        part_tags=["upper"] if s == 0 else [],
                        region_id=g,
                        region_label="upper" if g == 0 else None,
                        bbox_xyxy=[1.0, 2.0 + g, 30.0, 60.5],
                        region_quality=0.9,
                        clip_cosine=0.25 + 0.01 * g,
                        margin=0.01,
                        mutual_best=g == s,
                        part_agreement=1.0,
                        reliability=0.75 - 0.5 * g,
                        kept=g == 0,
                        clip_fingerprint="clip-abc",
                        config_fingerprint="cfg-123",
                    )
                )
    return pa.Table.from_pylist(pairs, schema=PAIRS_SCHEMA), pa.Table.from_pylist(
        status, schema=STATUS_SCHEMA
    )


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
