"""Hostile and unusual image files, one by one through `load_rgb` and together through `RSMMiner.mine`.

Every file is either loaded correctly (checked pixel by pixel where the format is lossless) or refused
with its named status kind; a batch, or a shard-sized table, of them never raises and accounts for every
input row exactly once.
"""

from __future__ import annotations

import io
import os
import shutil
import struct
import zlib
from dataclasses import replace
from itertools import zip_longest
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from PIL import Image

from miners.images import ImageLoadError, load_rgb
from miners.rsm import RSMConfig, RSMMiner
from storage.manifest import read_manifest
from storage.schemas import MANIFEST_SCHEMA, ErrorKind
from tests import audit

GREY, RED = (128, 128, 128), (255, 0, 0)
EXIF_ORIENTATION_TAG = 0x0112
# Where the stored image's top-left corner is displayed, per EXIF orientation (and the numpy view of
# the stored array a viewer shows): 5-8 swap width and height.
ORIENTATIONS = {
    1: ("top-left", lambda a: a),
    2: ("top-right", lambda a: a[:, ::-1]),
    3: ("bottom-right", lambda a: a[::-1, ::-1]),
    4: ("bottom-left", lambda a: a[::-1, :]),
    5: ("top-left", lambda a: a.transpose(1, 0, 2)),
    6: ("top-right", lambda a: np.rot90(a, -1)),
    7: ("bottom-right", lambda a: np.rot90(a, 2).transpose(1, 0, 2)),
    8: ("bottom-left", lambda a: np.rot90(a, 1)),
}


def _noise(h: int = 64, w: int = 48) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8))


