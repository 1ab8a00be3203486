"""Shard corruption: truncated, bit-flipped, missing and extra shard files are caught by the reader, by
resume and by verify_run, each with an error naming the file (sha256 and size from the run manifest)."""

from __future__ import annotations

from pathlib import Path

import pytest

from storage.plan import RunPlan
from storage.reader import read_pairs, read_status, scan_pairs, verify_run
from storage.shards import ShardCorruptError, begin_run, finalize_run
from tests.storage.shard_helpers import commit_all


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def _flip_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x01
    path.write_bytes(bytes(data))


DAMAGE = {"truncated": _truncate, "bit-flipped": _flip_bit, "missing": Path.unlink}


@pytest.fixture
def finished(run: tuple[Path, RunPlan, Path]) -> tuple[RunPlan, Path]:
    _, plan, out = run
    commit_all(out, plan)
    finalize_run(out, plan, check_hashes=True)
    return plan, out


@pytest.mark.parametrize("damage", sorted(DAMAGE))
@pytest.mark.parametrize("name", ["pairs-00001.parquet", "status-00002.parquet"])
def test_damaged_shard_file_is_named_by_reader_resume_and_verify(finished, damage, name):
    plan, out = finished
    assert read_pairs(out).num_rows > 0 and verify_run(out) == []
    DAMAGE[damage](out / name)
    reader = read_pairs if name.startswith("pairs") else read_status
    with pytest.raises(ShardCorruptError, match=name):
        reader(out)
    with pytest.raises(ShardCorruptError, match=name):
        begin_run(out, plan)  # a resume of this run refuses to build on the damaged shard
    problems = verify_run(out)
    assert len(problems) == 1 and name in problems[0]
    if damage != "bit-flipped" and name.startswith("pairs"):  # sizes are checked by the lazy scan too
        with pytest.raises(ShardCorruptError, match=name):
            scan_pairs(out)


def test_extra_shard_file_is_named_and_never_read(finished):
    plan, out = finished
    rows = read_pairs(out).num_rows
    extra = out / "pairs-00099.parquet"
    extra.write_bytes((out / "pairs-00000.parquet").read_bytes())
    assert read_pairs(out).num_rows == rows  # the reader lists files from the manifest, not a glob
    problems = verify_run(out)
    assert problems == [f"{extra}: not listed in the run manifest (stray file)"]
