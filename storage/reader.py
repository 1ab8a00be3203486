"""Read a committed run: the run manifest, its pairs/status shards, and a verifier.

Consumes an output folder written by `storage.shards` (OUT/_SUCCESS, OUT/_run.json, the shard files
and their stats files); produces Arrow tables, polars LazyFrames and lists of problems. Files come
from the run manifest only, never from a glob, so a stray or half-published file is never read. An
unfinished run is readable only with `allow_partial=True`, which lists the shards that have a stats
file (committed ones). Every listed file is checked against the run manifest before it is read: its size
always, its sha256 by `read_*` (`check_hash=True`, the default; a flipped bit in a data page would
otherwise decode silently), so a truncated, changed or missing shard file is a ShardCorruptError
naming it. `scan_*` check sizes only (hashing would read every byte before the lazy scan); run
`verify_run` for a full check.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from storage.schemas import check_version, with_version
from storage.shards import (
    RUN_FILE,
    SUCCESS_FILE,
    ShardCorruptError,
    ShardStoreError,
    build_run_manifest,
    check_file,
    committed_records,
    load_run_plan,
    not_a_run_message,
)


class RunNotFinalizedError(ShardStoreError):
    """OUT/_SUCCESS is missing and the caller did not ask for a partial read."""


def read_run_manifest(out_dir: str | Path, allow_partial: bool = False) -> dict[str, Any]:
    """OUT/_SUCCESS as a dict; with `allow_partial`, an unfinished run's committed shards instead
    (same layout, "finalized": False)."""
    out = Path(out_dir)
    success = out / SUCCESS_FILE
    if success.is_file():
        return json.loads(success.read_text())
    if not allow_partial:
        if not (out / RUN_FILE).is_file():
            raise RunNotFinalizedError(not_a_run_message(out))
        hint = f"{out / RUN_FILE} exists, so shards may be partly committed; pass allow_partial=True to read them"
        raise RunNotFinalizedError(f"run not finalized: {success} is missing ({hint})")
    plan = load_run_plan(out)
    return build_run_manifest(plan, committed_records(out, plan), finalized=False)


def _checked(out_dir: str | Path, entry: dict[str, Any], check_hash: bool) -> Path:
    """The listed file's path, after checking it against its run-manifest entry."""
    path = Path(out_dir) / entry["file"]
    problem = check_file(path, entry["sha256"], entry["size_bytes"], check_hash)
    if problem:
        raise ShardCorruptError(f"{problem}; the run manifest {Path(out_dir) / SUCCESS_FILE} lists it")
    return path


def _files(out_dir: str | Path, kind: str, allow_partial: bool, check_hash: bool = False) -> list[Path]:
    manifest = read_run_manifest(out_dir, allow_partial)
    return [_checked(out_dir, shard[kind], check_hash) for shard in manifest["shards"]]


def pair_files(out_dir: str | Path, allow_partial: bool = False) -> list[Path]:
    """Paths of the pairs shards listed in the run manifest, in shard order."""
    return _files(out_dir, "pairs", allow_partial)


def status_files(out_dir: str | Path, allow_partial: bool = False) -> list[Path]:
    """Paths of the status shards listed in the run manifest, in shard order."""
    return _files(out_dir, "status", allow_partial)


def _read(
    out_dir: str | Path, kind: str, columns: list[str] | None, allow_partial: bool, check_hash: bool
) -> pa.Table:
    manifest = read_run_manifest(out_dir, allow_partial)
    # One schema for the whole table: per-file metadata (rsm.shard_id) would not hold for all rows
    schema = with_version(kind, {"rsm.run_id": manifest["run_id"]})
    if columns is not None:
        unknown = [c for c in columns if c not in schema.names]
        if unknown:
            raise ValueError(f"{kind} has no columns {unknown}; it has {schema.names}")
        schema = pa.schema([schema.field(c) for c in columns], metadata=schema.metadata)
    tables = []
    for shard in manifest["shards"]:
        path = _checked(out_dir, shard[kind], check_hash)
        parquet = pq.ParquetFile(path)
        check_version(kind, parquet.schema_arrow, str(path))
        tables.append(parquet.read(columns=columns).replace_schema_metadata(schema.metadata))
    return pa.concat_tables(tables) if tables else schema.empty_table()