def _encoded(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def _bomb_png() -> bytes:
    """A valid PNG header claiming 30000 x 30000 pixels, with a one-byte body."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
        return struct.pack(">I", len(data)) + tag + data + crc

    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00"))
        + chunk(b"IEND", b"")
    )


def _stored_corner_image() -> np.ndarray:
    """48 wide x 32 high, grey, with a red 8 x 8 block in the stored top-left corner."""
    a = np.full((32, 48, 3), GREY, np.uint8)
    a[:8, :8] = RED
    return a


def _corner_of_red(arr: np.ndarray) -> str:
    h, w = arr.shape[:2]
    ys, xs = np.nonzero(np.all(arr == RED, axis=2))
    vertical = "top" if ys.mean() < h / 2 else "bottom"
    horizontal = "left" if xs.mean() < w / 2 else "right"
    return f"{vertical}-{horizontal}"


def _save_exif_png(path: Path, orientation: int) -> None:
    img = Image.fromarray(_stored_corner_image())
    exif = img.getexif()
    exif[EXIF_ORIENTATION_TAG] = orientation
    img.save(path, exif=exif)


def _write(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def _save(img: Image.Image, **kw):
    return lambda p: img.save(p, **kw)


def _palette_with_transparency() -> Image.Image:
    img = Image.new("P", (16, 16), 0)
    img.putpalette([*RED, 0, 255, 0] + [0] * (256 * 3 - 6))
    img.paste(1, (8, 0, 16, 16))  # right half: palette entry 1 (green)
    img.info["transparency"] = 0
    return img


def _make_fifo(path: Path) -> None:
    os.mkfifo(path)  # never opened: the loader checks with stat first


# name -> (how to make it, expected kind or None for "loads", check of the loaded array or None)
HOSTILE = {
    "zero_byte.png": (lambda p: _write(p, b""), ErrorKind.UNREADABLE, None),
    "random_bytes.png": (
        lambda p: _write(p, np.random.default_rng(1).bytes(4096)),
        ErrorKind.UNREADABLE,
        None,
    ),
    "truncated.jpg": (lambda p: _write(p, _encoded(_noise(), "JPEG")[:600]), ErrorKind.CORRUPT, None),
    "truncated.png": (
        lambda p: _write(p, (d := _encoded(_noise(), "PNG"))[: len(d) // 2]),
        ErrorKind.CORRUPT,
        None,
    ),
    "truncated.webp": (
        lambda p: _write(p, (d := _encoded(_noise(), "WEBP"))[: len(d) // 2]),
        ErrorKind.CORRUPT,
        None,
    ),
    "bomb.png": (lambda p: _write(p, _bomb_png()), ErrorKind.BOMB, None),
    "one_pixel.png": (_save(Image.new("RGB", (1, 1), RED)), ErrorKind.TOO_SMALL, None),
    "wide_10000x20.png": (
        _save(Image.new("RGB", (10000, 20), GREY)),
        None,
        lambda a: a.shape == (20, 10000, 3) and (a == GREY).all(),
    ),
    "tall_20x10000.png": (
        _save(Image.new("RGB", (20, 10000), GREY)),
        None,
        lambda a: a.shape == (10000, 20, 3) and (a == GREY).all(),
    ),
    "png_named.jpg": (
        lambda p: _write(p, _encoded(_noise(), "PNG")),
        None,
        lambda a: np.array_equal(a, np.asarray(_noise())),
    ),
    "cmyk.jpg": (
        _save(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), format="JPEG"),
        None,
        lambda a: a.shape == (32, 32, 3) and a[..., 0].min() > 240 and a[..., 1:].max() < 15,
    ),
    "palette_transparent.png": (
        lambda p: _palette_with_transparency().save(p, transparency=0),
        None,
        lambda a: (a[:, :8] == RED).all() and (a[:, 8:] == (0, 255, 0)).all(),
    ),
    "sixteen_bit.png": (
        _save(Image.fromarray(np.tile(np.linspace(0, 65535, 64).round().astype(np.uint16), (16, 1)))),
        None,
        # scaled, not clipped: 64 distinct grey levels from 0 to 255 (clipping leaves a few, then 255s)
        lambda a: a.min() == 0 and a.max() == 255 and len(np.unique(a[0, :, 0])) == 64,
    ),
    "float_unit.tif": (
        _save(Image.fromarray(np.tile(np.linspace(0, 1, 64, dtype=np.float32), (16, 1)))),
        None,
        lambda a: a.min() == 0 and a.max() == 255,
    ),
    "rgba.png": (
        _save(Image.new("RGBA", (16, 16), (10, 20, 30, 0))),
        None,
        lambda a: (a == (10, 20, 30)).all(),  # alpha dropped, colour kept
    ),
    "one_bit.png": (
        _save(Image.new("1", (16, 16), 1)),
        None,
        lambda a: (a == 255).all(),
    ),
    **{
        f"exif_orientation_{o}.png": (
            lambda p, o=o: _save_exif_png(p, o),
            None,
            lambda a, o=o: (
                np.array_equal(a, ORIENTATIONS[o][1](_stored_corner_image()))
                and _corner_of_red(a) == ORIENTATIONS[o][0]
            ),
        )
        for o in ORIENTATIONS
    },
    "a_directory.png": (lambda p: p.mkdir(), ErrorKind.NOT_A_REGULAR_FILE, None),
    "a_fifo.png": (_make_fifo, ErrorKind.NOT_A_REGULAR_FILE, None),
    "missing.png": (lambda p: None, ErrorKind.MISSING, None),
}


def _make_all(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, (make, _, _) in HOSTILE.items():
        make(folder / name)


@pytest.mark.parametrize("name", list(HOSTILE))
def test_each_hostile_file_loads_or_is_refused_by_name(tmp_path, name):
    make, kind, check = HOSTILE[name]
    make(tmp_path / name)
    if kind is None:
        arr = load_rgb(tmp_path / name)
        assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3
        assert check(arr), name
    else:
        with pytest.raises(ImageLoadError) as err:
            load_rgb(tmp_path / name)
        assert err.value.kind == kind and name in str(err.value)


def test_exif_orientations_five_to_eight_transpose_the_shape(tmp_path):
    for o in ORIENTATIONS:
        _save_exif_png(tmp_path / f"o{o}.png", o)
        assert load_rgb(tmp_path / f"o{o}.png").shape == ((48, 32, 3) if o >= 5 else (32, 48, 3)), o


# --- through the miner ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def miner(tiny_clip_dir):
    return RSMMiner(RSMConfig(clip_model=str(tiny_clip_dir), images_per_batch=4))


def _hostile_rows(folder: str, caption: str) -> list[dict]:
    """Two captions per hostile file: a real one, and one with no sentences in it."""
    rows = []
    for name in HOSTILE:
        path = f"{folder}/{name}"
        for k, text in enumerate((caption, "🙂 !!! 🙂")):
            rows.append(
                {
                    "sample_id": f"{path}#{k}",
                    "image_id": path,
                    "person_id": 9000,
                    "split": "test",
                    "image_path": path,
                    "caption_index": k,
                    "caption": text,
                    "gt_regions": None,
                    "gt_links": None,
                }
            )
    return rows


def _expected_status(row: dict) -> str:
    """The hostile file's own refusal, else "ok" for a real caption and no_sentences for the emoji one."""
    name = row["image_path"].rsplit("/", 1)[-1]
    kind = HOSTILE[name][1] if name in HOSTILE else None
    if kind is not None:
        return str(kind)
    return "ok" if row["caption_index"] == 0 or name not in HOSTILE else "no_sentences"


def _check_accounting(result, rows: list[dict]) -> None:
    status = result.status.to_pylist()
    assert [s["sample_id"] for s in status] == [r["sample_id"] for r in rows]  # one each, in order
    assert [s["status"] for s in status] == [_expected_status(r) for r in rows]
    for s in status:
        assert (s["error_message"] is None) == (s["status"] == "ok")
    ok = {s["sample_id"] for s in status if s["status"] == "ok"}
    assert set(result.pairs["sample_id"].to_pylist()) == ok
    assert result.pairs.num_rows == pc.sum(result.status["n_pairs"]).as_py() > 0


def test_a_batch_of_hostile_files_never_raises(miner, tiny_dataset, tmp_path, monkeypatch):
    table, _ = read_manifest(tiny_dataset / "manifest.parquet")
    _make_all(tmp_path / "hostile")
    rows = _hostile_rows("hostile", table["caption"][0].as_py())
    monkeypatch.setattr(miner, "cfg", replace(miner.cfg, images_per_batch=len(HOSTILE)))  # one batch
    result = miner.mine(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), tmp_path)
    _check_accounting(result, rows)
    names = {s["image_id"].rsplit("/", 1)[-1] for s in result.status.to_pylist() if s["status"] == "ok"}
    assert names == {name for name, (_, kind, _) in HOSTILE.items() if kind is None}


