"""Safe image loading: a path in, an RGB uint8 array or a named error out.

Consumes an image path, or a dataset root and a path relative to it (`contained_path` re-checks at
mining time that it still resolves inside the root: a file swapped for a symlink after import must not
be read); produces an H x W x 3 uint8 array in the *displayed* orientation (EXIF transpose applied),
with 16-bit, 32-bit and float greyscale scaled onto 0..255, or raises `ImageLoadError` whose `kind` is
one of the status values of `storage.schemas.ErrorKind`. Nothing here raises anything else for a bad
file, so one corrupt image can never take down a shard. `header_pixels` reads an image's size from its
header without decoding (what a batch's pixel budget is counted in).
"""

from __future__ import annotations

import os
import stat
import struct
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from storage.schemas import ErrorKind

# Decompression-bomb guard: pedestrian crops are small, so anything above this many pixels is
# hostile or a mistake. PIL's own global limit is left alone; we check before decoding.
MAX_IMAGE_PIXELS = 40_000_000
MIN_SIDE_PX = 8

# Greyscale modes whose samples do not fit a byte: convert("RGB") would clip them at 255 (or, for
# floats in [0, 1], leave them black), so they are scaled onto 0..255 first.
_UINT16_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
_UINT16_MAX = 65535
_UINT16_PER_UINT8 = 257  # 65535 / 255: maps the full 16-bit range exactly onto 0..255

_FILE_TYPES = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


class ImageLoadError(Exception):
    def __init__(self, kind: ErrorKind, message: str):
        super().__init__(message)
        self.kind = kind


def contained_path(root: str | Path, image_path: str) -> Path:
    """`root / image_path`, or ImageLoadError(UNSAFE_PATH) if it resolves outside `root`.

    The importer checked this once; the file may have been swapped for a symlink since, so the miner
    checks again right before reading. The unresolved path is returned so messages name the file as
    the manifest does."""
    root = Path(root)
    path = root / image_path
    # Lexical refusals first, so an absolute or '..' path never makes a single system call outside.
    parts = Path(image_path).parts
    if Path(image_path).is_absolute() or ".." in parts:
        raise ImageLoadError(
            ErrorKind.UNSAFE_PATH, f"{path}: the image path must be relative to {root} without '..'"
        )
    try:
        target, inside = path.resolve(), root.resolve()
    except ValueError as exc:  # an embedded NUL: no file can have this name, and none is opened
        raise ImageLoadError(ErrorKind.UNSAFE_PATH, f"{path!r}: not a valid path ({exc})") from exc
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop (Python 3.11)
        raise ImageLoadError(ErrorKind.UNREADABLE, f"{path}: cannot resolve ({exc})") from exc
    if not target.is_relative_to(inside):
        raise ImageLoadError(
            ErrorKind.UNSAFE_PATH, f"{path}: resolves to {target}, outside the dataset root {inside}"
        )
    return path


