"""Deterministic shard planning: a manifest + a config → a `RunPlan` of image-grouped shards.

Consumes a manifest Parquet (`storage.schemas.MANIFEST_SCHEMA`) and a JSON-able config; produces a
`RunPlan` whose shard ids, row ranges and run_id depend only on the manifest's content, the config and
the shard size, so a re-run finds the same shards. `storage.shards` commits them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from storage.errors import ShardStoreError
from storage.schemas import MANIFEST_SCHEMA, check_version

PLAN_VERSION = 1  # bump when the grouping rule changes: it is part of run_id
MAX_SHARDS = 100_000  # ids are 5-digit zero-padded so that file names sort
SORT_KEYS = [("image_id", "ascending"), ("caption_index", "ascending"), ("sample_id", "ascending")]


@dataclass(frozen=True)
class ShardSpec:
    """One shard: rows [row_start, row_stop) of the manifest sorted by (image_id, caption_index, sample_id)."""

    shard_id: int
    row_start: int
    row_stop: int
    n_rows: int
    n_images: int
    first_sample_id: str
    last_sample_id: str
    sample_ids_sha256: str  # of the shard's sample ids, sorted: commit checks a status table against it


@dataclass(frozen=True)
class RunPlan:
    """Deterministic shards of one manifest under one config; JSON round-trips via to_dict/from_dict."""

    manifest_path: str  # absolute: Ray workers do not share the driver's working directory
    manifest_fingerprint: str  # sha256 of the manifest content in sorted row order (not of its bytes)
    # sha256 of the canonical JSON of `config` (not the pairs column config_fingerprint)
    run_config_sha256: str
    shard_size: int
    run_id: str
    n_rows: int
    config: dict[str, Any]
    shards: list[ShardSpec] = field(default_factory=list)
    manifest_root: str | None = None  # `rsm.root` of the manifest, for information
    plan_version: int = PLAN_VERSION

    def shard(self, shard_id: int) -> ShardSpec:
        if not 0 <= shard_id < len(self.shards):
            raise ValueError(f"run {self.run_id} has shards 0..{len(self.shards) - 1}, not {shard_id}")
        return self.shards[shard_id]

    def rows_for(self, shard_id: int, sorted_manifest: pa.Table | None = None) -> pa.Table:
        return load_shard_rows(self, shard_id, sorted_manifest)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunPlan:
        fields = dict(data)
        fields["shards"] = [ShardSpec(**s) for s in data["shards"]]
        return cls(**fields)


def canonical_json(value: Any, what: str = "value") -> str:
    """Sorted-key, compact JSON: the form fingerprints are taken of."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"{what} must be JSON-serialisable (str/int/float/bool/None/list/dict): {exc}"
        ) from exc


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def sample_ids_digest(sample_ids: list[str]) -> str:
    return _sha256_text(json.dumps(sorted(sample_ids), ensure_ascii=False))


def image_root(plan: RunPlan, manifest_path: str | Path | None) -> str | None:
    """The dataset root a run's image paths are relative to: the manifest's `rsm.root` when the manifest
    is readable (it may have been re-imported elsewhere), else what the plan recorded."""
    root = plan.manifest_root
    if manifest_path is not None and Path(manifest_path).is_file():
        meta = pq.read_schema(manifest_path).metadata or {}
        root = meta.get(b"rsm.root", (root or "").encode()).decode() or root
    return root or None


def read_manifest_table(manifest_path: str | Path) -> pa.Table:
    """The manifest as MANIFEST_SCHEMA (file order), keeping its metadata (rsm.root, version)."""
    table = pq.read_table(manifest_path)
    check_version("manifest", table.schema, str(manifest_path))
    missing = [n for n in MANIFEST_SCHEMA.names if n not in table.column_names]
    if missing:
        raise ValueError(f"{manifest_path}: manifest lacks columns {missing}")
    return table.select(MANIFEST_SCHEMA.names).cast(MANIFEST_SCHEMA.with_metadata(table.schema.metadata))


def _sorted_manifest(table: pa.Table) -> pa.Table:
    # sample_id is unique, so the sort is a total order: the same rows always give the same shards
    return table.take(pc.sort_indices(table, sort_keys=SORT_KEYS))


def read_sorted_manifest(manifest_path: str | Path) -> pa.Table:
    """The manifest in plan order (SORT_KEYS), read and sorted once: what `load_shard_rows` slices."""
    return _sorted_manifest(read_manifest_table(manifest_path))


