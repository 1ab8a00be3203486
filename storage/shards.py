"""Exactly-once Parquet shards: the commit protocol (planning lives in `storage.plan`).

Consumes a manifest Parquet (`storage.schemas.MANIFEST_SCHEMA`), a JSON-able config and, per shard,
the (pairs, status) Arrow tables a worker produced for that shard's manifest rows. Produces a
`RunPlan` and the output folder below; `storage.reader` reads it back.

Output folder (a contract; NNNNN = 5-digit zero-padded shard id):
    OUT/_run.json              the plan + resolved config, written by `begin_run`
    OUT/pairs-NNNNN.parquet    published atomically and never overwritten once committed
    OUT/status-NNNNN.parquet
    OUT/NNNNN.stats.json       written LAST: its presence means shard NNNNN is committed
    OUT/_SUCCESS               the run manifest (JSON): every shard's files, row counts and sha256
    OUT/.staging/              hidden: attempts write here first, so `OUT/*.parquet` never sees a partial file
    OUT/.lock                  flock'd while publishing or changing run-level files

Exactly-once: Ray may re-run a shard, two attempts may race, a worker may die mid-write, a user may
re-run the job. Every attempt stages under a unique name, then publishes under the `.lock` with a
no-clobber hard link; the first attempt to publish its stats file wins and later ones are absorbed
("already committed"). Parquet files published without a stats file belong to an attempt that died
between publish and stats; they are listed nowhere, so they are treated as uncommitted and replaced
under the lock (no content comparison: the replacing attempt's content is what gets recorded).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import json
import os
import socket
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from storage.errors import (
    RunConflictError,
    RunIncompleteError,
    ShardCorruptError,
    ShardStoreError,
    ShardValidationError,
)
from storage.plan import (
    RunPlan,
    canonical_json,
    load_shard_rows,
    sample_ids_digest,
)
from storage.schemas import (
    MANIFEST_VERSION,
    PAIRS_SCHEMA,
    PAIRS_VERSION,
    STATUS_SCHEMA,
    STATUS_VERSION,
    with_version,
)

LAYOUT_VERSION = 1
RUN_FILE = "_run.json"
SUCCESS_FILE = "_SUCCESS"
STAGING_DIR = ".staging"
LOCK_FILE = ".lock"
PAIR_KEY = ("sample_id", "sentence_index", "region_id")
SCHEMA_VERSIONS = {"manifest": MANIFEST_VERSION, "pairs": PAIRS_VERSION, "status": STATUS_VERSION}

COMMITTED = "committed"
REPLACED_ORPHANS = "committed (replaced files left by an attempt that died before its stats file)"
ALREADY_COMMITTED = "already committed"


def pairs_name(shard_id: int) -> str:
    return f"pairs-{shard_id:05d}.parquet"


def status_name(shard_id: int) -> str:
    return f"status-{shard_id:05d}.parquet"


def stats_name(shard_id: int) -> str:
    return f"{shard_id:05d}.stats.json"


# ---------------------------------------------------------------------------------------------- validation


def _conform(table: Any, name: str, shard_id: int) -> pa.Table:
    """`table` with exactly the columns of schema `name`, in order, cast to its types."""
    schema = {"pairs": PAIRS_SCHEMA, "status": STATUS_SCHEMA}[name]
    where = f"shard {shard_id} {name}"
    if not isinstance(table, pa.Table):
        raise ShardValidationError(f"{where}: expected a pyarrow.Table, got {type(table).__name__}")
    missing = [c for c in schema.names if c not in table.column_names]
    extra = [c for c in table.column_names if c not in schema.names]
    if missing or extra or len(set(table.column_names)) != table.num_columns:
        raise ShardValidationError(
            f"{where}: columns differ from the {name} schema (missing {missing}, unexpected {extra})"
        )
    table = table.select(schema.names)
    for f in schema:
        nulls = table.column(f.name).null_count
        if not f.nullable and nulls:
            mask = pc.is_null(table.column(f.name))
            first = table.filter(mask).column("sample_id")[0].as_py() if f.name != "sample_id" else None
            raise ShardValidationError(
                f"{where}: {nulls} null(s) in non-nullable {f.name!r} (e.g. {first!r})"
            )
    try:
        return table.cast(schema)
    except (pa.ArrowException, ValueError, TypeError) as exc:
        raise ShardValidationError(f"{where}: cannot cast to the {name} schema: {exc}") from exc


def _first_duplicate_key(table: pa.Table, keys: list[str]) -> dict[str, Any] | None:
    counts = table.group_by(keys).aggregate([([], "count_all")])
    dups = counts.filter(pc.greater(counts.column("count_all"), 1))
    return {k: dups.column(k)[0].as_py() for k in keys} if dups.num_rows else None


def validate_shard(
    plan: RunPlan, shard_id: int, pairs: pa.Table, status: pa.Table
) -> tuple[pa.Table, pa.Table]:
    """(pairs, status) conformed to their schemas, or ShardValidationError naming the offending row.

    status: exactly one row per manifest row of the shard. pairs: (sample_id, sentence_index, region_id)
    unique, and every sample_id one of the shard's.
    """
    spec = plan.shard(shard_id)
    pairs = _conform(pairs, "pairs", shard_id)
    status = _conform(status, "status", shard_id)

    # Status: one row per manifest row of the shard. The plan's ids are unique, so a digest match
    # rules duplicates out; they are looked for only to name one when it fails (a group-by per commit
    # saved: the driver's per-shard cost)
    status_ids = status.column("sample_id").to_pylist()
    if len(status_ids) != spec.n_rows or sample_ids_digest(status_ids) != spec.sample_ids_sha256:
        dup = _first_duplicate_key(status, ["sample_id"])
        if dup:
            raise ShardValidationError(
                f"shard {shard_id} status: sample_id {dup['sample_id']!r} has several rows"
            )
        raise ShardValidationError(_status_mismatch(plan, shard_id, set(status_ids)))

    # Pairs: unique keys, samples of this shard only
    dup = _first_duplicate_key(pairs, list(PAIR_KEY))
    if dup:
        raise ShardValidationError(f"shard {shard_id} pairs: key {dup} appears more than once")
    foreign = pc.invert(pc.is_in(pairs.column("sample_id"), value_set=status.column("sample_id")))
    if pairs.num_rows and pc.any(foreign).as_py():
        sid = pairs.filter(foreign).column("sample_id")[0].as_py()
        raise ShardValidationError(f"shard {shard_id} pairs: sample_id {sid!r} is not a row of this shard")
    return pairs, status


def _status_mismatch(plan: RunPlan, shard_id: int, got: set[str]) -> str:
    spec = plan.shard(shard_id)
    head = f"shard {shard_id} status: expected one row per manifest row ({spec.n_rows}), got {len(got)}"
    try:
        want = set(load_shard_rows(plan, shard_id).column("sample_id").to_pylist())
    except (OSError, ValueError, ShardStoreError):
        return head + " or other sample_ids (manifest unreadable for details)"
    missing, extra = sorted(want - got), sorted(got - want)
    return f"{head}; missing {len(missing)} {missing[:3]}, not in shard {len(extra)} {extra[:3]}"


# ---------------------------------------------------------------------------------------------- file plumbing


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_file(path: Path, sha256: str, size_bytes: int, check_hash: bool = True) -> str | None:
    """A problem with a published file (missing, size or hash mismatch), or None if it checks out."""
    if not path.is_file():
        return f"{path}: missing"
    size = path.stat().st_size
    if size != size_bytes:
        return f"{path}: size {size} bytes, expected {size_bytes}"
    if check_hash and sha256_file(path) != sha256:
        return f"{path}: sha256 differs from the recorded one (file changed or corrupted)"
    return None


@contextmanager
def _locked(out: Path) -> Iterator[None]:
    """Exclusive flock on OUT/.lock: serialises publishing across processes on this filesystem."""
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock, also when the process dies


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _stage(out: Path, name: str, data: bytes) -> Path:
    """Write `data` durably to OUT/.staging/name (a name unique to this attempt)."""
    path = out / STAGING_DIR / name
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return path


def publish_no_clobber(src: Path, dst: Path) -> None:
    """Make staged `src` visible as `dst` atomically; FileExistsError if `dst` already exists.

    link(2) creates the new name atomically and fails with EEXIST when it is taken, so an attempt can
    never overwrite a file another attempt published, and there is no window between an existence
    check and the move. rename(2) is atomic too but silently replaces an existing target, and Linux's
    renameat2(RENAME_NOREPLACE) is not exposed by Python. Where hard links are unsupported (some FUSE
    or SMB mounts) we fall back to exists-check + rename, which is no-clobber only because every
    caller holds the OUT/.lock flock.
    """
    try:
        os.link(src, dst)
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK):
            raise
        if dst.exists():
            raise FileExistsError(errno.EEXIST, "target exists", str(dst)) from exc
        os.rename(src, dst)
        return
    os.unlink(src)


def _clean_staging(out: Path, shard_id: int | None = None) -> None:
    """Remove staging files of one shard (or all). Call under the lock, once the shard is committed:
    a live attempt that lost the race checks the stats file under the lock before touching its own."""
    pattern = f"*-{shard_id:05d}.*.tmp" if shard_id is not None else "*.tmp"
    for path in (out / STAGING_DIR).glob(pattern):
        path.unlink(missing_ok=True)


def _attempt_token() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def _load_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ShardStoreError(f"{path}: unreadable JSON ({exc})") from exc


# ---------------------------------------------------------------------------------------------- run lifecycle


def not_a_run_message(out_dir: str | Path) -> str:
    """Why `out_dir` cannot be read as a mining run, in the user's terms (it is missing, a file, or a
    folder without OUT/_run.json), ending in what to pass instead."""
    out = Path(out_dir)
    fix = "pass the --out folder of a `python -m flows.mine_rsm` run"
    if not out.exists():
        return f"{out} does not exist: {fix}"
    if not out.is_dir():
        return f"{out} is a file, not a mining run folder: {fix}"
    return f"{out} is not a mining run folder (it has no {RUN_FILE}): {fix}"


def load_run_plan(out_dir: str | Path) -> RunPlan:
    """The plan stored in OUT/_run.json by begin_run."""
    path = Path(out_dir) / RUN_FILE
    if not path.is_file():
        raise ShardStoreError(not_a_run_message(out_dir))
    return RunPlan.from_dict(_load_json(path)["plan"])


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, sub in value.items():
            out.update(_flat(sub, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): value}


def config_changes(stored_config: dict[str, Any], new_config: dict[str, Any]) -> list[str]:
    """Each changed key of two run configs with its old and new value ("rsm.crop_mode 'box' -> 'mask'"),
    keys flattened with dots, sorted."""
    old, new = _flat(stored_config), _flat(new_config)
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k, "<unset>") != new.get(k, "<unset>"))
    return [f"{k} {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}" for k in keys]


def _conflicts(stored: RunPlan, plan: RunPlan) -> list[str]:
    changed = []
    if stored.manifest_fingerprint != plan.manifest_fingerprint:
        changed.append(
            f"the MANIFEST changed ({stored.manifest_path} sha256 {stored.manifest_fingerprint[:12]} -> "
            f"{plan.manifest_path} sha256 {plan.manifest_fingerprint[:12]})"
        )
    if stored.run_config_sha256 != plan.run_config_sha256:
        changed.append(f"the CONFIG changed ({'; '.join(config_changes(stored.config, plan.config))})")
    if stored.shard_size != plan.shard_size:
        changed.append(f"shard_size changed ({stored.shard_size} -> {plan.shard_size})")
    if not changed and stored.run_id != plan.run_id:
        changed.append(
            f"the planning rule changed (plan_version {stored.plan_version} -> {plan.plan_version})"
        )
    return changed


def begin_run(out_dir: str | Path, plan: RunPlan) -> list[int]:
    """Create OUT and its _run.json, or resume the same run; returns the shard ids still pending.

    RunConflictError if OUT holds another run (changed manifest, config or shard size): committed
    shards of two runs must never mix.
    """
    out = Path(out_dir)
    (out / STAGING_DIR).mkdir(parents=True, exist_ok=True)
    with _locked(out):
        run_path = out / RUN_FILE
        if run_path.exists():
            changed = _conflicts(load_run_plan(out), plan)
            if changed:
                raise RunConflictError(
                    f"{out} holds run {load_run_plan(out).run_id}, but {'; '.join(changed)}. Its committed "
                    f"shards would mix with this run's, so this is refused. To proceed, write to a new --out "
                    f"folder, or delete {out} to start over (its committed shards are lost)."
                )
        else:
            strays = sorted(p.name for p in out.iterdir() if p.suffix == ".parquet" or p.name == SUCCESS_FILE)
            if strays:
                raise RunConflictError(
                    f"{out} has no {RUN_FILE} but holds {strays[:5]}: use an empty --out folder"
                )
            record = {
                "layout_version": LAYOUT_VERSION,
                "created_at": _now(),
                "schema_versions": SCHEMA_VERSIONS,
            }
            record["plan"] = plan.to_dict()  # carries the resolved config
            staged = _stage(out, f"_run.{_attempt_token()}.tmp", json.dumps(record, indent=1).encode())
            publish_no_clobber(staged, run_path)
            _fsync_dir(out)
    return pending_shards(out, plan)


# run id of OUT/_run.json by (path, inode, mtime, size): every commit checks it, and parsing the whole
# plan (one entry per shard) each time made a run's commits quadratic in its shard count (40 ms a
# commit at 3,907 shards against 24 ms at 40). A rewritten or replaced file has another key.
_RUN_ID_CACHE: dict[tuple[str, int, int, int], str] = {}


def _stored_run_id(out: Path) -> str:
    path = out / RUN_FILE
    try:
        st = path.stat()
    except FileNotFoundError:
        return load_run_plan(out).run_id  # raises the "not a run folder" error
    key = (str(path.resolve()), st.st_ino, st.st_mtime_ns, st.st_size)
    if key not in _RUN_ID_CACHE:
        if len(_RUN_ID_CACHE) > 64:
            _RUN_ID_CACHE.clear()
        _RUN_ID_CACHE[key] = load_run_plan(out).run_id
    return _RUN_ID_CACHE[key]


def _require_run(out: Path, plan: RunPlan) -> None:
    stored = _stored_run_id(out)
    if stored != plan.run_id:
        raise RunConflictError(f"{out} holds run {stored}, not {plan.run_id}: call begin_run with this plan")


def read_committed(
    out_dir: str | Path, plan: RunPlan, shard_id: int, check_hash: bool = False
) -> dict | None:
    """The stats record of a committed shard, None if uncommitted; ShardCorruptError if its files are
    missing or changed (sizes always checked, sha256 when `check_hash`)."""
    out = Path(out_dir)
    path = out / stats_name(shard_id)
    if not path.is_file():
        return None
    record = _load_json(path)
    if record.get("run_id") != plan.run_id:
        raise ShardCorruptError(f"{path} belongs to run {record.get('run_id')}, not {plan.run_id}")
    problems = [
        check_file(out / record[kind]["file"], record[kind]["sha256"], record[kind]["size_bytes"], check_hash)
        for kind in ("pairs", "status")
    ]
    problems = [p for p in problems if p]
    if problems:
        raise ShardCorruptError(
            f"shard {shard_id} is committed but damaged: {'; '.join(problems)}. Restore the files, or delete "
            f"{stats_name(shard_id)}, {pairs_name(shard_id)} and {status_name(shard_id)} to mine it again."
        )
    return record


def pending_shards(out_dir: str | Path, plan: RunPlan, check_hash: bool = True) -> list[int]:
    """Shard ids with no stats file yet (resume skips the others). The committed ones are checked
    against their recorded sha256 first (ShardCorruptError naming the file): a resume must not build
    on a shard that changed since it was committed."""
    return [s.shard_id for s in plan.shards if read_committed(out_dir, plan, s.shard_id, check_hash) is None]


# ---------------------------------------------------------------------------------------------- commit


@dataclass(frozen=True)
class CommitResult:
    shard_id: int
    committed: bool  # False: another attempt committed this shard first; nothing was changed
    reason: str
    stats_path: Path


def _file_entry(name: str, data: bytes, n_rows: int) -> dict[str, Any]:
    return {
        "file": name,
        "n_rows": n_rows,
        "sha256": hashlib.sha256(data).hexdigest(),
        "size_bytes": len(data),
    }


def _publish_stats(out: Path, shard_id: int, record: dict[str, Any], token: str) -> None:
    staged = _stage(out, f"stats-{shard_id:05d}.{token}.tmp", json.dumps(record, indent=1).encode())
    publish_no_clobber(staged, out / stats_name(shard_id))


def commit_shard(
    out_dir: str | Path,
    plan: RunPlan,
    shard_id: int,
    pairs: pa.Table,
    status: pa.Table,
    stats: dict[str, Any] | None = None,
) -> CommitResult:
    """Validate, stage, publish pairs + status, then the stats file (the commit marker). Idempotent.

    `stats` (JSON-able: timings, counters) is stored under "worker" in the stats file. Raises
    ShardValidationError (nothing published) on bad tables, ShardCorruptError if the committed shard's
    files were changed.
    """
    t0 = time.perf_counter()
    out = Path(out_dir)
    spec = plan.shard(shard_id)
    _require_run(out, plan)
    worker_stats = json.loads(canonical_json(stats or {}, "stats"))
    pairs, status = validate_shard(plan, shard_id, pairs, status)
    stats_path = out / stats_name(shard_id)
    if read_committed(out, plan, shard_id, check_hash=True) is not None:
        return CommitResult(shard_id, False, ALREADY_COMMITTED, stats_path)

    # Stage both files under names unique to this attempt
    token = _attempt_token()
    (out / STAGING_DIR).mkdir(exist_ok=True)
    extra = {"rsm.run_id": plan.run_id, "rsm.shard_id": str(shard_id)}
    pairs_data = _parquet_bytes(pairs.cast(with_version("pairs", extra)))
    status_data = _parquet_bytes(status.cast(with_version("status", extra)))
    staged_pairs = _stage(out, f"pairs-{shard_id:05d}.{token}.tmp", pairs_data)
    staged_status = _stage(out, f"status-{shard_id:05d}.{token}.tmp", status_data)

    with _locked(out):
        # Another attempt committed while we were staging: absorb this one
        if stats_path.exists():
            _clean_staging(out, shard_id)
            return CommitResult(shard_id, False, ALREADY_COMMITTED, stats_path)
        # Files published without a stats file come from a dead attempt (a live one holds the lock
        # until its stats file is out); no manifest lists them, so they are replaced
        orphans = [p for p in (out / pairs_name(shard_id), out / status_name(shard_id)) if p.exists()]
        for path in orphans:
            path.unlink()
        publish_no_clobber(staged_pairs, out / pairs_name(shard_id))
        publish_no_clobber(staged_status, out / status_name(shard_id))
        _fsync_dir(out)
        counts = Counter(status.column("status").to_pylist())
        record = {
            "shard_id": shard_id,
            "run_id": plan.run_id,
            "committed_at": _now(),
            "attempt": token,
            "schema_versions": SCHEMA_VERSIONS,
            "n_manifest_rows": spec.n_rows,
            "first_sample_id": spec.first_sample_id,
            "last_sample_id": spec.last_sample_id,
            "pairs": _file_entry(pairs_name(shard_id), pairs_data, pairs.num_rows),
            "status": _file_entry(status_name(shard_id), status_data, status.num_rows),
            "n_kept_pairs": int(pc.sum(pairs.column("kept").cast(pa.int64())).as_py() or 0),
            "status_counts": dict(sorted(counts.items())),
            "commit_s": round(time.perf_counter() - t0, 4),
            "worker": worker_stats,
        }
        _publish_stats(out, shard_id, record, token)  # last: from here on the shard is committed
        _fsync_dir(out)
        _clean_staging(out, shard_id)
    return CommitResult(shard_id, True, REPLACED_ORPHANS if orphans else COMMITTED, stats_path)


# ---------------------------------------------------------------------------------------------- run manifest


def shard_entry(record: dict[str, Any]) -> dict[str, Any]:
    """A shard's line in the run manifest, from its stats record."""
    keys = ("shard_id", "n_manifest_rows", "pairs", "status", "n_kept_pairs", "status_counts")
    return {"stats_file": stats_name(record["shard_id"]), **{k: record[k] for k in keys}}


