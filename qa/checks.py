"""Data checks on a committed run folder: each check → pass/fail with counts and examples.

Consumes an output folder written by `storage.shards` (read through its run manifest, never a glob) and,
optionally, the dataset manifest the run was planned from; produces a `CheckReport`: one
`CheckResult` per check, plus the pairs/status files whose schema checks out (the ones the report may
scan together). Every figure is a polars aggregation over lazy scans, so memory does not grow with
the number of pairs. Checks:

- `run_finalized`: OUT/_SUCCESS exists (a partial read is reported as a failure).
- `file_integrity`: `storage.reader.verify_run` minus stray files: sizes, sha256, row counts, run ids.
- `orphan_files`: files in OUT that the run manifest does not list.
- `schema_version`: every listed file's Parquet metadata (`check_version`) and its column names/types.
- `non_null`: nulls in non-nullable columns of pairs and status.
- `value_ranges`: reliability and softmax_prob in [0, 1], bbox x0 < x1 and y0 < y1, 0 <= char_start < char_end.
- `duplicate_keys`: (sample_id, sentence_index, region_id) unique; `count` = rows beyond the first per key
  (within each shard, plus across shards for samples found in several).
- `status_accounting`: manifest rows == ok + rejected, every manifest sample_id exactly once in status.
- `pairs_vs_status`: status n_pairs / n_kept add up to the pairs shards; no pairs for rejected samples.
- `error_reasons`: status values counted; fails on a value that is neither "ok" nor a known error kind.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from storage.manifest import read_import_rejects
from storage.reader import read_run_manifest, verify_run
from storage.schemas import PAIRS_SCHEMA, STATUS_SCHEMA, ErrorKind, check_version
from storage.shards import PAIR_KEY, load_run_plan

N_EXAMPLES = 5
_HASH_SEED = 20_240_601
_STRAY = re.compile(r"not listed in the run manifest")


@dataclass
class CheckResult:
    name: str
    passed: bool
    summary: str  # one line for tables
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"passed": self.passed, "summary": self.summary, **self.details}


@dataclass
class CheckReport:
    results: list[CheckResult]
    pairs_files: list[tuple[int, Path]]  # (shard id, path) of listed pairs files with a sound schema
    status_files: list[tuple[int, Path]]
    run_manifest: dict[str, Any]

    def verdicts(self) -> dict[str, str]:
        return {r.name: "pass" if r.passed else "fail" for r in self.results}

    def details(self) -> dict[str, dict[str, Any]]:
        return {r.name: r.to_json() for r in self.results}

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)


def scan_shards(files: list[tuple[int, Path]], schema: pa.Schema) -> pl.LazyFrame:
    """A LazyFrame over `files` (all of `schema`) with an extra `_shard` (shard id, Int32) column."""
    if not files:
        empty = pl.from_arrow(schema.empty_table())
        return empty.lazy().with_columns(pl.lit(None, dtype=pl.Int32).alias("_shard"))
    # One scan per file with a literal shard id: no per-row file-path strings to carry
    scans = [
        pl.scan_parquet(str(p)).with_columns(pl.lit(sid, dtype=pl.Int32).alias("_shard")) for sid, p in files
    ]
    return pl.concat(scans, how="vertical")


def _collect(lf: pl.LazyFrame) -> pl.DataFrame:
    return lf.collect(engine="streaming")


def _schema_problem(path: Path, kind: str) -> str | None:
    expected = PAIRS_SCHEMA if kind == "pairs" else STATUS_SCHEMA
    try:
        schema = pq.read_schema(path)
        check_version(kind, schema, str(path))
    except (OSError, ValueError) as exc:
        return str(exc).strip()
    # Type equality ignores list item field names ("item" vs "element" after a Parquet round trip)
    if schema.names != expected.names or any(f.type != e.type for f, e in zip(schema, expected, strict=True)):
        diff = [
            f"{e.name}: {f.type if f else 'missing'} != {e.type}"
            for e, f in _pairs(expected, schema)
            if f is None or f.type != e.type
        ]
        return f"{path}: columns differ from the {kind} schema ({'; '.join(diff[:4]) or f'order {schema.names}'})"
    return None


def _pairs(expected: pa.Schema, got: pa.Schema) -> list[tuple[pa.Field, pa.Field | None]]:
    return [(e, got.field(e.name) if e.name in got.names else None) for e in expected]


def check_schemas(shards: list[dict], out: Path) -> tuple[CheckResult, dict[str, list[tuple[int, Path]]]]:
    problems, sound = [], {"pairs": [], "status": []}
    for shard in shards:
        for kind in ("pairs", "status"):
            path = out / shard[kind]["file"]
            problem = _schema_problem(path, kind) if path.is_file() else f"{path}: missing"
            if problem:
                problems.append(problem)
            else:
                sound[kind].append((shard["shard_id"], path))
    n_files = 2 * len(shards)
    result = CheckResult(
        "schema_version",
        not problems,
        f"{n_files - len(problems)}/{n_files} files have the expected schema and version",
        {"count": len(problems), "examples": problems[:N_EXAMPLES]},
    )
    return result, sound


def check_non_null(pairs: pl.LazyFrame, status: pl.LazyFrame) -> CheckResult:
    counts: dict[str, int] = {}
    for kind, lf, schema in (("pairs", pairs, PAIRS_SCHEMA), ("status", status, STATUS_SCHEMA)):
        cols = [f.name for f in schema if not f.nullable]
        row = _collect(lf.select(pl.col(cols).null_count())).to_dicts()[0]
        counts.update({f"{kind}.{c}": int(n) for c, n in row.items() if n})
    total = sum(counts.values())
    return CheckResult(
        "non_null",
        total == 0,
        f"{total} null(s) in non-nullable columns",
        {"count": total, "by_column": counts},
    )


def range_rules() -> dict[str, pl.Expr]:
    """Rule name → expression that is True for a *violating* row (nulls count as violations)."""
    rel, soft = pl.col("reliability"), pl.col("softmax_prob")
    box = pl.col("bbox_xyxy")
    return {
        "reliability_in_0_1": ~(rel.is_finite() & (rel >= 0) & (rel <= 1)).fill_null(False),
        "softmax_prob_in_0_1": ~(soft.is_finite() & (soft >= 0) & (soft <= 1)).fill_null(False),
        "bbox_x0_lt_x1": ~(box.arr.get(0) < box.arr.get(2)).fill_null(False),
        "bbox_y0_lt_y1": ~(box.arr.get(1) < box.arr.get(3)).fill_null(False),
        "char_span_ordered": ~(
            (pl.col("char_start") >= 0) & (pl.col("char_start") < pl.col("char_end"))
        ).fill_null(False),
    }


def check_value_ranges(pairs: pl.LazyFrame) -> CheckResult:
    rules = range_rules()
    row = _collect(pairs.select([expr.sum().alias(name) for name, expr in rules.items()])).to_dicts()[0]
    counts = {name: int(n or 0) for name, n in row.items()}
    examples = {}
    for name, n in counts.items():
        if n:
            ex = _collect(
                pairs.filter(rules[name]).select("sample_id", "sentence_index", "_shard").head(N_EXAMPLES)
            )
            examples[name] = ex.to_dicts()
    total = sum(counts.values())
    return CheckResult(
        "value_ranges",
        total == 0,
        f"{total} out-of-range value(s)"
        + (f" ({', '.join(k for k, v in counts.items() if v)})" if total else ""),
        {"count": total, "by_rule": counts, "examples": examples},
    )


def _repeated_keys(lf: pl.LazyFrame) -> pl.LazyFrame:
    return lf.group_by(list(PAIR_KEY)).agg(pl.len().alias("n")).filter(pl.col("n") > 1)


def check_duplicates(files: list[tuple[int, Path]]) -> CheckResult:
    """Exact count of repeated pair keys with memory bounded by one shard plus 12 bytes per sample.

    A key can repeat across shards only if its sample_id appears in two shards: those samples are
    found by a 64-bit hash of sample_id (compact; a collision only adds rows to the exact recount),
    and their keys are counted over all shards; every other key is counted within its shard."""
    keys = list(PAIR_KEY)
    empty = pl.DataFrame(
        schema={**pl.from_arrow(PAIRS_SCHEMA.empty_table()).select(keys).schema, "n": pl.UInt32}
    )
    within = [_collect(_repeated_keys(scan_shards([f], PAIRS_SCHEMA))) for f in files]
    dup = pl.concat([empty, *within], how="vertical_relaxed")
    pairs = scan_shards(files, PAIRS_SCHEMA)
    sample_hash = pl.col("sample_id").hash(_HASH_SEED)
    shared = _collect(
        pairs.select(sample_hash.alias("h"), "_shard")
        .unique()
        .group_by("h")
        .agg(pl.len().alias("n_shards"))
        .filter(pl.col("n_shards") > 1)
    )["h"]
    if shared.len():
        across = _collect(_repeated_keys(pairs.filter(sample_hash.is_in(shared.implode()))))
        dup = pl.concat([dup.filter(~sample_hash.is_in(shared.implode())), across], how="vertical_relaxed")
    n_keys, extra = dup.height, int((dup["n"] - 1).sum()) if dup.height else 0
    n_rows = int(_collect(pairs.select(pl.len()))[0, 0])  # from the footers: what was checked
    return CheckResult(
        "duplicate_keys",
        n_keys == 0,
        # (before: "0 duplicate pair row(s) over 0 key(s)" read as if no key had been checked)
        f"no key {tuple(keys)} repeats among {n_rows} pair row(s)"
        if n_keys == 0
        else f"{n_keys} key(s) {tuple(keys)} repeat: {extra} extra pair row(s) among {n_rows}",
        {
            "count": extra,
            "duplicated_keys": n_keys,
            "samples_in_several_shards": shared.len(),
            "examples": dup.sort(keys).head(N_EXAMPLES).to_dicts(),
        },
    )


def check_status_accounting(
    status: pl.LazyFrame,
    manifest_path: Path | None,
    expected_rows: int,
    partial: bool,
    import_rejects: dict[str, Any] | None = None,
) -> CheckResult:
    counts = _collect(
        status.select(pl.len().alias("rows"), (pl.col("status") == "ok").sum().alias("ok"))
    ).row(0)
    rows, ok = int(counts[0]), int(counts[1] or 0)
    dup = status.group_by("sample_id").agg(pl.len().alias("n")).filter(pl.col("n") > 1)
    duplicated = int(_collect(dup.select(pl.len())).item())
    details: dict[str, Any] = {
        "manifest_rows": expected_rows,
        "status_rows": rows,
        "ok": ok,
        "rejected": rows - ok,
        "duplicated_sample_ids": duplicated,
    }
    problems = []
    if manifest_path is not None and not partial:
        ids = pl.scan_parquet(str(manifest_path)).select("sample_id")
        expected_rows = int(_collect(ids.select(pl.len())).item())
        details["manifest_rows"] = expected_rows
        details["manifest_file"] = str(manifest_path)
        missing = ids.join(status.select("sample_id"), on="sample_id", how="anti")
        extra = status.select("sample_id").join(ids, on="sample_id", how="anti")
        details["missing_sample_ids"] = int(_collect(missing.select(pl.len())).item())
        details["unknown_sample_ids"] = int(_collect(extra.select(pl.len())).item())
        if details["missing_sample_ids"]:
            ex = _collect(missing.sort("sample_id").head(N_EXAMPLES))["sample_id"].to_list()
            problems.append(
                f"{details['missing_sample_ids']} manifest sample_id(s) have no status row (e.g. {ex})"
            )
        if details["unknown_sample_ids"]:
            ex = _collect(extra.sort("sample_id").head(N_EXAMPLES))["sample_id"].to_list()
            problems.append(
                f"{details['unknown_sample_ids']} status sample_id(s) are not in the manifest (e.g. {ex})"
            )
    else:
        details["note"] = "sample-id coverage not checked (" + (
            "partial run)" if partial else "dataset manifest not available)"
        )
    if expected_rows != rows:
        problems.append(f"manifest rows {expected_rows} != ok {ok} + rejected {rows - ok}")
    if duplicated:
        problems.append(f"{duplicated} sample_id(s) have several status rows")
    details["problems"] = problems
    summary = (
        "; ".join(problems) if problems else f"manifest rows {expected_rows} = ok {ok} + rejected {rows - ok}"
    )
    if import_rejects is not None:
        # rows of the dataset that never reached the manifest: every row is accounted for
        details["import_rejected"] = import_rejects["rows"]
        details["import_rejected_by_reason"] = import_rejects["by_reason"]
        details["rejects_file"] = import_rejects["path"]
        summary = (
            f"dataset rows {expected_rows + import_rejects['rows']} = manifest {expected_rows} + rejected at "
            f"import {import_rejects['rows']}; " + summary
        )
    return CheckResult("status_accounting", not problems, summary, details)


def check_pairs_vs_status(pairs: pl.LazyFrame, status: pl.LazyFrame) -> CheckResult:
    want = _collect(status.select(pl.col("n_pairs").sum(), pl.col("n_kept").sum())).row(0)
    got = _collect(pairs.select(pl.len(), pl.col("kept").sum())).row(0)
    rejected = status.filter(pl.col("status") != "ok").select("sample_id")
    orphan_pairs = int(_collect(pairs.join(rejected, on="sample_id", how="semi").select(pl.len())).item())
    problems = []
    if int(want[0] or 0) != int(got[0]):
        problems.append(f"status n_pairs sums to {want[0]}, pairs shards hold {got[0]} rows")
    if int(want[1] or 0) != int(got[1] or 0):
        problems.append(f"status n_kept sums to {want[1]}, pairs shards keep {got[1]}")
    if orphan_pairs:
        problems.append(f"{orphan_pairs} pair(s) belong to rejected samples")
    return CheckResult(
        "pairs_vs_status",
        not problems,
        "; ".join(problems) if problems else f"{got[0]} pairs, {got[1]} kept: as the status rows say",
        {
            "status_n_pairs": int(want[0] or 0),
            "pairs_rows": int(got[0]),
            "pairs_of_rejected_samples": orphan_pairs,
        },
    )


def check_error_reasons(status: pl.LazyFrame, import_rejects: dict[str, Any] | None = None) -> CheckResult:
    counts = _collect(status.group_by("status").agg(pl.len().alias("n")).sort("status"))
    by_status = dict(zip(counts["status"].to_list(), (int(n) for n in counts["n"]), strict=True))
    known = {"ok"} | {str(k) for k in ErrorKind}
    unknown = sorted(s for s in by_status if s not in known)
    examples = (
        _collect(
            status.filter(pl.col("status") != "ok")
            .group_by("status")
            .agg(pl.col("error_message").drop_nulls().sort().head(2))
            .sort("status")
        ).to_dicts()
        if len(by_status) > 1 or "ok" not in by_status
        else []
    )
    errors = sum(n for s, n in by_status.items() if s != "ok")
    at_import = (import_rejects or {}).get("by_reason", {})
    return CheckResult(
        "error_reasons",
        not unknown,
        f"{errors} rejected row(s) in mining: "
        + (", ".join(f"{s} {n}" for s, n in by_status.items() if s != "ok") or "none")
        + (
            f"; {sum(at_import.values())} at import: " + ", ".join(f"{r} {n}" for r, n in at_import.items())
            if at_import
            else ""
        )
        + (f"; unknown status values {unknown}" if unknown else ""),
        {
            "by_status": by_status,
            "import_by_reason": at_import,
            "unknown_values": unknown,
            "examples": examples,
            "import_examples": (import_rejects or {}).get("examples", []),
        },
    )


def run_checks(
    pairs_dir: str | Path,
    manifest_path: str | Path | None = None,
    check_hashes: bool = True,
    allow_partial: bool = False,
) -> CheckReport:
    """Run every check on the run folder `pairs_dir` (see the module docstring).

    Raises only when `pairs_dir` is not a readable run folder; every data problem is a failed check.
    """
    out = Path(pairs_dir)
    run_manifest = read_run_manifest(out, allow_partial=allow_partial)
    results = []
    finalized = bool(run_manifest.get("finalized"))
    n_committed, n_planned = (
        len(run_manifest["shards"]),
        run_manifest.get("n_shards", len(run_manifest["shards"])),
    )
    results.append(
        CheckResult(
            "run_finalized",
            finalized,
            f"{n_committed}/{n_planned} shards committed"
            + ("" if finalized else "; _SUCCESS missing (partial read)"),
            {"committed_shards": n_committed, "planned_shards": n_planned},
        )
    )

    # Integrity and orphans: verify_run knows the protocol's own hidden files
    problems = verify_run(out, check_hashes=check_hashes, allow_partial=allow_partial)
    strays = [p for p in problems if _STRAY.search(p)]
    damaged = [p for p in problems if not _STRAY.search(p)]
    results.append(
        CheckResult(
            "file_integrity",
            not damaged,
            f"{len(damaged)} problem(s) with listed files"
            + (" (sha256 checked)" if check_hashes else " (sizes only)"),
            {"count": len(damaged), "examples": damaged[:N_EXAMPLES], "sha256_checked": check_hashes},
        )
    )
    results.append(
        CheckResult(
            "orphan_files",
            not strays,
            f"{len(strays)} file(s) in the run folder not listed in the run manifest",
            {"count": len(strays), "files": [p.split(": ")[0] for p in strays]},
        )
    )

    schema_result, sound = check_schemas(run_manifest["shards"], out)
    results.append(schema_result)
    pairs = scan_shards(sound["pairs"], PAIRS_SCHEMA)
    status = scan_shards(sound["status"], STATUS_SCHEMA)
    results.append(check_non_null(pairs, status))
    results.append(check_value_ranges(pairs))
    results.append(check_duplicates(sound["pairs"]))
    if finalized:
        expected_rows = load_run_plan(out).n_rows
    else:
        expected_rows = sum(s["n_manifest_rows"] for s in run_manifest["shards"])
    manifest = Path(manifest_path) if manifest_path is not None else None
    import_rejects = read_import_rejects(manifest) if manifest is not None else None
    results.append(check_status_accounting(status, manifest, expected_rows, not finalized, import_rejects))
    results.append(check_pairs_vs_status(pairs, status))
    results.append(check_error_reasons(status, import_rejects))
    return CheckReport(results, sound["pairs"], sound["status"], run_manifest)


__all__ = ["CheckReport", "CheckResult", "range_rules", "run_checks", "scan_shards"]