def _content_fingerprint(sorted_table: pa.Table) -> str:
    # Hash values, not file bytes: a re-import that writes identical rows (another pyarrow, other
    # row order or compression) is the same manifest, so a re-run resumes instead of conflicting.
    digest = hashlib.sha256(b"rsm-manifest-content-v1\n")
    for name in MANIFEST_SCHEMA.names:
        digest.update(name.encode() + b"\n")
        column = sorted_table.column(name)
        for start in range(0, len(column), 65_536):
            values = column.slice(start, 65_536).to_pylist()
            digest.update(json.dumps(values, ensure_ascii=False).encode() + b"\n")
    return digest.hexdigest()


def plan_shards(manifest_path: str | Path, shard_size: int, config: dict[str, Any]) -> RunPlan:
    """Split the manifest into shards of at most `shard_size` rows, never splitting an image.

    Rows are sorted by (image_id, caption_index, sample_id) and cut greedily at image boundaries; an
    image with more captions than `shard_size` gets a shard of its own. Same manifest content + config
    + shard_size -> same run_id and shards.
    """
    if not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive int, got {shard_size!r}")
    config_text = canonical_json(config, "config")
    table = read_sorted_manifest(manifest_path)
    sample_ids: list[str] = table.column("sample_id").to_pylist()
    if len(set(sample_ids)) != len(sample_ids):
        dup = next(sid for sid, n in Counter(sample_ids).items() if n > 1)
        raise ValueError(f"{manifest_path}: sample_id {dup!r} appears more than once")

    # Cut at image boundaries
    image_ids: list[str] = table.column("image_id").to_pylist()
    n = len(image_ids)
    bounds = [0, *[i for i in range(1, n) if image_ids[i] != image_ids[i - 1]], n] if n else [0]
    cuts: list[tuple[int, int, int]] = []  # (start, stop, n_images)
    start, n_images = 0, 0
    for group_start, group_stop in zip(bounds, bounds[1:], strict=False):
        if group_start > start and group_stop - start > shard_size:
            cuts.append((start, group_start, n_images))
            start, n_images = group_start, 0
        n_images += 1
    if n > start:
        cuts.append((start, n, n_images))
    if len(cuts) > MAX_SHARDS:
        raise ValueError(
            f"{len(cuts)} shards exceed the 5-digit id space; raise shard_size above {shard_size}"
        )

    shards = [
        ShardSpec(
            shard_id=k,
            row_start=a,
            row_stop=b,
            n_rows=b - a,
            n_images=m,
            first_sample_id=sample_ids[a],
            last_sample_id=sample_ids[b - 1],
            sample_ids_sha256=sample_ids_digest(sample_ids[a:b]),
        )
        for k, (a, b, m) in enumerate(cuts)
    ]
    manifest_fp = _content_fingerprint(table)
    config_fp = _sha256_text(config_text)
    run_key = canonical_json(
        {"plan": PLAN_VERSION, "manifest": manifest_fp, "config": config_fp, "shard_size": shard_size}
    )
    root = (table.schema.metadata or {}).get(b"rsm.root")
    return RunPlan(
        manifest_path=str(Path(manifest_path).resolve()),
        manifest_fingerprint=manifest_fp,
        run_config_sha256=config_fp,
        shard_size=shard_size,
        run_id=_sha256_text(run_key)[:16],
        n_rows=n,
        config=json.loads(config_text),
        shards=shards,
        manifest_root=root.decode() if root is not None else None,
    )


def load_shard_rows(plan: RunPlan, shard_id: int, sorted_manifest: pa.Table | None = None) -> pa.Table:
    """The manifest rows of one shard (with the manifest's metadata, e.g. rsm.root).

    Pass `sorted_manifest` (from `read_sorted_manifest`) to slice many shards out of one read and one
    sort: the slice is then O(shard), not a re-sort of the whole manifest per shard (quadratic in
    manifest size over a run). The sample-id digest check below also catches a table passed unsorted.
    """
    spec = plan.shard(shard_id)
    table = sorted_manifest if sorted_manifest is not None else read_sorted_manifest(plan.manifest_path)
    rows = table.slice(spec.row_start, spec.n_rows)
    ids = rows.column("sample_id").to_pylist()
    if len(ids) != spec.n_rows or sample_ids_digest(ids) != spec.sample_ids_sha256:
        raise ShardStoreError(
            f"{plan.manifest_path}: rows of shard {shard_id} differ from the plan of run {plan.run_id} "
            "(the manifest changed after planning); plan again"
        )
    return rows