def build_run_manifest(plan: RunPlan, records: list[dict[str, Any]], finalized: bool) -> dict[str, Any]:
    """The run manifest dict (what _SUCCESS holds) for the given committed shards' stats records."""
    shards = [shard_entry(r) for r in sorted(records, key=lambda r: r["shard_id"])]
    status_counts: Counter[str] = Counter()
    for entry in shards:
        status_counts.update(entry["status_counts"])
    return {
        "layout_version": LAYOUT_VERSION,
        "run_id": plan.run_id,
        "finalized": finalized,
        "created_at": _now(),
        "manifest_path": plan.manifest_path,
        "manifest_fingerprint": plan.manifest_fingerprint,
        "run_config_sha256": plan.run_config_sha256,
        "shard_size": plan.shard_size,
        "schema_versions": SCHEMA_VERSIONS,
        "n_shards": len(plan.shards),
        "totals": {
            "manifest_rows": sum(s["n_manifest_rows"] for s in shards),
            "pairs_rows": sum(s["pairs"]["n_rows"] for s in shards),
            "status_rows": sum(s["status"]["n_rows"] for s in shards),
            "kept_pairs": sum(s["n_kept_pairs"] for s in shards),
        },
        "status_counts": dict(sorted(status_counts.items())),
        "shards": shards,
    }