def test_a_shard_of_good_and_hostile_files_loses_only_the_hostile_rows(
    miner, tiny_dataset, tmp_path, monkeypatch
):
    table, meta = read_manifest(tiny_dataset / "manifest.parquet")
    root = tmp_path / "root"
    shutil.copytree(meta["root"], root)  # before the FIFO exists: copying one would block
    _make_all(root / "hostile")
    hostile = _hostile_rows("hostile", table["caption"][0].as_py())
    good = table.to_pylist()
    # Interleave whole images (an image's rows stay together) so that with 4 images per batch some
    # batches hold nothing loadable at all, others a mix.
    groups: dict[str, list[dict]] = {}
    for r in hostile + good:
        groups.setdefault(r["image_id"], []).append(r)
    hostile_ids = list(dict.fromkeys(r["image_id"] for r in hostile))
    good_ids = list(dict.fromkeys(r["image_id"] for r in good))
    order = [iid for pair in zip_longest(hostile_ids, good_ids) for iid in pair if iid is not None]
    rows = [r for iid in order for r in groups[iid]]
    assert len(rows) == len(hostile) + len(good)
    shard = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    results = {}
    for budget in (100_000, RSMConfig.max_batch_pixels):  # the tiny budget decodes most images alone
        monkeypatch.setattr(miner, "cfg", replace(miner.cfg, max_batch_pixels=budget))
        results[budget] = miner.mine(shard, root)
        _check_accounting(results[budget], rows)
    small, default = results.values()
    assert small.pairs.equals(default.pairs) and small.status.equals(default.status)
    # The good rows come out as they do without any hostile neighbours.
    clean = miner.mine(table, root)
    keep = pc.is_in(default.pairs["image_id"], pa.array(good_ids))
    assert_same_pairs(default.pairs.filter(keep), clean.pairs)


def assert_same_pairs(got: pa.Table, want: pa.Table) -> None:
    """Same pairs, row for row; CLIP's float features only to float32 noise, since a different batch
    composition may round a matrix product differently in its last bit."""
    assert got.num_rows == want.num_rows > 0
    got, want = got.sort_by("sample_id"), want.sort_by("sample_id")
    for name in got.column_names:
        if pa.types.is_floating(got.schema.field(name).type):
            np.testing.assert_allclose(got[name].to_numpy(), want[name].to_numpy(), atol=1e-5)
        else:
            assert got[name].equals(want[name]), name


