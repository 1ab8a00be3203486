"""A simulated annotator: labels an audit sample from the synthetic benchmark's ground truth.

Consumes an audit database and the dataset manifest with region ground truth (`gt_regions`, `gt_links`:
pvlg or the synthetic benchmark); produces label events (source `oracle`) exactly as the web page would
write them, so the loop sample → label → fit is tested end to end and the interval's coverage can be
measured. A pair is `correct` when `storage.truth.judge_pairs` finds its region linked to a phrase of its
unit, else `wrong` (a unit that names nothing groundable is wrong too, as in QA's true noise rate). With
`error_rate` E each verdict is flipped with probability E (seeded), to see what annotator mistakes do.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from qa.audit.db import AuditDB, AuditError
from storage.truth import judge_pairs


def oracle_verdicts(items, manifest_path: str | Path) -> dict[int, bool]:
    """item id -> correct, for every item whose sample has ground truth in the manifest."""
    manifest = pq.read_table(manifest_path, columns=["sample_id", "gt_regions", "gt_links"])
    table = pa.table(
        {
            "sample_id": [it.sample_id for it in items],
            "char_start": pa.array([it.char_start for it in items], pa.int32()),
            "char_end": pa.array([it.char_end for it in items], pa.int32()),
            "bbox_xyxy": pa.array([list(it.bbox_xyxy) for it in items], pa.list_(pa.float32(), 4)),
            "mask_rle": pa.array([it.mask_rle for it in items], pa.string()),
        }
    )
    has_truth, _, correct = judge_pairs(table, manifest)
    return {it.item_id: bool(c) for it, h, c in zip(items, has_truth, correct, strict=True) if h}


def label_with_oracle(
    db_path: str | Path,
    manifest_path: str | Path,
    error_rate: float = 0.0,
    seed: int = 0,
    annotator: str = "oracle",
    limit: int | None = None,
) -> dict:
    """Label the items `annotator` has not labelled yet (the first `limit` in queue order, or all);
    returns {labelled, correct, flipped, no_truth}."""
    if not 0.0 <= error_rate < 0.5:
        raise AuditError(f"--error-rate must be in [0, 0.5), got {error_rate}")
    if not Path(manifest_path).is_file():
        raise AuditError(f"manifest {manifest_path} does not exist")
    with AuditDB(db_path) as db:
        done = {i for i, by in db.verdicts().items() if annotator in by}
        todo = [it for it in db.items(queue_order=True) if it.item_id not in done]
        if limit is not None:
            todo = todo[:limit]
        truth = oracle_verdicts(todo, manifest_path)
        if todo and not truth:
            raise AuditError(
                f"{manifest_path} holds no region ground truth for the sampled pairs: the oracle needs the "
                "synthetic benchmark's or a pvlg manifest (gt_regions, gt_links)"
            )
        rng = np.random.default_rng(seed)
        flips = rng.random(len(todo)) < error_rate
        n_correct = n_flipped = 0
        for it, flip in zip(todo, flips, strict=True):
            if it.item_id not in truth:
                continue
            correct = truth[it.item_id] != bool(flip)
            db.add_event(it.item_id, annotator, "correct" if correct else "wrong", source="oracle")
            n_correct += correct
            n_flipped += bool(flip)
        return {
            "labelled": len(truth),
            "correct": n_correct,
            "flipped": n_flipped,
            "no_truth": len(todo) - len(truth),
        }
