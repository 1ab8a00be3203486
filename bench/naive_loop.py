"""The loop a user would write by hand, for `bench/speed.py`'s `speedup_vs_naive`.

    python bench/naive_loop.py --manifest M --clip-model DIR --out pairs.parquet [--limit-images N]

Same models and same outputs as `python -m flows.mine_rsm` (the pairs table, PAIRS_SCHEMA): one image
at a time — decode, `prior` regions, crops — then one CLIP forward per crop and one per text (each
sentence, each colour variant of the colour probe; no batching, no de-duplication of repeated texts),
the library's matcher, bank features and calibrator, one dict per pair and `Table.from_pylist` at the
end. The models come from an `RSMMiner` (so the settings are the flow's defaults); none of its batched
paths are used. One process, `--threads` torch threads (default 1: its forwards are single crops and
single sentences, too small to split across cores; with 2 threads on a 2-core machine that is also
running anything else, each forward waits at OpenMP barriers for a descheduled thread and the loop ran
10x slower — a figure about the machine, not the loop).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flows.env import apply_offline_defaults  # noqa: E402

apply_offline_defaults()

from miners.attribute_probe import PROBES  # noqa: E402
from miners.images import contained_path, load_rgb  # noqa: E402
from miners.rsm import RSMConfig, RSMMiner, _Embedded, _Prepared  # noqa: E402
from storage.plan import read_sorted_manifest  # noqa: E402
from storage.schemas import PAIRS_SCHEMA  # noqa: E402


def one(scorer, text: str) -> np.ndarray:
    return scorer.embed_texts([text]).cpu().numpy().astype(np.float32)[0]


def _value(column, k: int):
    """Entry k of a matcher column as a plain Python value (None for a feature that is off)."""
    if column is None:
        return None
    value = column[k]
    if isinstance(value, np.ndarray):  # bbox_xyxy
        return [float(v) for v in value]
    return value.item() if isinstance(value, np.generic) else value


def mine_naively(miner: RSMMiner, rows: list[dict], root: Path) -> list[dict]:
    by_image: dict[str, list[dict]] = {}
    for r in rows:
        by_image.setdefault(r["image_id"], []).append(r)
    pair_rows: list[dict] = []
    for samples in by_image.values():
        image = load_rgb(contained_path(root, samples[0]["image_path"]))
        regions = miner.proposer.propose(image)
        crops = miner.scorer.region_crops(image, regions)
        region_emb = np.stack(
            [miner.scorer.embed_crops([c]).cpu().numpy().astype(np.float32)[0] for c in crops]
        )
        prepared = {samples[0]["image_id"]: _Prepared(regions, [None] * len(regions), crops)}
        for r in samples:
            units = miner.splitter.split(r["caption"])
            if not units:
                continue
            text_emb = np.stack([one(miner.scorer, u.text) for u in units])
            variants = {
                name: [
                    [np.stack([one(miner.scorer, t) for t in word]) for word in PROBES[name](u.text)]
                    for u in units
                ]
                for name in miner.probes()
            }
            embedded = [_Embedded(text_emb, region_emb, variants)]
            blocks = miner._match([(r, units)], embedded, prepared, {}, {"matching": 0.0})
            block = blocks[0]
            for k in range(len(units)):  # one dict per pair, as a hand-written loop builds them
                pair_rows.append({name: _value(block[name], k) for name in PAIRS_SCHEMA.names})
    return pair_rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--clip-model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--limit-images", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    table = read_sorted_manifest(args.manifest)
    root = Path((table.schema.metadata or {})[b"rsm.root"].decode())
    rows = table.to_pylist()
    if args.limit_images:
        keep = set(list(dict.fromkeys(r["image_id"] for r in rows))[: args.limit_images])
        rows = [r for r in rows if r["image_id"] in keep]
    miner = RSMMiner(RSMConfig(clip_model=args.clip_model))
    miner.scorer.cfg = replace(miner.scorer.cfg, text_cache_entries=0)  # no de-duplication of texts
    pair_rows = mine_naively(miner, rows, root)
    pq.write_table(pa.Table.from_pylist(pair_rows, schema=PAIRS_SCHEMA), args.out)
    n_images = len({r["image_id"] for r in rows})
    print(f"naive loop: {n_images} images, {len(pair_rows)} pairs in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
