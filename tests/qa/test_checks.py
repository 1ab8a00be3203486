"""qa.checks on real committed runs (storage.shards) with planted problems of known size."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qa.checks import check_non_null, run_checks
from storage.plan import plan_shards
from storage.schemas import PAIRS_SCHEMA, STATUS_SCHEMA, with_version
from storage.shards import begin_run, commit_shard, finalize_run
from tests.factories import pair_row, run_config, status_row

CONFIG = run_config()
N_IMAGES = 4
UNITS = 3


def write_manifest(path: Path, n_images: int = N_IMAGES) -> Path:
    rows = []
    for k in range(n_images):
        image = f"imgs/train/{k:04d}.png"
        rows.append(
            {
                "sample_id": f"{image}#0",
                "image_id": image,
                "person_id": k + 1,
                "split": "train" if k < 2 else "test",
                "image_path": image,
                "caption_index": 0,
                "caption": "A red hat. A blue shirt. Black shoes.",
                "gt_regions": None,
                "gt_links": None,
            }
        )
    pq.write_table(
        pa.Table.from_pylist(rows, schema=with_version("manifest", {"rsm.root": str(path.parent)})), path
    )
    return path


def unit_pair(sample: dict, unit: int, **overrides) -> dict:
    """Unit `unit` (0..2) of `sample`: head / upper / feet regions, reliability 0.3 / 0.5 / 0.7."""
    values = {
        "sentence_index": unit,
        "sentence": f"unit {unit}",
        "char_start": 12 * unit,
        "char_end": 12 * unit + 10,
        "part_tags": ["upper"] if unit == 1 else [],
        "region_id": unit,
        "region_label": ["head", "upper", "feet"][unit],
        "bbox_xyxy": [2.0, 10.0 * unit, 30.0, 10.0 * unit + 20],
        "softmax_prob": 0.4,
        "margin": 0.05,
        "reliability": 0.3 + 0.2 * unit,
        "kept": 0.3 + 0.2 * unit >= 0.5,
    }
    return pair_row(sample, **(values | overrides))


def make_run(tmp_path: Path, edit=None) -> tuple[Path, Path]:
    """A finalized run of 4 one-caption images in 2 shards; the last image is rejected (corrupt).
    `edit(rows)` may change the pairs rows of a shard before it is committed."""
    manifest = write_manifest(tmp_path / "manifest.parquet")
    out = tmp_path / "run"
    plan = plan_shards(manifest, 2, CONFIG)
    begin_run(out, plan)
    for spec in plan.shards:
        samples = plan.rows_for(spec.shard_id).to_pylist()
        pairs, status = [], []
        for s in samples:
            bad = s["image_id"].endswith(f"{N_IMAGES - 1:04d}.png")
            rows = [] if bad else [unit_pair(s, u) for u in range(UNITS)]
            pairs += rows
            status.append(
                {
                    "sample_id": s["sample_id"],
                    "image_id": s["image_id"],
                    "status": "corrupt_image" if bad else "ok",
                    "error_message": f"{s['image_path']}: truncated" if bad else None,
                    "n_regions": 0 if bad else 3,
                    "n_sentences": 0 if bad else UNITS,
                    "n_pairs": len(rows),
                    "n_kept": sum(r["kept"] for r in rows),
                }
            )
        if edit is not None:
            pairs = edit(pairs)
        commit_shard(
            out,
            plan,
            spec.shard_id,
            pa.Table.from_pylist(pairs, schema=PAIRS_SCHEMA),
            pa.Table.from_pylist(status, schema=STATUS_SCHEMA),
        )
    finalize_run(out, plan)
    return out, manifest


def rewrite(path: Path, table: pa.Table, kind: str) -> None:
    """Replace a committed file behind the protocol's back, keeping its metadata."""
    meta = pq.read_schema(path).metadata
    pq.write_table(table.replace_schema_metadata(meta), path)


