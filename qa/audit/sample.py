"""Draw a stratified sample of a run's mined pairs into an audit database.

Consumes a committed run folder (pairs read through its run manifest) and an audit database (new or made
from the same run); produces sampled items with their stratum and inclusion probability.

Strata: the kept pairs and the dropped pairs are each cut into `n_strata` equal-count strata by
reliability rank (ties broken by the pair key), so every stratum is wholly kept or wholly dropped and the
kept-pair noise rate is a combination of whole strata. Allocation is proportional to stratum size
(largest remainder, at least one per stratum while any are left), which makes the sample close to
self-weighting. Within a stratum the sample is a simple random sample without replacement: sampling
again into the same database draws from the pairs not yet sampled, and the union stays a simple random
sample of the stratum, so π = n_h / N_h holds for every item after any number of rounds. Deterministic
for (run, n, n_strata, seed, earlier rounds).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import ExifTags, Image

from miners.run_config import RunConfig, read_run_config
from qa.audit.db import AuditDB, AuditError, utc_now
from storage.plan import image_root
from storage.reader import read_pairs
from storage.shards import load_run_plan

AUDIT_COLUMNS = [
    "sample_id",
    "image_id",
    "person_id",
    "sentence_index",
    "sentence",
    "char_start",
    "char_end",
    "region_id",
    "region_label",
    "bbox_xyxy",
    "mask_rle",
    "reliability",
    "kept",
]


@dataclass(frozen=True)
class RunSource:
    """What an audit needs to know of a run: its id, pairs, image root and manifest."""

    pairs_dir: Path
    run_id: str
    image_root: Path | None
    manifest_path: Path | None
    keep_threshold: float
    config: RunConfig


def run_source(pairs_dir: str | Path) -> RunSource:
    plan = load_run_plan(pairs_dir)
    manifest = Path(plan.manifest_path)
    root = image_root(plan, manifest)
    config = read_run_config(pairs_dir)
    return RunSource(
        pairs_dir=Path(pairs_dir),
        run_id=plan.run_id,
        image_root=Path(root).resolve() if root else None,
        manifest_path=manifest if manifest.is_file() else None,
        keep_threshold=float(config.rsm.match.keep_threshold),
        config=config,
    )


def pair_keys(pairs: pa.Table) -> list[tuple[str, int, int]]:
    cols = pairs.select(["sample_id", "sentence_index", "region_id"]).to_pydict()
    return list(zip(cols["sample_id"], cols["sentence_index"], cols["region_id"], strict=True))


def assign_strata(reliability: np.ndarray, kept: np.ndarray, keys: list, n_strata: int) -> np.ndarray:
    """Stratum per pair: dropped pairs get 0..n_strata-1 and kept pairs n_strata..2·n_strata-1, each
    group cut into equal-count strata by (reliability, key) rank; lower stratum, lower reliability."""
    stratum = np.empty(len(keys), dtype=np.int64)
    for group, offset in ((False, 0), (True, n_strata)):
        idx = np.flatnonzero(kept == group)
        if idx.size == 0:
            continue
        order = sorted(idx.tolist(), key=lambda i: (float(reliability[i]), keys[i]))
        k = min(n_strata, len(order))
        for s, chunk in enumerate(np.array_split(np.asarray(order), k)):
            stratum[chunk] = offset + s
    return stratum


def allocate(n: int, available: dict[int, int], population: dict[int, int]) -> dict[int, int]:
    """`n` draws over strata in proportion to their population, capped by what each has left;
    at least one per stratum with pairs left while `n` allows (largest remainder rounding)."""
    total = sum(population[h] for h in available if available[h] > 0)
    n = min(n, sum(available.values()))
    out = dict.fromkeys(available, 0)
    while n > 0 and total > 0:
        open_ = [h for h in available if available[h] - out[h] > 0]
        if not open_:
            break
        weight = sum(population[h] for h in open_)
        quota = {h: n * population[h] / weight for h in open_}
        share = {h: min(int(quota[h]), available[h] - out[h]) for h in open_}
        rest = n - sum(share.values())
        for h in sorted(open_, key=lambda h: (-(quota[h] - int(quota[h])), h)):
            if rest == 0:
                break
            if available[h] - out[h] - share[h] > 0:
                share[h] += 1
                rest -= 1
        if sum(share.values()) == 0:  # n smaller than the open strata: one each, largest first
            for h in sorted(open_, key=lambda h: (-population[h], h))[:n]:
                share[h] = 1
        for h in open_:
            out[h] += share[h]
        n -= sum(share.values())
    return out


def image_size(root: str | Path | None, image_path: str) -> tuple[int | None, int | None]:
    """(width, height) after EXIF transpose, the frame boxes are in; (None, None) when unreadable."""
    if root is None:
        return None, None
    from miners.images import ImageLoadError, contained_path

    try:
        with Image.open(contained_path(root, image_path)) as im:
            width, height = im.size
            # Boxes are in pixels after EXIF transpose: orientations 5-8 turn the image a quarter
            if im.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8):
                width, height = height, width
            return width, height
    except (ImageLoadError, OSError, ValueError):
        return None, None


def _captions(manifest_path: Path | None, sample_ids: set[str]) -> dict[str, str]:
    if manifest_path is None:
        return {}
    table = pq.read_table(manifest_path, columns=["sample_id", "caption"])
    return {s: c for s, c in zip(*table.to_pydict().values(), strict=True) if s in sample_ids}


def sample_pairs(
    pairs_dir: str | Path, db_path: str | Path, n: int, n_strata: int = 5, seed: int = 0
) -> dict:
    """Add `n` new pairs of run `pairs_dir` to the audit database `db_path` (created when missing);
    returns a summary {run_id, added, items, strata: [...]}."""
    if n < 1:
        raise AuditError(f"--n must be at least 1, got {n}")
    if n_strata < 1:
        raise AuditError(f"--strata must be at least 1, got {n_strata}")
    src = run_source(pairs_dir)
    pairs = read_pairs(pairs_dir, columns=AUDIT_COLUMNS)
    if pairs.num_rows == 0:
        raise AuditError(f"run {src.run_id} in {pairs_dir} holds no pairs to audit")
    keys = pair_keys(pairs)
    reliability = pairs["reliability"].to_numpy().astype(np.float64)
    kept = pairs["kept"].to_numpy(zero_copy_only=False).astype(bool)

    with AuditDB(db_path, create=True) as db:
        db.check_run(src.run_id, pairs_dir)
        meta = db.meta()
        if "n_strata" in meta and int(meta["n_strata"]) != n_strata:
            raise AuditError(
                f"{db_path} was sampled with --strata {meta['n_strata']}; sample again with the same "
                f"--strata (or use a new --db)"
            )
        stratum = assign_strata(reliability, kept, keys, n_strata)
        population = {int(h): int((stratum == h).sum()) for h in np.unique(stratum)}
        known = {s["stratum"]: s for s in db.strata()}
        changed = [h for h, s in known.items() if population.get(h) != s["n_population"]]
        if changed:
            raise AuditError(f"{db_path}: strata {changed} no longer match run {src.run_id}'s pairs")
        done = db.sampled_keys()
        taken = np.array([k in done for k in keys], dtype=bool)
        available = {h: int(((stratum == h) & ~taken).sum()) for h in population}
        quota = allocate(n, available, population)
        round_ = int(meta.get("sampling_rounds", "0"))
        # One generator per (seed, round): a second round is as deterministic as the first.
        rng = np.random.default_rng([seed, round_])
        chosen: list[int] = []
        for h in sorted(population):
            pool = np.flatnonzero((stratum == h) & ~taken)
            if quota[h]:
                chosen.extend(rng.choice(pool, size=quota[h], replace=False).tolist())
        order = rng.permutation(len(chosen))
        cols = pairs.take(np.asarray(sorted(chosen), dtype=np.int64)).to_pydict() if chosen else {}
        captions = _captions(src.manifest_path, set(cols.get("sample_id", [])))
        by_row = sorted(chosen)
        rows = []
        for j, i in enumerate(by_row):
            sid = cols["sample_id"][j]
            width, height = image_size(src.image_root, cols["image_id"][j])
            rows.append(
                (
                    sid,
                    cols["sentence_index"][j],
                    cols["region_id"][j],
                    cols["image_id"][j],
                    cols["person_id"][j],
                    captions.get(sid, cols["sentence"][j]),
                    cols["sentence"][j],
                    cols["char_start"][j] if sid in captions else 0,
                    cols["char_end"][j] if sid in captions else len(cols["sentence"][j]),
                    json.dumps([float(v) for v in cols["bbox_xyxy"][j]]),
                    cols["mask_rle"][j],
                    cols["region_label"][j],
                    width,
                    height,
                    int(stratum[i]),
                    0.0,  # set below, once the stratum's n_h is known
                    float(reliability[i]),
                    int(kept[i]),
                    round_ + float(order[j]) / max(1, len(chosen)),
                    round_,
                )
            )
        with db.transaction() as c:
            for h, n_pop in population.items():
                lo = float(reliability[stratum == h].min())
                hi = float(reliability[stratum == h].max())
                c.execute(
                    "INSERT INTO strata (stratum, kept, rel_low, rel_high, n_population, n_sampled) "
                    "VALUES (?, ?, ?, ?, ?, 0) ON CONFLICT (stratum) DO NOTHING",
                    (h, int(h >= n_strata), lo, hi, n_pop),
                )
            c.executemany(
                "INSERT INTO items (sample_id, sentence_index, region_id, image_path, person_id, caption, "
                "sentence, char_start, char_end, bbox_xyxy, mask_rle, region_label, image_width, "
                "image_height, stratum, inclusion_prob, reliability, kept, queue_order, sampling_round) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            c.execute(
                "UPDATE strata SET n_sampled = (SELECT COUNT(*) FROM items i WHERE i.stratum = strata.stratum)"
            )
            c.execute(
                "UPDATE items SET inclusion_prob = (SELECT CAST(n_sampled AS REAL) / n_population FROM strata s "
                "WHERE s.stratum = items.stratum)"
            )
            values = {
                "run_id": src.run_id,
                "pairs_dir": str(Path(pairs_dir).resolve()),
                "image_root": str(src.image_root) if src.image_root else "",
                "manifest_path": str(src.manifest_path) if src.manifest_path else "",
                "keep_threshold": repr(src.keep_threshold),
                "n_strata": str(n_strata),
                "sampling_rounds": str(round_ + 1),
                f"sampled_round_{round_}": json.dumps(
                    {"n": n, "seed": seed, "added": len(rows), "at": utc_now()}
                ),
            }
            c.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", list(values.items()))
        return {"run_id": src.run_id, "added": len(rows), "items": db.n_items(), "strata": db.strata()}