def check_regular_file(path: Path) -> None:
    """Raise ImageLoadError unless `path` (symlinks followed) is a regular file.

    Uses stat only, never open: opening a FIFO for reading would block until a writer appears."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError as exc:
        raise ImageLoadError(ErrorKind.MISSING, f"{path}: no such file") from exc
    except NotADirectoryError as exc:  # a parent component is a file
        raise ImageLoadError(ErrorKind.MISSING, f"{path}: no such file ({exc.strerror})") from exc
    except OSError as exc:  # permission on a parent, name too long, symlink loop
        raise ImageLoadError(ErrorKind.UNREADABLE, f"{path}: {exc}") from exc
    if stat.S_ISREG(mode):
        return
    what = next((name for test, name in _FILE_TYPES if test(mode)), f"file type {stat.S_IFMT(mode):o}")
    raise ImageLoadError(ErrorKind.NOT_A_REGULAR_FILE, f"{path}: is {what}, not a regular file")


def header_pixels(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> int:
    """width x height from the image header (nothing decoded; EXIF rotation does not change it), or 0
    for a file `load_rgb` will reject before decoding anything (not a file, unreadable, a bomb)."""
    path = Path(path)
    try:
        check_regular_file(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
    except Exception:  # only a budget estimate: load_rgb names the problem when it reads the file
        return 0
    pixels = width * height
    return pixels if pixels <= max_pixels else 0


def load_rgb(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode `path` fully into an H x W x 3 uint8 array, or raise ImageLoadError naming the file."""
    path = Path(path)
    check_regular_file(path)
    try:
        with warnings.catch_warnings():
            # PIL warns (not raises) between its two bomb thresholds; treat any such warning as an error.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise ImageLoadError(
                        ErrorKind.BOMB, f"{path}: {width}x{height} exceeds {max_pixels} pixels"
                    )
                # load() decodes every byte, unlike verify(), so truncation is caught here.
                img.load()
                img = ImageOps.exif_transpose(img)
                rgb = _to_rgb(img)
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageLoadError(ErrorKind.BOMB, f"{path}: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ImageLoadError(ErrorKind.UNREADABLE, f"{path}: not a recognised image ({exc})") from exc
    except PermissionError as exc:
        raise ImageLoadError(ErrorKind.UNREADABLE, f"{path}: {exc}") from exc
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, KeyError) as exc:
        # PIL reports truncated/corrupt pixel data as OSError ("image file is truncated", "broken data
        # stream"); its plugins raise struct.error / IndexError / KeyError on malformed headers or EXIF.
        raise ImageLoadError(ErrorKind.CORRUPT, f"{path}: {exc}") from exc
    array = np.asarray(rgb, dtype=np.uint8)
    if min(array.shape[:2]) < MIN_SIDE_PX:
        raise ImageLoadError(
            ErrorKind.TOO_SMALL, f"{path}: {array.shape[1]}x{array.shape[0]} is below {MIN_SIDE_PX}px"
        )
    return array


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB of any PIL mode; wide greyscale is scaled onto 0..255 rather than clipped."""
    if img.mode in _UINT16_MODES:
        grey = _uint16_to_uint8(np.asarray(img))
    elif img.mode == "I":
        grey = _int32_to_uint8(np.asarray(img))
    elif img.mode == "F":
        grey = _float_to_uint8(np.asarray(img))
    else:
        return img.convert("RGB")
    return Image.fromarray(grey).convert("RGB")


def _uint16_to_uint8(values: np.ndarray) -> np.ndarray:
    return np.round(values.astype(np.float32) / _UINT16_PER_UINT8).astype(np.uint8)


def _int32_to_uint8(values: np.ndarray) -> np.ndarray:
    """32-bit integer greyscale: most often a 16-bit file PIL widened, so the 16-bit range when the
    values fit it, else the image's own min..max."""
    if values.size and values.min() >= 0 and values.max() <= _UINT16_MAX:
        return _uint16_to_uint8(values)
    return _min_max_to_uint8(values.astype(np.float64))


def _float_to_uint8(values: np.ndarray) -> np.ndarray:
    """Float greyscale: [0, 1] is the usual convention, anything else is stretched over min..max.
    Non-finite samples (NaN, inf) become 0 and do not count towards the range."""
    values = values.astype(np.float64)
    finite = np.isfinite(values)
    clean = np.where(finite, values, 0.0)
    if not finite.any() or (clean.min() >= 0.0 and clean.max() <= 1.0):
        return np.round(clean * 255.0).astype(np.uint8)
    return _min_max_to_uint8(values)


def _min_max_to_uint8(values: np.ndarray) -> np.ndarray:
    """Stretch the finite values over 0..255 (a constant image becomes 0); non-finite become 0."""
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(values.shape, np.uint8)
    lo, hi = values[finite].min(), values[finite].max()
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    scaled = np.where(finite, (values - lo) * scale, 0.0)
    return np.round(np.clip(scaled, 0.0, 255.0)).astype(np.uint8)
