"""Safe image loading: every bad file becomes a named error kind, never another exception."""

import io
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from miners.images import ImageLoadError, contained_path, header_pixels, load_rgb
from storage.schemas import ErrorKind


def _png(path, size=(32, 64), mode="RGB"):
    Image.new(mode, size, 128).save(path)
    return path


def test_loads_rgb_and_converts_modes(tmp_path):
    for mode in ("RGB", "L", "RGBA", "P", "CMYK"):
        p = tmp_path / f"x_{mode}.png" if mode != "CMYK" else tmp_path / "x.jpg"
        _png(p, mode=mode)
        arr = load_rgb(p)
        assert arr.shape == (64, 32, 3) and arr.dtype == np.uint8


def test_exif_transpose_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90° on display
    p = tmp_path / "rot.jpg"
    img.save(p, exif=exif)
    assert load_rgb(p).shape == (40, 20, 3)  # displayed orientation: 20 wide, 40 high


@pytest.mark.parametrize(
    ("make", "kind"),
    [
        (lambda p: None, ErrorKind.MISSING),
        (lambda p: p.write_bytes(b"this is not an image"), ErrorKind.UNREADABLE),
        (lambda p: p.write_bytes(b""), ErrorKind.UNREADABLE),
    ],
)
def test_missing_and_unreadable(tmp_path, make, kind):
    p = tmp_path / "bad.png"
    make(p)
    with pytest.raises(ImageLoadError) as err:
        load_rgb(p)
    assert err.value.kind == kind and "bad.png" in str(err.value)


def test_truncated_png_is_corrupt(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    p = tmp_path / "trunc.png"
    p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageLoadError) as err:
        load_rgb(p)
    assert err.value.kind == ErrorKind.CORRUPT and "trunc.png" in str(err.value)


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    # A valid PNG header claiming 30000 x 30000 pixels with a tiny body.
    def chunk(tag, data):
        return (
            struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    body = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00"))
        + chunk(b"IEND", b"")
    )
    p = tmp_path / "bomb.png"
    p.write_bytes(body)
    with pytest.raises(ImageLoadError) as err:
        load_rgb(p)
    assert err.value.kind == ErrorKind.BOMB and "bomb.png" in str(err.value)


def test_too_small(tmp_path):
    with pytest.raises(ImageLoadError) as err:
        load_rgb(_png(tmp_path / "tiny.png", size=(3, 3)))
    assert err.value.kind == ErrorKind.TOO_SMALL


def test_sixteen_bit_gradient_is_scaled_not_clipped(tmp_path):
    # A full-range 16-bit ramp: convert("RGB") alone would clip everything above 255 to white.
    ramp = np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (16, 1))
    p = tmp_path / "ramp16.png"
    Image.fromarray(ramp).save(p)
    with Image.open(p) as img:
        assert img.mode == "I;16"
    arr = load_rgb(p)
    assert arr.shape == (16, 256, 3) and arr.min() == 0 and arr.max() == 255
    row = arr[0, :, 0].astype(int)
    assert (np.diff(row) >= 0).all() and row[128] == 128  # monotone, mid-grey in the middle
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()


def test_big_endian_sixteen_bit_and_int32_greyscale_are_scaled(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 64).round().astype(np.uint16), (16, 1))
    Image.frombytes("I;16B", (64, 16), ramp.astype(">u2").tobytes()).save(tmp_path / "be.tif")
    Image.fromarray(ramp.astype(np.int32)).save(tmp_path / "i32.tif")  # mode I, values in 0..65535
    Image.fromarray(ramp.astype(np.int32) - 100_000).save(tmp_path / "neg.tif")  # mode I, negative: min-max
    for name in ("be.tif", "i32.tif", "neg.tif"):
        arr = load_rgb(tmp_path / name)[0, :, 0]
        assert arr[0] == 0 and arr[-1] == 255 and (np.diff(arr.astype(int)) >= 0).all(), name


def test_float_tiff_loads_visible(tmp_path):
    unit = np.tile(np.linspace(0.0, 1.0, 64, dtype=np.float32), (16, 1))
    Image.fromarray(unit).save(tmp_path / "unit.tif")  # [0, 1]: x 255
    Image.fromarray(unit * 1000 - 500).save(tmp_path / "wide.tif")  # [-500, 500]: min-max
    unit_arr = load_rgb(tmp_path / "unit.tif")
    assert unit_arr.max() == 255 and unit_arr[0, 32, 0] == round(32 / 63 * 255)
    wide_arr = load_rgb(tmp_path / "wide.tif")
    assert wide_arr[0, 0, 0] == 0 and wide_arr[0, -1, 0] == 255


def test_directory_and_fifo_are_not_regular_files(tmp_path):
    (tmp_path / "dir.png").mkdir()
    os.mkfifo(tmp_path / "pipe.png")  # checked with stat only: opening it would block
    for name, what in (("dir.png", "directory"), ("pipe.png", "FIFO")):
        with pytest.raises(ImageLoadError) as err:
            load_rgb(tmp_path / name)
        assert err.value.kind == ErrorKind.NOT_A_REGULAR_FILE
        assert name in str(err.value) and what in str(err.value)


def test_contained_path_refuses_a_symlink_out_of_the_root(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside.png"
    root.mkdir()
    _png(outside)
    _png(root / "inside.png")
    (root / "escape.png").symlink_to(outside)
    (root / "alias.png").symlink_to(root / "inside.png")  # a link that stays inside is fine
    assert contained_path(root, "alias.png") == root / "alias.png"
    with pytest.raises(ImageLoadError) as err:
        contained_path(root, "escape.png")
    assert err.value.kind == ErrorKind.UNSAFE_PATH
    assert "escape.png" in str(err.value) and str(outside.resolve()) in str(err.value)
    with pytest.raises(ImageLoadError) as err:
        contained_path(root, "../outside.png")
    assert err.value.kind == ErrorKind.UNSAFE_PATH


def test_header_pixels_reads_the_size_without_decoding(tmp_path):
    p = _png(tmp_path / "x.png", size=(30, 50))
    assert header_pixels(p) == 1500
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "dir.png").mkdir()
    assert header_pixels(tmp_path / "empty.png") == 0 and header_pixels(tmp_path / "dir.png") == 0
    assert header_pixels(p, max_pixels=1000) == 0  # refused unread by load_rgb: costs no memory
