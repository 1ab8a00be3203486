"""Visual-audit contact sheets: sampled pairs per reliability band, each tile the image with the
pair's region box (and mask outline), its sentence, reliability and, where ground truth exists, a
green / red verdict frame.

Consumes committed pairs shard files, the dataset manifest (image paths) and its ground truth (from
`qa.truth.load_ground_truth`); produces sheet_<band>.png files drawn with PIL. A missing or unreadable
image becomes a grey tile that says why, not an error.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
from PIL import Image, ImageDraw, ImageFont

from miners.images import ImageLoadError, load_rgb
from storage.rle import decode_mask
from storage.schemas import ErrorKind
from storage.truth import judge_pairs

TILE_W_PX = 168
IMAGE_H_PX = 224
TEXT_LINES = 7
# Reliability bands of the audit sheets: name -> [lo, hi)
BANDS = {"high": (0.8, None), "mid": (0.3, 0.8), "low": (None, 0.3)}
COLOURS = {True: (40, 160, 60), False: (210, 40, 40), None: (130, 130, 130)}


@dataclass(frozen=True)
class SheetItem:
    image_path: Path | None
    bbox_xyxy: tuple[float, float, float, float]  # pixels of the image as loaded (EXIF transposed)
    mask_rle: str | None
    sentence: str
    reliability: float
    correct: bool | None  # None: no ground truth
    region_label: str | None
    sample_id: str


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _outline(mask_hw: np.ndarray) -> np.ndarray:
    """Boundary pixels of a boolean mask, thickened to 2 px so they survive downscaling."""
    inner = mask_hw.copy()
    inner[1:, :] &= mask_hw[:-1, :]
    inner[:-1, :] &= mask_hw[1:, :]
    inner[:, 1:] &= mask_hw[:, :-1]
    inner[:, :-1] &= mask_hw[:, 1:]
    edge = mask_hw & ~inner
    thick = edge.copy()
    thick[1:, :] |= edge[:-1, :]
    thick[:, 1:] |= edge[:, :-1]
    return thick


def _tile_image(item: SheetItem) -> Image.Image:
    """The item's image with its region drawn, fitted into TILE_W_PX x IMAGE_H_PX."""
    canvas = Image.new("RGB", (TILE_W_PX, IMAGE_H_PX), (235, 235, 235))
    try:
        if item.image_path is None:
            raise ImageLoadError(ErrorKind.MISSING, "image path unknown (no manifest row)")
        rgb = load_rgb(item.image_path)
    except ImageLoadError as exc:
        draw = ImageDraw.Draw(canvas)
        draw.multiline_text(
            (6, 8), "\n".join(textwrap.wrap(str(exc), 24)[:8]), fill=(90, 90, 90), font=_font(10)
        )
        return canvas
    if item.mask_rle:
        try:
            mask = decode_mask(item.mask_rle)
            if mask.shape == rgb.shape[:2]:
                rgb = rgb.copy()
                rgb[_outline(mask)] = (255, 220, 0)
        except (ValueError, KeyError, TypeError):
            pass  # a bad RLE must not hide the box; the data checks report value problems
    h, w = rgb.shape[:2]
    scale = min(TILE_W_PX / w, IMAGE_H_PX / h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    img = Image.fromarray(rgb).resize(size, Image.BILINEAR)
    ox, oy = (TILE_W_PX - size[0]) // 2, (IMAGE_H_PX - size[1]) // 2
    canvas.paste(img, (ox, oy))
    box = _tile_box(item.bbox_xyxy, scale, (ox, oy))
    ImageDraw.Draw(canvas).rectangle(box, outline=(0, 200, 255), width=2)
    return canvas


def _tile_box(
    bbox_xyxy: tuple[float, float, float, float], scale: float, offset_xy: tuple[int, int]
) -> list[float]:
    """An image-pixel box (exclusive max) as an inclusive [x0, y0, x1, y1] rectangle of the tile.

    Downscaling a very wide or tall image shrinks a thin box below one pixel, and its inclusive corner
    (`- 1`) then lands before its start: PIL refuses such a rectangle and the whole report fails. So
    each side keeps at least 1 px (x1 >= x0, y1 >= y0) and the box stays inside the tile."""
    x0, y0, x1, y1 = (float(v) for v in bbox_xyxy)
    left, right = _tile_span(x0, x1, scale, offset_xy[0], TILE_W_PX)
    top, bottom = _tile_span(y0, y1, scale, offset_xy[1], IMAGE_H_PX)
    return [left, top, right, bottom]


def _tile_span(lo: float, hi: float, scale: float, offset: int, tile_px: int) -> tuple[float, float]:
    """[lo, hi) in image pixels → inclusive [start, end] in tile pixels, start <= end, both in the tile."""
    start = min(max(offset + lo * scale, 0.0), tile_px - 1.0)
    end = min(max(offset + hi * scale - 1, start), tile_px - 1.0)
    return start, end


def contact_sheet(items: list[SheetItem], path: Path, title: str, columns: int = 6) -> Path:
    """A grid of tiles (image + region, wrapped text, reliability, correct/incorrect marker)."""
    text_h = 14 * TEXT_LINES + 8
    tile_h = IMAGE_H_PX + text_h
    header_h = 30
    rows = max(1, math.ceil(len(items) / columns))
    sheet = Image.new("RGB", (columns * (TILE_W_PX + 6) + 6, header_h + rows * (tile_h + 6) + 6), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((8, 7), title if items else f"{title} — no pairs in this band", fill="black", font=_font(15))
    for i, item in enumerate(items):
        x = 6 + (i % columns) * (TILE_W_PX + 6)
        y = header_h + (i // columns) * (tile_h + 6)
        colour = COLOURS[item.correct]
        sheet.paste(_tile_image(item), (x, y))
        draw.rectangle([x - 2, y - 2, x + TILE_W_PX + 1, y + tile_h + 1], outline=colour, width=3)
        verdict = {True: "CORRECT", False: "WRONG", None: "no truth"}[item.correct]
        head = f"rel {item.reliability:.2f}  {verdict}"
        draw.text((x + 3, y + IMAGE_H_PX + 2), head, fill=colour, font=_font(12))
        label = f"[{item.region_label or '?'}] "
        lines = textwrap.wrap(label + item.sentence, 27)[: TEXT_LINES - 1]
        draw.multiline_text(
            (x + 3, y + IMAGE_H_PX + 17), "\n".join(lines), fill="black", font=_font(11), spacing=2
        )
    sheet.save(path, format="PNG", optimize=True)
    return path


def sample_band(files: list[tuple[int, Path]], band: str, k: int, seed: int) -> tuple[pl.DataFrame, int]:
    """Up to `k` pairs of a reliability band, chosen by `seed` among the band's rows in shard order.

    Counts the band per shard, draws global positions, then reads only the shards that hold them
    (memory: one shard)."""
    lo, hi = BANDS[band]
    cond = pl.lit(True)
    if lo is not None:
        cond = cond & (pl.col("reliability") >= lo)
    if hi is not None:
        cond = cond & (pl.col("reliability") < hi)
    counts = [pl.scan_parquet(str(path)).filter(cond).select(pl.len()).collect().item() for _, path in files]
    total = int(sum(counts))
    if total == 0 or k <= 0:
        return pl.DataFrame(), total
    rng = np.random.default_rng([seed, list(BANDS).index(band)])
    chosen = np.sort(rng.choice(total, size=min(k, total), replace=False))
    starts = np.cumsum([0, *counts])
    parts = []
    for (shard_id, path), start, stop in zip(files, starts[:-1], starts[1:], strict=True):
        local = chosen[(chosen >= start) & (chosen < stop)] - start
        if local.size:
            rows = pl.scan_parquet(str(path)).filter(cond).with_row_index("_i")
            parts.append(
                rows.filter(pl.col("_i").is_in(local.tolist()))
                .with_columns(pl.lit(shard_id, dtype=pl.Int32).alias("_shard"))
                .collect()
            )
    return pl.concat(parts), total


def draw_sheets(
    files: list[tuple[int, Path]],
    out: Path,
    manifest_path: Path | None,
    root: str | None,
    gt: pl.DataFrame | None,
    k: int,
    seed: int,
) -> dict[str, dict]:
    """One contact sheet per reliability band of the pairs `files` (shard id, path) in `out`
    (sheet_<band>.png); returns band -> file, range,
    pairs in band and pairs shown. Images are `root / image_path` (manifest row, else image_id); pairs
    are judged against `gt` (from `qa.noise.load_ground_truth`) when given."""
    sheets = {}
    for band, (lo, hi) in BANDS.items():
        rows, in_band = sample_band(files, band, k, seed)
        paths: dict[str, str] = {}
        correct = [None] * rows.height
        if rows.height and manifest_path is not None:
            ids = rows.select("sample_id").unique()
            found = pl.scan_parquet(str(manifest_path)).join(ids.lazy(), on="sample_id", how="semi")
            paths = dict(found.select("sample_id", "image_path").collect().iter_rows())
            if gt is not None:
                has, _, ok = judge_pairs(rows.to_arrow(), gt.join(ids, on="sample_id", how="semi").to_arrow())
                correct = [bool(c) if h else None for h, c in zip(has, ok, strict=True)]
        items = [
            SheetItem(
                image_path=Path(root) / paths.get(r["sample_id"], r["image_id"]) if root else None,
                bbox_xyxy=tuple(r["bbox_xyxy"]),
                mask_rle=r["mask_rle"],
                sentence=r["sentence"],
                reliability=float(r["reliability"]),
                correct=correct[i],
                region_label=r["region_label"],
                sample_id=r["sample_id"],
            )
            for i, r in enumerate(rows.iter_rows(named=True))
        ]
        span = f"[{lo if lo is not None else 0:g}, {hi if hi is not None else 1:g}{')' if hi is not None else ']'}"
        name = f"sheet_{band}.png"
        contact_sheet(items, out / name, f"{band} reliability {span}: {len(items)} of {in_band} pairs")
        sheets[band] = {"file": name, "range": span, "in_band": in_band, "shown": len(items)}
    return sheets


__all__ = ["BANDS", "SheetItem", "contact_sheet", "draw_sheets", "sample_band"]
