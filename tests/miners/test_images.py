"""Safe image loading: every bad file becomes a named error kind, never another exception."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from miners.images import ImageLoadError, load_rgb
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