def test_clean_run_passes_every_check(tmp_path):
    out, manifest = make_run(tmp_path)
    report = run_checks(out, manifest)
    assert report.passed, report.details()
    assert set(report.verdicts()) >= {
        "run_finalized",
        "file_integrity",
        "orphan_files",
        "schema_version",
        "non_null",
        "value_ranges",
        "duplicate_keys",
        "status_accounting",
        "pairs_vs_status",
        "error_reasons",
    }
    d = report.details()
    acc = d["status_accounting"]
    assert (acc["manifest_rows"], acc["ok"], acc["rejected"], acc["missing_sample_ids"]) == (4, 3, 1, 0)
    assert d["error_reasons"]["by_status"] == {"corrupt_image": 1, "ok": 3}
    assert d["pairs_vs_status"]["pairs_rows"] == 3 * UNITS
    assert [sid for sid, _ in report.pairs_files] == [0, 1]
    # Says what was checked (before: "0 duplicate pair row(s) over 0 key(s)", as if no key had been)
    assert d["duplicate_keys"]["summary"] == (
        f"no key ('sample_id', 'sentence_index', 'region_id') repeats among {3 * UNITS} pair row(s)"
    )


def test_orphan_files_in_the_run_folder_are_flagged(tmp_path):
    out, manifest = make_run(tmp_path)
    (out / "pairs-00099.parquet").write_bytes(b"stray")
    (out / "notes.txt").write_text("left behind")
    report = run_checks(out, manifest)
    verdicts = report.verdicts()
    assert verdicts["orphan_files"] == "fail"
    orphans = report.details()["orphan_files"]
    assert orphans["count"] == 2
    assert {Path(f).name for f in orphans["files"]} == {"pairs-00099.parquet", "notes.txt"}
    assert verdicts["file_integrity"] == "pass"  # the listed files are untouched


def test_planted_duplicates_are_counted_exactly(tmp_path):
    out, manifest = make_run(tmp_path)
    path = out / "pairs-00000.parquet"
    table = pq.read_table(path)
    # In shard 0: key of row 0 three times more, key of row 1 once more: 4 extra rows over 2 keys
    planted = pa.concat_tables([table, table.take([0, 0, 0, 1])])
    rewrite(path, planted, "pairs")
    # And row 2 of shard 0 copied into shard 1: a key repeated across shards, 1 more extra row
    other = out / "pairs-00001.parquet"
    rewrite(other, pa.concat_tables([pq.read_table(other), table.slice(2, 1)]), "pairs")
    report = run_checks(out, manifest)
    dup = report.details()["duplicate_keys"]
    assert report.verdicts()["duplicate_keys"] == "fail"
    assert dup["count"] == 5 and dup["duplicated_keys"] == 3
    rows = 3 * UNITS + 5
    assert dup["summary"].startswith("3 key(s) ('sample_id', 'sentence_index', 'region_id') repeat: 5 extra")
    assert dup["summary"].endswith(f"among {rows}")
    assert dup["samples_in_several_shards"] == 1
    assert sorted(e["n"] for e in dup["examples"]) == [2, 2, 4]
    # Rewriting a committed file is also caught by the hash/row-count check, naming the file
    integrity = report.details()["file_integrity"]
    assert report.verdicts()["file_integrity"] == "fail" and any(
        "pairs-00000" in p for p in integrity["examples"]
    )


def test_value_ranges_count_each_rule(tmp_path):
    def plant(rows):
        if rows:
            rows[0]["reliability"] = 1.5
            rows[1]["softmax_prob"] = -0.1
            rows[1]["bbox_xyxy"] = [30.0, 0.0, 2.0, 20.0]  # x0 > x1
            rows[2]["char_end"] = rows[2]["char_start"]
        return rows

    out, manifest = make_run(tmp_path, edit=plant)
    report = run_checks(out, manifest)
    ranges = report.details()["value_ranges"]
    assert report.verdicts()["value_ranges"] == "fail"
    assert ranges["by_rule"] == {
        "reliability_in_0_1": 2,  # both shards have ok samples
        "softmax_prob_in_0_1": 2,
        "bbox_x0_lt_x1": 2,
        "bbox_y0_lt_y1": 0,
        "char_span_ordered": 2,
    }
    assert ranges["count"] == 8


def test_status_accounting_mismatch_is_flagged(tmp_path):
    out, manifest = make_run(tmp_path)
    # The dataset manifest gained a row the run never saw
    bigger = write_manifest(tmp_path / "bigger.parquet", n_images=N_IMAGES + 1)
    report = run_checks(out, bigger)
    acc = report.details()["status_accounting"]
    assert report.verdicts()["status_accounting"] == "fail"
    assert acc["missing_sample_ids"] == 1 and acc["manifest_rows"] == 5 and acc["status_rows"] == 4

    # A status shard with a sample counted twice
    path = out / "status-00000.parquet"
    table = pq.read_table(path)
    rewrite(path, pa.concat_tables([table, table.slice(0, 1)]), "status")
    acc = run_checks(out, manifest).details()["status_accounting"]
    assert not acc["passed"] and acc["duplicated_sample_ids"] == 1