def committed_records(out_dir: str | Path, plan: RunPlan, check_hash: bool = False) -> list[dict[str, Any]]:
    """Stats records of the committed shards, in shard order."""
    records = (read_committed(out_dir, plan, s.shard_id, check_hash) for s in plan.shards)
    return [r for r in records if r is not None]


def finalize_run(out_dir: str | Path, plan: RunPlan, check_hashes: bool = False) -> Path:
    """Write OUT/_SUCCESS once every shard is committed; idempotent. Returns its path.

    Sizes of all shard files are always checked, their sha256 with `check_hashes` (reads every byte).
    Refuses unlisted *.parquet files in OUT: a glob of OUT/*.parquet must equal the manifest's files.
    """
    out = Path(out_dir)
    _require_run(out, plan)
    records = committed_records(out, plan, check_hashes)
    if len(records) != len(plan.shards):
        done = {r["shard_id"] for r in records}
        pending = [s.shard_id for s in plan.shards if s.shard_id not in done]
        raise RunIncompleteError(
            f"{out}: {len(pending)} of {len(plan.shards)} shards are not committed yet "
            f"(e.g. {pending[:10]}); commit them before finalizing"
        )
    manifest = build_run_manifest(plan, records, finalized=True)
    listed = {e[k]["file"] for e in manifest["shards"] for k in ("pairs", "status")}
    strays = sorted(p.name for p in out.glob("*.parquet") if p.name not in listed)
    if strays:
        raise ShardStoreError(
            f"{out}: parquet files not part of run {plan.run_id}: {strays[:10]}; move them away"
        )

    success = out / SUCCESS_FILE
    with _locked(out):
        if success.exists():
            existing = _load_json(success)
            if existing.get("run_id") != plan.run_id or existing.get("shards") != manifest["shards"]:
                raise ShardStoreError(f"{success} exists and lists other shards than run {plan.run_id} has")
        else:
            staged = _stage(out, f"_SUCCESS.{_attempt_token()}.tmp", json.dumps(manifest, indent=1).encode())
            publish_no_clobber(staged, success)
            _fsync_dir(out)
        # Every shard is committed: whatever is left in staging is garbage of dead or losing attempts
        _clean_staging(out)
    return success
