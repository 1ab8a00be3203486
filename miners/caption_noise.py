"""Known-noise injection: swap text units of captions for units of other people's captions.

One algorithm, two users. `swap_unit` replaces one unit's char span by a donor text and returns the
new caption and the donor's span in it; `pick_donor` draws a donor unit of another person. The QA
estimator check (qa.inject) swaps units of already-mined captions and tracks each by span; the
training ablation (bench/train_ablation.py) uses `shuffle_caption_units`, which swaps a `fraction` of
a manifest split's units *before mining*, so the injected pairs get their features and reliability
from the RSM itself — which is what a reliability-weighted trainer is tested against. Ground-truth
links of changed captions are dropped (their spans no longer hold); other rows are untouched.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from miners.captions import CaptionSplitter


def swap_unit(caption: str, char_start: int, char_end: int, donor: str) -> tuple[str, tuple[int, int]]:
    """(caption with [char_start, char_end) replaced by `donor`, the donor's (start, end) in it)."""
    return caption[:char_start] + donor + caption[char_end:], (char_start, char_start + len(donor))


def pick_donor(rng: np.random.Generator, pool: np.ndarray, persons: np.ndarray, person: object) -> int | None:
    """A uniformly drawn index from `pool` whose `persons[index]` is not `person`; None if there is none."""
    candidates = pool[persons[pool] != person]
    if not candidates.size:
        return None
    return int(candidates[rng.integers(candidates.size)])


def shuffle_caption_units(
    manifest: pa.Table,
    fraction: float,
    seed: int,
    split: str = "train",
    splitter: CaptionSplitter | None = None,
) -> tuple[pa.Table, list[dict]]:
    """(noisy manifest, injected) where injected lists {sample_id, unit_index, original, replacement}."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must lie in [0, 1], got {fraction}")
    splitter = splitter or CaptionSplitter()
    rows = manifest.to_pylist()
    chosen_rows = [i for i, r in enumerate(rows) if r["split"] == split]
    units = splitter.split_many([rows[i]["caption"] for i in chosen_rows])
    flat = [(i, k) for i, us in zip(chosen_rows, units, strict=True) for k in range(len(us))]
    unit_of = dict(zip(chosen_rows, units, strict=True))
    persons = np.array([rows[i]["person_id"] for i, _ in flat])
    everyone = np.arange(len(flat))
    rng = np.random.default_rng(seed)
    n_pick = int(round(fraction * len(flat)))
    picked = sorted(rng.choice(len(flat), size=n_pick, replace=False).tolist()) if n_pick else []
    by_row: dict[int, list[int]] = {}
    for p in picked:
        i, k = flat[p]
        by_row.setdefault(i, []).append(k)

    injected = []
    for i, ks in by_row.items():
        caption, us = rows[i]["caption"], unit_of[i]
        # Replace from the end so earlier spans stay valid.
        for k in sorted(ks, reverse=True):
            d = pick_donor(rng, everyone, persons, rows[i]["person_id"])
            if d is None:
                continue
            j, m = flat[d]
            donor = unit_of[j][m].text
            u = us[k]
            caption, _ = swap_unit(caption, u.char_start, u.char_end, donor)
            injected.append(
                {"sample_id": rows[i]["sample_id"], "unit_index": k, "original": u.text, "replacement": donor}
            )
        rows[i] = {**rows[i], "caption": caption, "gt_links": None}
    return pa.Table.from_pylist(rows, schema=manifest.schema), injected


__all__ = ["pick_donor", "shuffle_caption_units", "swap_unit"]
