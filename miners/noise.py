"""Known-noise injection for ablations: shuffle a fraction of caption sentences across people.

Consumes a manifest table; produces a copy in which a `fraction` of the text units (sentences/clauses,
as the miner splits them) of the chosen split's captions are replaced by a unit taken from a caption of
another person, plus the list of what was replaced. The noisy manifest is then *mined* like any other,
so the injected pairs get their features and reliability from the RSM itself — which is what a
reliability-weighted trainer is tested against. Ground-truth links of changed captions are dropped
(their spans no longer hold); other rows are untouched.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from miners.captions import CaptionSplitter


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
            for _ in range(50):  # a donor unit of another person
                j, m = flat[int(rng.integers(len(flat)))]
                if rows[j]["person_id"] != rows[i]["person_id"]:
                    break
            else:
                continue
            donor = unit_of[j][m].text
            u = us[k]
            caption = caption[: u.char_start] + donor + caption[u.char_end :]
            injected.append(
                {"sample_id": rows[i]["sample_id"], "unit_index": k, "original": u.text, "replacement": donor}
            )
        rows[i] = {**rows[i], "caption": caption, "gt_links": None}
    return pa.Table.from_pylist(rows, schema=manifest.schema), injected
