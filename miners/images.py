"""Safe image loading: a path in, an RGB uint8 array or a named error out.

Consumes an image path (already checked against its dataset root by the importer); produces an
H x W x 3 uint8 array in the *displayed* orientation (EXIF transpose applied), or raises
`ImageLoadError` whose `kind` is one of the status values of `storage.schemas.ErrorKind`. Nothing here
raises anything else for a bad file, so one corrupt image can never take down a shard.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from storage.schemas import ErrorKind

# Decompression-bomb guard: pedestrian crops are small, so anything above this many pixels is
# hostile or a mistake. PIL's own global limit is left alone; we check before decoding.
MAX_IMAGE_PIXELS = 40_000_000
MIN_SIDE_PX = 8


class ImageLoadError(Exception):
    def __init__(self, kind: ErrorKind, message: str):
        super().__init__(message)
        self.kind = kind


def load_rgb(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode `path` fully into an H x W x 3 uint8 array, or raise ImageLoadError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ImageLoadError(ErrorKind.MISSING, f"{path}: no such file")
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
                rgb = img.convert("RGB")
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageLoadError(ErrorKind.BOMB, f"{path}: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ImageLoadError(ErrorKind.UNREADABLE, f"{path}: not a recognised image ({exc})") from exc
    except PermissionError as exc:
        raise ImageLoadError(ErrorKind.UNREADABLE, f"{path}: {exc}") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # PIL reports truncated/corrupt pixel data as OSError ("image file is truncated", "broken data stream").
        raise ImageLoadError(ErrorKind.CORRUPT, f"{path}: {exc}") from exc
    array = np.asarray(rgb, dtype=np.uint8)
    if min(array.shape[:2]) < MIN_SIDE_PX:
        raise ImageLoadError(
            ErrorKind.TOO_SMALL, f"{path}: {array.shape[1]}x{array.shape[0]} is below {MIN_SIDE_PX}px"
        )
    return array