def test_bad_schema_file_is_failed_and_left_out_of_the_scans(tmp_path):
    out, manifest = make_run(tmp_path)
    path = out / "pairs-00001.parquet"
    table = pq.read_table(path)
    pq.write_table(table.replace_schema_metadata(None), path)  # no rsm.schema / version
    report = run_checks(out, manifest)
    assert report.verdicts()["schema_version"] == "fail"
    assert "pairs-00001" in report.details()["schema_version"]["examples"][0]
    assert [sid for sid, _ in report.pairs_files] == [0]


def test_nulls_in_non_nullable_columns_are_counted(tmp_path):
    out, manifest = make_run(tmp_path)
    path = out / "pairs-00000.parquet"
    table = pq.read_table(path)
    fields = [f.with_nullable(True) for f in table.schema]
    loose = table.cast(pa.schema(fields, metadata=table.schema.metadata))
    col = loose.schema.get_field_index("reliability")
    loose = loose.set_column(col, loose.schema.field(col), pa.array([None] * loose.num_rows, pa.float32()))
    rewrite(path, loose, "pairs")
    report = run_checks(out, manifest)
    nulls = report.details()["non_null"]
    assert report.verdicts()["non_null"] == "fail"
    assert nulls["by_column"] == {"pairs.reliability": table.num_rows}


def test_unfinished_run_is_readable_only_as_partial(tmp_path):
    manifest = write_manifest(tmp_path / "manifest.parquet")
    out = tmp_path / "run"
    plan = plan_shards(manifest, 2, CONFIG)
    begin_run(out, plan)
    samples = plan.rows_for(0).to_pylist()
    status = [status_row(s, n_regions=3, n_sentences=1, n_pairs=1, n_kept=0) for s in samples]
    pairs = [unit_pair(s, 0) for s in samples]
    commit_shard(
        out,
        plan,
        0,
        pa.Table.from_pylist(pairs, schema=PAIRS_SCHEMA),
        pa.Table.from_pylist(status, schema=STATUS_SCHEMA),
    )
    with pytest.raises(Exception, match="not finalized"):
        run_checks(out, manifest)
    report = run_checks(out, manifest, allow_partial=True)
    assert report.verdicts()["run_finalized"] == "fail"
    assert report.details()["status_accounting"]["manifest_rows"] == 2  # the committed shard's rows
    assert report.verdicts()["status_accounting"] == "pass"


def test_check_non_null_on_frames():
    pairs = pl.from_arrow(PAIRS_SCHEMA.empty_table()).lazy()
    status = pl.DataFrame(
        {"sample_id": ["a", None], "image_id": ["a", "b"], "status": ["ok", None]},
    ).lazy()
    status = status.with_columns(
        *[pl.lit(0, pl.Int32).alias(c) for c in ("n_regions", "n_sentences", "n_pairs", "n_kept")],
        pl.lit(None, pl.String).alias("error_message"),
    )
    result = check_non_null(pairs, status)
    assert not result.passed and result.details["by_column"] == {"status.sample_id": 1, "status.status": 1}


def test_the_imports_rejects_are_in_the_accounting_and_the_reasons(tiny_run, tiny_dataset, tmp_path):
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from storage.manifest import REJECTS_SCHEMA

    manifest = tmp_path / "manifest.parquet"
    shutil.copyfile(tiny_dataset / "manifest.parquet", manifest)
    reasons = ["missing_image"] * 3 + ["empty_caption"] * 2
    rows = [
        {"record_index": k, "caption_index": 0, "image_path": None, "reason": r, "message": "x"}
        for k, r in enumerate(reasons)
    ]
    pq.write_table(pa.Table.from_pylist(rows, schema=REJECTS_SCHEMA), tmp_path / "manifest.rejects.parquet")
    report = run_checks(tiny_run, manifest)
    details = report.details()
    n = details["status_accounting"]["manifest_rows"]
    assert details["status_accounting"]["import_rejected"] == 5
    assert (
        f"dataset rows {n + 5} = manifest {n} + rejected at import 5"
        in report.results[[r.name for r in report.results].index("status_accounting")].summary
    )
    assert details["error_reasons"]["import_by_reason"] == {"missing_image": 3, "empty_caption": 2}
    summary = report.results[[r.name for r in report.results].index("error_reasons")].summary
    assert "5 at import: missing_image 3, empty_caption 2" in summary