def test_a_symlink_out_of_the_root_is_refused_in_a_batch(miner, tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    Image.new("RGB", (64, 128), GREY).save(outside / "secret.png")
    Image.new("RGB", (64, 128), GREY).save(root / "fine.png")
    (root / "escape.png").symlink_to(outside / "secret.png")
    rows = [
        {
            "sample_id": f"{name}#0",
            "image_id": name,
            "person_id": 1,
            "split": "test",
            "image_path": name,
            "caption_index": 0,
            "caption": "A man in a red jacket.",
            "gt_regions": None,
            "gt_links": None,
        }
        for name in ("escape.png", "fine.png")
    ]
    result = miner.mine(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), root)
    escape, fine = result.status.to_pylist()
    assert (
        escape["status"] == "unsafe_path"
        and str((outside / "secret.png").resolve()) in escape["error_message"]
    )
    assert fine["status"] == "ok"
    assert set(result.pairs["image_id"].to_pylist()) == {"fine.png"}


@pytest.fixture
def file_access(monkeypatch):
    return audit.install(monkeypatch)


def test_hostile_paths_in_a_manifest_open_nothing_outside_the_root(miner, tmp_path, file_access):
    """A manifest edited (or written by another tool) after import: the miner refuses every path that
    leaves the root, and the audit hook shows no file outside the root was opened."""
    base = tmp_path.resolve()
    root, outside = base / "root", base / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    for folder in (root, outside):
        Image.new("RGB", (64, 128), GREY).save(folder / "secret.png")
    (root / "link.png").symlink_to(outside / "secret.png")
    (root / "rel_link.png").symlink_to("../outside/secret.png")
    (root / "linkdir").symlink_to(outside)
    (root / "chain_a.png").symlink_to("chain_b.png")
    (root / "chain_b.png").symlink_to(outside / "secret.png")
    (root / "sub" / "loop.png").symlink_to("loop.png")
    hostile = {
        "../outside/secret.png": ErrorKind.UNSAFE_PATH,
        "sub/../../outside/secret.png": ErrorKind.UNSAFE_PATH,
        str(outside / "secret.png"): ErrorKind.UNSAFE_PATH,
        "link.png": ErrorKind.UNSAFE_PATH,
        "rel_link.png": ErrorKind.UNSAFE_PATH,
        "linkdir/secret.png": ErrorKind.UNSAFE_PATH,
        "chain_a.png": ErrorKind.UNSAFE_PATH,
        "secret.png\x00../../outside/secret.png": ErrorKind.UNSAFE_PATH,
        # On POSIX a backslash is an ordinary name character: these name files inside root that do not exist.
        "..\\outside\\secret.png": ErrorKind.MISSING,
        "sub\\secret.png": ErrorKind.MISSING,
        "d/" * 2100 + "x.png": ErrorKind.UNREADABLE,  # over PATH_MAX
        "a" * 300 + ".png": ErrorKind.UNREADABLE,  # over NAME_MAX
        "sub/loop.png": ErrorKind.UNREADABLE,  # a symlink loop
    }
    rows = [
        {
            "sample_id": f"{k}#0",
            "image_id": f"img-{k}",
            "person_id": 1,
            "split": "test",
            "image_path": path,
            "caption_index": 0,
            "caption": "A man in a red jacket.",
            "gt_regions": None,
            "gt_links": None,
        }
        for k, path in enumerate([*hostile, "secret.png"])
    ]
    with file_access.recording():
        result = miner.mine(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), root)
    status = result.status.to_pylist()
    assert [s["status"] for s in status] == [str(kind) for kind in hostile.values()] + ["ok"]
    assert all(s["error_message"] for s in status[:-1])
    assert set(result.pairs["image_id"].to_pylist()) == {f"img-{len(hostile)}"}  # only root/secret.png
    opened = [path for event, path in file_access.events if event == "open"]
    assert str(root / "secret.png") in opened  # the hook sees the miner's reads ...
    # ... and nothing outside the root was opened, listed or changed. (Only the test's own folder is
    # judged: lazy imports may open library files.) Resolving a symlink does lstat its target -- that is
    # how the escape is seen -- so stat-family lookups are the only events allowed outside the root.
    near = [(e, p) for e, p in file_access.outside(root) if p.startswith(f"{base}/")]
    assert [(e, p) for e, p in near if e not in ("os.lstat", "os.stat", "os.readlink")] == []
    assert {p for _, p in near} <= {str(outside), str(outside / "secret.png")}