def read_pairs(
    out_dir: str | Path,
    columns: list[str] | None = None,
    allow_partial: bool = False,
    check_hash: bool = True,
) -> pa.Table:
    """All pairs of the run (PAIRS_SCHEMA, or the given columns), shard order."""
    return _read(out_dir, "pairs", columns, allow_partial, check_hash)


def read_status(
    out_dir: str | Path,
    columns: list[str] | None = None,
    allow_partial: bool = False,
    check_hash: bool = True,
) -> pa.Table:
    """All status rows of the run (STATUS_SCHEMA, or the given columns): one per manifest row."""
    return _read(out_dir, "status", columns, allow_partial, check_hash)


def _scan(out_dir: str | Path, kind: str, allow_partial: bool) -> pl.LazyFrame:
    paths = _files(out_dir, kind, allow_partial)
    for path in paths:
        check_version(kind, pq.read_schema(path), str(path))
    if not paths:
        return pl.from_arrow(with_version(kind).empty_table()).lazy()
    return pl.scan_parquet([str(p) for p in paths])


def scan_pairs(out_dir: str | Path, allow_partial: bool = False) -> pl.LazyFrame:
    """A polars LazyFrame over the listed pairs shards (schema versions checked up front)."""
    return _scan(out_dir, "pairs", allow_partial)


def scan_status(out_dir: str | Path, allow_partial: bool = False) -> pl.LazyFrame:
    """A polars LazyFrame over the listed status shards (schema versions checked up front)."""
    return _scan(out_dir, "status", allow_partial)


def verify_run(out_dir: str | Path, check_hashes: bool = True, allow_partial: bool = False) -> list[str]:
    """Problems with a run folder, [] when sound: missing files, size/sha256 mismatches, row counts,
    schema versions, run ids, and files in OUT that the run manifest does not list (hidden
    entries such as .staging/ and .lock are the protocol's own and are skipped)."""
    out = Path(out_dir)
    try:
        manifest = read_run_manifest(out, allow_partial)
    except ShardStoreError as exc:
        return [str(exc)]
    problems: list[str] = []
    listed = {RUN_FILE, SUCCESS_FILE} if manifest["finalized"] else {RUN_FILE}
    try:
        if load_run_plan(out).run_id != manifest["run_id"]:
            problems.append(f"{out / RUN_FILE}: names another run than {manifest['run_id']}")
    except (ShardStoreError, KeyError, TypeError) as exc:
        problems.append(f"{out / RUN_FILE}: {exc}")

    for shard in manifest["shards"]:
        listed.add(shard["stats_file"])
        if not (out / shard["stats_file"]).is_file():
            problems.append(f"{out / shard['stats_file']}: missing")
        for kind in ("pairs", "status"):
            entry = shard[kind]
            path = out / entry["file"]
            listed.add(entry["file"])
            problem = check_file(path, entry["sha256"], entry["size_bytes"], check_hashes)
            if problem:
                problems.append(problem)
                continue
            try:
                metadata = pq.read_metadata(path)
                check_version(kind, pq.read_schema(path), str(path))
            except (pa.ArrowException, OSError, ValueError) as exc:
                problems.append(f"{path}: unreadable Parquet footer or schema ({str(exc).strip()})")
                continue
            if metadata.num_rows != entry["n_rows"]:
                problems.append(f"{path}: {metadata.num_rows} rows, the run manifest says {entry['n_rows']}")
            run_id = (metadata.metadata or {}).get(b"rsm.run_id", b"").decode()
            if run_id != manifest["run_id"]:
                problems.append(f"{path}: written by run {run_id or 'none'!r}, not {manifest['run_id']}")

    for path in sorted(out.iterdir()):
        if not path.name.startswith(".") and path.name not in listed:
            problems.append(f"{path}: not listed in the run manifest (stray file)")
    return problems
