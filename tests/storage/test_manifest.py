"""Tests for storage.manifest / storage.importers: all four formats, every reject kind, structural failures."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from storage.importers import FORMATS, RecordImporter, printable
from storage.manifest import import_dataset, main, read_manifest
from storage.schemas import MANIFEST_SCHEMA
from tests import audit
from tests.audit import FileAccess

REPO_ROOT = Path(__file__).resolve().parents[2]


def write_png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 16), (200, 30, 30)).save(path)


def make_dataset(root: Path, fmt: str, records: list, images: list[str] | None = None) -> Path:
    """Write `records` as fmt's annotation file under root and a tiny PNG for every image path given
    (default: every string path in the records)."""
    field = FORMATS[fmt].path_field
    if images is None:
        images = [r[field] for r in records if isinstance(r, dict) and isinstance(r.get(field), str)]
    for rel in images:
        write_png(root / "imgs" / rel)
    root.mkdir(parents=True, exist_ok=True)
    (root / FORMATS[fmt].annotation_file).write_text(json.dumps(records), encoding="utf-8")
    return root


def run_main(root: Path, fmt: str, out: Path, *extra: str) -> int:
    # These tests are about the rejects themselves: the reject-fraction gate has its own test.
    return main(["--format", fmt, "--root", str(root), "--out", str(out), "--allow-rejects", *extra])


def rejects_of(out: Path) -> list[dict]:
    return pq.read_table(out.with_name(f"{out.stem}.rejects.parquet")).to_pylist()


def rec(pid: int, path: str, captions: list, split: str = "train", field: str = "file_path") -> dict:
    return {"id": pid, field: path, "captions": captions, "split": split, "processed_tokens": [["x"]]}


CUHK_RECORDS = [
    rec(1, "CUHK01/0001_a.png", ["A man in a red coat.", "  He carries a black bag.  "]),
    rec(1, "CUHK01/0001_b.png", ["The man wears a red coat.", "He has a black bag."]),
    rec(2, "cam_a/0002.png", ["A woman in a blue dress.", "She wears white shoes."], "val"),
    rec(3, "test_query/p3.png", ["A child with a yellow hat.", "The child wears shorts."], "test"),
]


# Formats
def test_cuhk_rows_columns_and_split_counts(tmp_path: Path, capsys) -> None:
    root = make_dataset(tmp_path / "cuhk", "cuhk-pedes", CUHK_RECORDS)
    out = tmp_path / "m.parquet"
    assert run_main(root, "cuhk-pedes", out, "--summary-json", str(tmp_path / "s.json")) == 0
    table, meta = read_manifest(out)
    assert table.schema.names == MANIFEST_SCHEMA.names
    assert table.num_rows == 8
    rows = table.to_pylist()
    assert rows[0]["sample_id"] == "imgs/CUHK01/0001_a.png#0"
    assert rows[1]["caption"] == "He carries a black bag."  # stripped, otherwise unchanged
    assert rows[1]["caption_index"] == 1 and rows[1]["image_id"] == rows[1]["image_path"]
    assert [r["person_id"] for r in rows] == [1, 1, 1, 1, 2, 2, 3, 3]  # 1-based ids kept as given
    assert {r["split"] for r in rows} == {"train", "val", "test"}
    assert all(r["gt_regions"] is None and r["gt_links"] is None for r in rows)
    assert (Path(meta["root"]) / rows[0]["image_path"]).is_file()

    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["format"] == "cuhk-pedes" and summary["rows"] == 8 and summary["rejected"] == {}
    assert summary["per_split"] == {
        "train": {"ids": 1, "images": 2, "captions": 4},
        "val": {"ids": 1, "images": 1, "captions": 2},
        "test": {"ids": 1, "images": 1, "captions": 2},
    }
    table_text = capsys.readouterr().out
    assert "train" in table_text and "rejected rows: 0" in table_text


def test_cuhk_rejects_id_zero(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "cuhk", "cuhk-pedes", [*CUHK_RECORDS, rec(0, "zero/0.png", ["A man."])])
    out = tmp_path / "m.parquet"
    assert run_main(root, "cuhk-pedes", out) == 0
    (bad,) = rejects_of(out)
    assert bad["reason"] == "bad_record" and bad["record_index"] == 4 and "zero/0.png" in bad["message"]


def test_icfg_train_test_only_and_val_rejected_by_name(tmp_path: Path) -> None:
    records = [
        rec(0, "train/0000/0000_01.png", ["A man in a grey jacket."]),
        rec(5, "test/0005/0005_01.png", ["A woman in a green skirt."], "test"),
        rec(6, "test/0006/0006_01.png", ["A man in brown shoes."], "val"),
    ]
    root = make_dataset(tmp_path / "icfg", "icfg-pedes", records)
    out = tmp_path / "m.parquet"
    assert run_main(root, "icfg-pedes", out) == 0
    table, meta = read_manifest(out)
    assert meta["format"] == "icfg-pedes"
    assert table.column("split").to_pylist() == ["train", "test"]
    assert table.column("person_id").to_pylist() == [0, 5]
    (bad,) = rejects_of(out)
    assert bad["reason"] == "bad_record" and "'val'" in bad["message"] and "0006_01.png" in bad["message"]


def test_rstpreid_uses_img_path(tmp_path: Path) -> None:
    records = [
        rec(0, "0000_c14_0031.png", ["A man in a suit.", "He holds a phone."], field="img_path"),
        rec(1, "0001_c3_0007.png", ["A girl in pink.", "She has long hair."], "test", field="img_path"),
        rec(2, "0002_c1_0001.png", ["A man in a cap.", "He wears jeans."]),  # file_path: wrong field
    ]
    root = make_dataset(
        tmp_path / "rstp", "rstpreid", records, images=["0000_c14_0031.png", "0001_c3_0007.png"]
    )
    out = tmp_path / "m.parquet"
    assert run_main(root, "rstpreid", out) == 0
    table, _ = read_manifest(out)
    assert (
        table.column("image_path").to_pylist()
        == ["imgs/0000_c14_0031.png"] * 2 + ["imgs/0001_c3_0007.png"] * 2
    )
    bad = rejects_of(out)
    assert [(r["reason"], r["caption_index"]) for r in bad] == [("bad_record", 0), ("bad_record", 1)]
    assert "img_path" in bad[0]["message"] and "0002_c1_0001.png" in bad[0]["message"]


def pvlg_record(pid: int, path: str, captions: list[str], links: list | None = None, **overrides) -> dict:
    record = rec(pid, path, captions)
    record["regions"] = [
        {"id": 0, "label": "head", "bbox": [2.0, 0.0, 6.0, 4.0]},
        {"id": 1, "label": "upper", "bbox": [1, 4, 7, 9], "mask": {"size": [16, 8], "counts": "abc"}},
    ]
    record["links"] = (
        links
        if links is not None
        else [
            [
                {"span": [0, 10], "region_ids": [0], "phrases": [{"span": [2, 8], "region_id": 0}]},
                {"span": [11, len(c)], "region_ids": [], "phrases": []},
            ]
            for c in captions
        ]
    )
    record.update(overrides)
    return record


def test_pvlg_ground_truth_round_trips(tmp_path: Path) -> None:
    good = pvlg_record(1, "train/0001/a.png", ["Short hair. He walks fast.", "Dark hair. He is calm."])
    shifted = pvlg_record(2, "train/0002/a.png", ["  Short hair. He walks fast."])
    shifted["links"] = [
        [{"span": [2, 12], "region_ids": [0], "phrases": [{"span": [4, 10], "region_id": 0}]}]
    ]
    root = make_dataset(tmp_path / "pvlg", "pvlg", [good, shifted])
    out = tmp_path / "m.parquet"
    assert run_main(root, "pvlg", out) == 0
    rows = read_manifest(out)[0].to_pylist()
    assert len(rows) == 3
    assert json.loads(rows[0]["gt_regions"]) == good["regions"]
    assert rows[0]["gt_links"] == json.dumps(good["links"][0])
    assert json.loads(rows[1]["gt_links"]) == good["links"][1]
    # Stripping leading whitespace moves the spans with the text they point at.
    (link,) = json.loads(rows[2]["gt_links"])
    assert rows[2]["caption"][link["span"][0] : link["span"][1]] == "Short hair"
    assert rows[2]["caption"][slice(*link["phrases"][0]["span"])] == "ort ha"


def test_pvlg_bad_ground_truth_rejected(tmp_path: Path) -> None:
    caps = ["Short hair. He walks fast.", "Dark hair. He is calm."]
    records = [
        pvlg_record(1, "ok.png", caps),
        pvlg_record(2, "too_few_links.png", caps, links=[[]]),
        pvlg_record(3, "unknown_region.png", caps),
        pvlg_record(4, "bad_bbox.png", caps),
        pvlg_record(5, "no_regions.png", caps, regions=None),
    ]
    records[2]["links"][1][0]["region_ids"] = [9]
    records[3]["regions"][1]["bbox"] = [10, 5, 2, 20]
    root = make_dataset(tmp_path / "pvlg", "pvlg", records)
    out = tmp_path / "m.parquet"
    assert run_main(root, "pvlg", out) == 0
    assert read_manifest(out)[0].column("sample_id").to_pylist() == [
        "imgs/ok.png#0",
        "imgs/ok.png#1",
        "imgs/unknown_region.png#0",
    ]
    bad = rejects_of(out)
    assert {r["reason"] for r in bad} == {"bad_ground_truth"}
    got = [(r["record_index"], r["caption_index"]) for r in bad]
    assert got == [(1, 0), (1, 1), (2, 1), (3, 0), (3, 1), (4, 0), (4, 1)]
    assert (
        bad[0]["image_path"] == "imgs/too_few_links.png" and bad[2]["image_path"] == "imgs/unknown_region.png"
    )
    messages = {r["record_index"]: r["message"] for r in bad}
    assert "imgs/too_few_links.png" in messages[1] and "1 link lists for 2 captions" in messages[1]
    assert "imgs/unknown_region.png" in messages[2] and "[9]" in messages[2]
    assert "imgs/bad_bbox.png" in messages[3] and "bbox" in messages[3]
    assert "imgs/no_regions.png" in messages[4]


# Bad input: every per-row kind is rejected with its path; the good rows still import
def test_every_reject_kind_reported_and_good_rows_kept(tmp_path: Path, capsys) -> None:
    root = tmp_path / "cuhk"
    records = [
        rec(1, "good/a.png", ["A man in a red coat.", "A man in a red coat.", "  "]),  # 0: dup + empty
        rec(2, "missing/none.png", ["A woman."]),  # 1
        rec(3, "../outside.png", ["A man."]),  # 2: escapes imgs/
        rec(4, "/etc/hostname", ["A man."]),  # 3: absolute
        rec(5, "nul\x00byte.png", ["A man."]),  # 4
        rec(6, 42, ["A man."]),  # 5: non-string path
        rec(7, "text/b.png", ["bad \ud800 surrogate", "bell\x07ringing", 7, "x" * 61]),  # 6
        rec(1, "good/a.png", ["Another caption."]),  # 7: same image as record 0
        "not a record",  # 8
        {"id": 8, "file_path": "f/c.png", "split": "train"},  # 9: no captions
        rec(9, "f/d.png", ["A man."], split="dev"),  # 10
        rec("10", "f/e.png", ["A man."]),  # 11: id is a string
        rec(11, "f/g.png", "A man as a string."),  # 12: captions not a list
    ]
    make_dataset(
        root, "cuhk-pedes", records, images=["good/a.png", "text/b.png", "f/c.png", "f/d.png", "f/e.png"]
    )
    write_png(root / "outside.png")
    out = tmp_path / "m.parquet"
    assert (
        run_main(
            root, "cuhk-pedes", out, "--max-caption-chars", "60", "--summary-json", str(tmp_path / "s.json")
        )
        == 0
    )

    table, _ = read_manifest(out)
    assert table.column("sample_id").to_pylist() == ["imgs/good/a.png#0"]
    bad = rejects_of(out)
    by_key = {(r["record_index"], r["caption_index"]): r for r in bad}
    expected = {
        (0, 1): ("duplicate", "imgs/good/a.png"),
        (0, 2): ("empty_caption", "imgs/good/a.png"),
        (1, 0): ("missing_image", "imgs/missing/none.png"),
        (2, 0): ("unsafe_path", "../outside.png"),
        (3, 0): ("unsafe_path", "/etc/hostname"),
        (4, 0): ("unsafe_path", "nul\\x00byte.png"),
        (5, 0): ("unsafe_path", "42"),
        (6, 0): ("bad_text", "imgs/text/b.png"),
        (6, 1): ("bad_text", "imgs/text/b.png"),
        (6, 2): ("bad_caption_type", "imgs/text/b.png"),
        (6, 3): ("caption_too_long", "imgs/text/b.png"),
        (7, 0): ("duplicate", "imgs/good/a.png"),
        (8, None): ("bad_record", "record 8"),
        (9, None): ("bad_record", "f/c.png"),
        (10, 0): ("bad_record", "f/d.png"),
        (11, 0): ("bad_record", "f/e.png"),
        (12, None): ("bad_record", "f/g.png"),
    }
    assert set(by_key) == set(expected)
    for key, (reason, path) in expected.items():
        assert by_key[key]["reason"] == reason, key
        assert path in by_key[key]["message"], (key, by_key[key]["message"])
    # The image_path column is filled once the path is known to be safe, and only then.
    for key in expected:
        safe = by_key[key]["reason"] not in ("unsafe_path", "bad_record")
        assert by_key[key]["image_path"] == (expected[key][1] if safe else None), key
    assert "U+D800" in by_key[(6, 0)]["message"] and "U+0007" in by_key[(6, 1)]["message"]
    assert "'dev'" in by_key[(10, 0)]["message"]
    # No row vanishes: every caption of every record is either imported or rejected.
    assert table.num_rows + len(bad) == 18

    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["rejected"] == {
        "bad_caption_type": 1,
        "bad_record": 5,
        "bad_text": 2,
        "caption_too_long": 1,
        "duplicate": 2,
        "empty_caption": 1,
        "missing_image": 1,
        "unsafe_path": 4,
    }
    printed = capsys.readouterr().out
    assert "unsafe_path" in printed and "imgs/good/a.png caption 1: same caption" in printed


def test_symlink_outside_root_rejected(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "cuhk", "cuhk-pedes", [rec(1, "in/a.png", ["A man."])])
    write_png(tmp_path / "elsewhere" / "secret.png")
    (root / "imgs" / "in" / "link.png").symlink_to(tmp_path / "elsewhere" / "secret.png")
    (root / "imgs" / "linkdir").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (root / "imgs" / "in" / "inside_link.png").symlink_to(root / "imgs" / "in" / "a.png")
    records = [
        rec(1, "in/a.png", ["A man."]),
        rec(2, "in/link.png", ["A woman."]),
        rec(3, "linkdir/secret.png", ["A child."]),
        rec(4, "in/inside_link.png", ["An alias."]),  # a symlink within imgs/ is fine
    ]
    (root / "reid_raw.json").write_text(json.dumps(records))
    out = tmp_path / "m.parquet"
    assert run_main(root, "cuhk-pedes", out) == 0
    assert read_manifest(out)[0].column("person_id").to_pylist() == [1, 4]
    bad = rejects_of(out)
    assert [(r["record_index"], r["reason"]) for r in bad] == [(1, "unsafe_path"), (2, "unsafe_path")]
    assert "in/link.png" in bad[0]["message"] and "linkdir/secret.png" in bad[1]["message"]


# Duplicates are judged on accepted rows only
def test_image_is_taken_only_by_an_accepted_caption(tmp_path: Path) -> None:
    records = [
        rec(1, "a.png", ["   ", "bell\x07"]),  # 0: every caption rejected, so imgs/a.png stays free
        rec(1, "a.png", ["A man in a red coat."]),  # 1: the first accepted caption of imgs/a.png
        rec(1, "a.png", ["A man in a blue coat."]),  # 2: a true duplicate of record 1
    ]
    root = make_dataset(tmp_path / "cuhk", "cuhk-pedes", records, images=["a.png"])
    out = tmp_path / "m.parquet"
    assert run_main(root, "cuhk-pedes", out) == 0
    rows = read_manifest(out)[0].to_pylist()
    assert [(r["sample_id"], r["caption"]) for r in rows] == [("imgs/a.png#0", "A man in a red coat.")]
    assert [(r["record_index"], r["caption_index"], r["reason"], r["message"]) for r in rejects_of(out)] == [
        (0, 0, "empty_caption", "imgs/a.png caption 0: caption is empty or whitespace"),
        (0, 1, "bad_text", "imgs/a.png caption 1: control character U+0007 at char 4"),
        (2, 0, "duplicate", "imgs/a.png: image already imported by record 1"),
    ]


@pytest.mark.parametrize("fmt", ["cuhk-pedes", "pvlg"])
def test_fully_rejected_record_does_not_block_the_import_of_its_image(
    tmp_path: Path, capsys, fmt: str
) -> None:
    caption = "Short hair. He walks fast."
    if fmt == "pvlg":  # every caption of the first record has a broken link span
        first = pvlg_record(1, "a.png", [caption], links=[[{"span": [0, 99]}]])
        second = pvlg_record(1, "a.png", [caption])
        why = (
            "bad_ground_truth",
            "imgs/a.png caption 0: link 0: needs a 'span' [start, end) inside the caption",
        )
    else:
        first, second = rec(1, "a.png", [None]), rec(1, "a.png", [caption])
        why = ("bad_caption_type", "imgs/a.png caption 0: caption must be a string, got null")
    root = make_dataset(tmp_path / "ds", fmt, [first, second], images=["a.png"])
    out = tmp_path / "m.parquet"
    assert run_main(root, fmt, out) == 0, capsys.readouterr().err
    rows = read_manifest(out)[0].to_pylist()
    assert [(r["sample_id"], r["caption"]) for r in rows] == [("imgs/a.png#0", caption)]
    assert [(r["record_index"], r["caption_index"], r["reason"], r["message"]) for r in rejects_of(out)] == [
        (0, 0, *why)
    ]


# Precise reasons
def test_non_string_captions_are_bad_caption_type_naming_the_type(tmp_path: Path) -> None:
    captions = [7, 1.5, ["a", "b"], {"text": "x"}, None, True, "A man."]
    root = make_dataset(tmp_path / "cuhk", "cuhk-pedes", [rec(1, "a.png", captions)])
    out = tmp_path / "m.parquet"
    assert run_main(root, "cuhk-pedes", out) == 0
    assert read_manifest(out)[0].column("sample_id").to_pylist() == ["imgs/a.png#6"]
    got = [(r["caption_index"], r["reason"], r["message"]) for r in rejects_of(out)]
    prefix = "caption must be a string, got"
    assert got == [
        (0, "bad_caption_type", f"imgs/a.png caption 0: {prefix} number 7"),
        (1, "bad_caption_type", f"imgs/a.png caption 1: {prefix} number 1.5"),
        (2, "bad_caption_type", f'imgs/a.png caption 2: {prefix} list ["a", "b"]'),
        (3, "bad_caption_type", f'imgs/a.png caption 3: {prefix} object {{"text": "x"}}'),
        (4, "bad_caption_type", f"imgs/a.png caption 4: {prefix} null"),
        (5, "bad_caption_type", f"imgs/a.png caption 5: {prefix} boolean true"),
    ]


@pytest.mark.parametrize("raw", [".", "./", "sub/..", "./."])
def test_path_naming_the_folder_itself_gets_its_own_message(tmp_path: Path, raw: str) -> None:
    records = [rec(1, "a.png", ["A man."]), rec(2, raw, ["A woman."])]
    root = make_dataset(tmp_path / "cuhk", "cuhk-pedes", records, images=["a.png"])
    out = tmp_path / "m.parquet"
    assert run_main(root, "cuhk-pedes", out) == 0
    assert [(r["record_index"], r["image_path"], r["reason"], r["message"]) for r in rejects_of(out)] == [
        (1, None, "unsafe_path", f"record 1 ({raw}): image path '{raw}' names the folder itself, not a file")
    ]


@pytest.fixture
def file_access(monkeypatch) -> FileAccess:
    return audit.install(monkeypatch)


@pytest.mark.timeout(60)  # opening the FIFO would block forever: fail instead of hanging the suite
def test_non_regular_files_are_rejected_with_their_type(tmp_path: Path, monkeypatch, file_access) -> None:
    names = ["good.png", "pipe.png", "folder.png", "self.png", "tty.png", "disk.png", "sock.png"]
    root = make_dataset(
        tmp_path.resolve() / "cuhk", "cuhk-pedes", [rec(1, n, ["A man."]) for n in names], images=["good.png"]
    )
    imgs = root / "imgs"
    os.mkfifo(imgs / "pipe.png")
    (imgs / "folder.png").mkdir()
    (imgs / "self.png").symlink_to(".")  # names imgs/ itself
    # Device nodes need privileges and sockets short paths to create, so stat reports these three instead.
    fake_modes = {
        str(imgs / "tty.png"): stat.S_IFCHR | 0o620,
        str(imgs / "disk.png"): stat.S_IFBLK | 0o660,
        str(imgs / "sock.png"): stat.S_IFSOCK | 0o755,
    }
    for name in ("stat", "lstat"):
        real = getattr(os, name)

        def fake(path, *args, _real=real, **kwargs):
            mode = fake_modes.get(os.fsdecode(path)) if isinstance(path, str | os.PathLike) else None
            if mode is None:
                return _real(path, *args, **kwargs)
            return os.stat_result((mode, 1, 1, 1, 0, 0, 0, 0, 0, 0))

        monkeypatch.setattr(os, name, fake)
    out = tmp_path / "m.parquet"
    with file_access.recording():
        assert run_main(root, "cuhk-pedes", out) == 0
    assert read_manifest(out)[0].column("sample_id").to_pylist() == ["imgs/good.png#0"]
    expected = [
        (1, "pipe.png", "a FIFO (named pipe)"),
        (2, "folder.png", "a directory"),
        (3, "self.png", "a directory"),
        (4, "tty.png", "a character device"),
        (5, "disk.png", "a block device"),
        (6, "sock.png", "a socket"),
    ]
    got = [(r["record_index"], r["image_path"], r["reason"], r["message"]) for r in rejects_of(out)]
    assert got == [
        (i, f"imgs/{n}", "not_a_regular_file", f"imgs/{n}: is {kind}, not a regular image file ({imgs / n})")
        for i, n, kind in expected
    ]
    opened = {path for event, path in file_access.events if event == "open"}
    assert str(root / "reid_raw.json") in opened  # the hook does see what the import opens ...
    assert str(imgs / "pipe.png") not in opened  # ... and the FIFO is not among it


def test_hostile_paths_are_rejected_without_touching_anything_outside(tmp_path: Path, file_access) -> None:
    base = tmp_path.resolve()
    root, outside = base / "ds", base / "outside"
    imgs = root / "imgs"
    write_png(outside / "secret.png")
    write_png(imgs / "good.png")
    write_png(imgs / "sub" / "ok.png")
    links = {
        "abs_link.png": str(outside / "secret.png"),
        "rel_link.png": "../../outside/secret.png",
        "linkdir": str(outside),
        "chain_a.png": "chain_b.png",
        "chain_b.png": str(outside / "secret.png"),
        "dangling_out.png": str(outside / "nothing.png"),
        "up": "..",
        "root_link": "/",
        "loop_a.png": "loop_b.png",
        "loop_b.png": "loop_a.png",
        "sub/deep_link.png": "../../../outside/secret.png",
        "sub/etc_link.png": "/etc/passwd",
    }
    for name, target in links.items():
        (imgs / name).symlink_to(target)
    long_path = "d/" * 2100 + "x.png"
    escapes = f"image path escapes {imgs} via '..'"
    absolute = "absolute image path (must be relative to imgs/)"
    out_via = f"image path resolves outside {imgs} through symlink"
    hostile = {
        "../../outside/secret.png": escapes,
        "..": escapes,
        "../reid_raw.json": escapes,
        "sub/../../outside/secret.png": escapes,
        str(outside / "secret.png"): absolute,
        "//etc/passwd": absolute,
        "\\\\server\\share\\x.png": absolute,
        "..\\..\\outside\\secret.png": "image path contains a backslash at char 2 (the separator is '/')",
        "sub\\ok.png": "image path contains a backslash at char 3 (the separator is '/')",
        "C:\\Windows\\x.png": "image path starts with the Windows drive 'C:' (must be relative to imgs/)",
        "c:secret.png": "image path starts with the Windows drive 'c:' (must be relative to imgs/)",
        "good.png\x00../../x": "image path contains control character U+0000 at char 8",
        "a" * 256: f"image path component '{'a' * 119}…' is 256 bytes long (limit 255)",
        "é" * 128: f"image path component '{'é' * 119}…' is 256 bytes long (limit 255)",  # 128 chars
        long_path: f"image path is {len(str(imgs)) + 1 + len(long_path)} bytes long under {imgs} (limit 4095)",
        "abs_link.png": f"{out_via} imgs/abs_link.png -> '{outside / 'secret.png'}'",
        "rel_link.png": f"{out_via} imgs/rel_link.png -> '../../outside/secret.png'",
        "linkdir/secret.png": f"{out_via} imgs/linkdir -> '{outside}'",
        "chain_a.png": f"{out_via} imgs/chain_b.png -> '{outside / 'secret.png'}'",
        "dangling_out.png": f"{out_via} imgs/dangling_out.png -> '{outside / 'nothing.png'}'",
        "up/reid_raw.json": f"{out_via} imgs/up -> '..'",
        "root_link/etc/passwd": f"{out_via} imgs/root_link -> '/'",
        "loop_a.png": "image path follows more than 40 symlinks (a loop?), last imgs/loop_a.png -> 'loop_b.png'",
        "sub/deep_link.png": f"{out_via} imgs/sub/deep_link.png -> '../../../outside/secret.png'",
        "sub/etc_link.png": f"{out_via} imgs/sub/etc_link.png -> '/etc/passwd'",
    }
    records = [
        rec(1, "good.png", ["A man."]),
        rec(2, "up/imgs/sub/ok.png", ["A woman."]),  # leaves imgs/ by a symlink and comes back: fine
        *(rec(3 + i, raw, ["A child."]) for i, raw in enumerate(hostile)),
    ]
    importer = RecordImporter(FORMATS["cuhk-pedes"], root, max_caption_chars=4000)
    with file_access.recording():
        for index, record in enumerate(records):
            importer.add(index, record)

    assert [row["image_path"] for row in importer.rows] == ["imgs/good.png", "imgs/up/imgs/sub/ok.png"]
    got = [
        (r.record_index, r.caption_index, r.image_path, str(r.reason), r.message) for r in importer.rejects
    ]
    assert got == [
        (2 + i, 0, None, "unsafe_path", f"record {2 + i} ({printable(raw)}): {message}")
        for i, (raw, message) in enumerate(hostile.items())
    ]
    # Nothing outside the dataset root was opened, listed or stat'ed; in fact nothing was opened at all.
    touched = [(event, path) for event, path in file_access.events]
    assert ("os.lstat", str(imgs / "good.png")) in touched  # the spies do see the importer's lookups
    assert [(e, p) for e, p in touched if p != str(root) and not p.startswith(f"{root}/")] == []
    assert [(e, p) for e, p in touched if e not in ("os.lstat", "os.readlink", "os.stat")] == []


# Structural failures
@pytest.mark.parametrize(
    "content, needle",
    [
        (None, "not found"),
        ("{not json", "invalid JSON"),
        ('{"a": 1}', "JSON list"),
        ("[]", "zero usable rows"),
    ],
)
def test_structural_failures_exit_nonzero_naming_file(tmp_path: Path, capsys, content, needle) -> None:
    root = tmp_path / "ds"
    root.mkdir()
    if content is not None:
        (root / "reid_raw.json").write_text(content)
    out = tmp_path / "m.parquet"
    assert run_main(root, "cuhk-pedes", out) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and needle in err and str(root / "reid_raw.json") in err
    assert not out.exists()


def test_zero_usable_rows_when_all_images_missing(tmp_path: Path, capsys) -> None:
    root = make_dataset(tmp_path / "ds", "cuhk-pedes", CUHK_RECORDS, images=[])
    out = tmp_path / "m.parquet"
    assert run_main(root, "cuhk-pedes", out) == 2
    err = capsys.readouterr().err
    assert "zero usable rows" in err and "missing_image 8" in err and "reid_raw.json" in err
    assert len(rejects_of(out)) == 8 and not out.exists()


# Metadata, determinism, entry point
def test_schema_metadata_and_version_check(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "cuhk", "cuhk-pedes", CUHK_RECORDS)
    out = tmp_path / "m.parquet"
    import_dataset("cuhk-pedes", root, out)
    raw = pq.read_schema(out).metadata
    assert raw[b"rsm.schema"] == b"manifest" and raw[b"rsm.schema_version"] == b"1"
    _, meta = read_manifest(out)
    assert meta["root"] == str(root.resolve()) and meta["format"] == "cuhk-pedes"
    assert meta["source"] == str(root.resolve() / "reid_raw.json")
    rejects = out.with_name("m.rejects.parquet")
    with pytest.raises(ValueError, match="m.rejects.parquet"):
        read_manifest(rejects)


def test_two_runs_give_the_same_table(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "cuhk", "cuhk-pedes", CUHK_RECORDS)
    first, second = tmp_path / "a.parquet", tmp_path / "b.parquet"
    import_dataset("cuhk-pedes", root, first)
    import_dataset("cuhk-pedes", root, second)
    table_a, table_b = pq.read_table(first), pq.read_table(second)
    assert table_a.equals(table_b, check_metadata=True)
    assert table_a.column("caption").to_pylist()[:2] == ["A man in a red coat.", "He carries a black bag."]


def test_module_entry_point_runs(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "cuhk", "cuhk-pedes", CUHK_RECORDS)
    out = tmp_path / "sub" / "m.parquet"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "storage.manifest",
        "--format",
        "cuhk-pedes",
        "--root",
        str(root),
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "captions" in proc.stdout and read_manifest(out)[0].num_rows == 8
    bad = subprocess.run(
        [*cmd[:-4], "--root", str(tmp_path / "nope"), "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert bad.returncode == 2 and "nope" in bad.stderr


def test_many_rejects_exit_1_unless_allowed_and_another_format_is_hinted(tmp_path, capsys):
    # CUHK-PEDES content imported as RSTPReid: the path field is 'img_path' there, so every record fails.
    records = [rec(i + 1, f"p{i}.png", ["A man in a red coat."]) for i in range(5)]
    root = make_dataset(tmp_path / "ds", "cuhk-pedes", records, images=[f"p{i}.png" for i in range(5)])
    (root / "data_captions.json").write_bytes((root / "reid_raw.json").read_bytes())
    assert main(["--format", "rstpreid", "--root", str(root), "--out", str(tmp_path / "m.parquet")]) == 2
    err = capsys.readouterr().err
    assert "zero usable rows (bad_record 5); e.g. record 0" in err
    assert "reid_raw.json is here: this looks like cuhk-pedes, try --format cuhk-pedes" in err
    assert "the records look like cuhk-pedes" in err and "reads the image path from 'img_path'" in err
    # A missing annotation file names the one that is there.
    assert main(["--format", "icfg-pedes", "--root", str(root), "--out", str(tmp_path / "m.parquet")]) == 2
    assert "ICFG-PEDES.json: annotation file not found; reid_raw.json is here" in capsys.readouterr().err
    # 2 of 6 rows rejected (33% > 10%): exit 1 with the reasons, unless --allow-rejects.
    records.append(rec(6, "missing.png", ["A woman."]))
    records[0]["captions"] = [""]
    root = make_dataset(tmp_path / "ds2", "cuhk-pedes", records, images=[f"p{i}.png" for i in range(5)])
    argv = ["--format", "cuhk-pedes", "--root", str(root), "--out", str(tmp_path / "m2.parquet")]
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert "33% of the rows were rejected" in captured.err and "--allow-rejects" in captured.err
    assert "first 2 rejects:" in captured.out
    assert main([*argv, "--allow-rejects"]) == 0
    assert main([*argv, "--max-reject-fraction", "0.5"]) == 0


def test_a_field_hint_never_sends_the_user_to_a_format_whose_file_is_not_there(tmp_path, capsys):
    # RSTPReid's data_captions.json written with CUHK-PEDES's 'file_path' field: before, the hint said
    # "try --format cuhk-pedes", which then failed with "reid_raw.json: annotation file not found ...
    # this looks like rstpreid, try --format rstpreid" — a loop.
    records = [rec(i + 1, f"p{i}.png", ["A man in a red coat."]) for i in range(5)]
    root = make_dataset(tmp_path / "ds", "cuhk-pedes", records, images=[f"p{i}.png" for i in range(5)])
    (root / "reid_raw.json").rename(root / "data_captions.json")
    assert main(["--format", "rstpreid", "--root", str(root), "--out", str(tmp_path / "m.parquet")]) == 2
    err = capsys.readouterr().err
    assert "RSTPReid names the image field 'img_path', not 'file_path'" in err
    assert "try --format cuhk-pedes" in err  # still offered, but with the file rename it needs
    assert "if they are rstpreid records, rename their fields to rstpreid's" in err
    assert "rename it to reid_raw.json and try --format cuhk-pedes" in err


def test_rejects_are_listed_once_with_their_caption_index_and_read_back_by_reason(tmp_path, capsys):
    from storage.manifest import read_import_rejects

    records = [rec(i + 1, f"p{i}.png", ["A man in a red coat.", "He walks."]) for i in range(4)]
    records[0]["captions"] = ["A man.", ""]  # one caption of a record rejected
    records.append(rec(9, "missing.png", ["A woman.", "She runs."]))  # a whole record's image missing
    root = make_dataset(tmp_path / "ds", "cuhk-pedes", records, images=[f"p{i}.png" for i in range(4)])
    out = tmp_path / "m.parquet"
    assert main(["--format", "cuhk-pedes", "--root", str(root), "--out", str(out), "--allow-rejects"]) == 0
    listed = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("  [")]
    assert len(listed) == len(set(listed)), listed  # each reject once
    assert any("record 0, caption 1:" in ln for ln in listed), listed
    rejects = read_import_rejects(out)
    assert rejects["rows"] == len(listed) == 3 and sum(rejects["by_reason"].values()) == 3
    assert read_import_rejects(tmp_path / "elsewhere.parquet") is None
