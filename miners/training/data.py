"""In-memory training/evaluation data for the CLIP trainer.

Consumes a manifest table (plus its dataset root), a processor, and optionally mined pairs; produces
`ClipData`: every image decoded once (safely) and resized to the model input as uint8, every caption
tokenised once — whole (truncated to CLIP's context) and per sentence (for sentence pooling) — and,
when pairs are given, each caption's (sentence tokens, region box in model-input pixels, reliability).
Images that fail to load are skipped *and reported* (`skipped`), never silently dropped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from miners.captions import CaptionSplitter
from miners.encoders import input_size_hw, tokenize
from miners.images import ImageLoadError, contained_path, load_rgb


@dataclass
class LocalPair:
    token_ids: list[int]
    box_xyxy: np.ndarray  # 4, model-input pixels
    weight: float  # reliability (or 1.0 for uniform weighting)
    region_id: int


@dataclass
class ClipData:
    images_u8: torch.Tensor  # N_img x 3 x H x W uint8, model input size
    image_ids: list[str]
    image_pids: np.ndarray  # N_img
    cap_image_index: np.ndarray  # N_cap → row of images_u8
    cap_pids: np.ndarray  # N_cap
    sample_ids: list[str]
    captions: list[str]
    cap_tokens: list[list[int]]  # whole caption, truncated to the context length
    cap_sentence_tokens: list[list[list[int]]]  # one token list per sentence
    cap_n_sentences: np.ndarray  # N_cap
    cap_gt_links: list[list[dict] | None]  # pvlg ground-truth links, per caption
    image_gt_regions: list[list[dict] | None]  # pvlg ground-truth regions (boxes in ORIGINAL pixels)
    image_scale_xy: np.ndarray  # N_img x 2: model-input px per original px
    local_pairs: list[list[LocalPair]] = field(default_factory=list)  # per caption
    skipped: dict[str, str] = field(default_factory=dict)  # image_id → error message

    def __len__(self) -> int:
        return len(self.sample_ids)


def manifest_root(table: pa.Table, fallback: str | Path | None = None) -> Path:
    meta = table.schema.metadata or {}
    root = meta.get(b"rsm.root")
    if root is None and fallback is None:
        raise ValueError("manifest has no rsm.root metadata; pass the dataset root explicitly")
    return Path(root.decode() if root is not None else fallback)


def _resize_u8(rgb: np.ndarray, size_hw: tuple[int, int]) -> torch.Tensor:
    img = Image.fromarray(rgb).resize((size_hw[1], size_hw[0]), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).contiguous()


def build_clip_data(
    manifest: pa.Table,
    processor,
    root: str | Path | None = None,
    splitter: CaptionSplitter | None = None,
    pairs: pa.Table | None = None,
    use_reliability: bool = True,
    reliability_threshold: float = 0.5,
    max_pairs_per_caption: int = 8,
) -> ClipData:
    """Decode and tokenise the manifest rows (any split: filter the table first)."""
    root = manifest_root(manifest, root)
    size_hw = input_size_hw(processor)
    splitter = splitter or CaptionSplitter(split_clauses=False)
    rows = manifest.to_pylist()

    image_index: dict[str, int] = {}
    images, image_ids, image_pids, scales, gt_regions = [], [], [], [], []
    skipped: dict[str, str] = {}
    keep_rows = []
    for row in rows:
        iid = row["image_id"]
        if iid in skipped:
            continue
        if iid not in image_index:
            try:
                # Training reads the same manifests as mining, so the same root containment holds.
                rgb = load_rgb(contained_path(root, row["image_path"]))
            except ImageLoadError as exc:
                skipped[iid] = f"{exc.kind}: {exc}"
                continue
            image_index[iid] = len(images)
            images.append(_resize_u8(rgb, size_hw))
            image_ids.append(iid)
            image_pids.append(row["person_id"])
            scales.append((size_hw[1] / rgb.shape[1], size_hw[0] / rgb.shape[0]))
            gt_regions.append(json.loads(row["gt_regions"]) if row.get("gt_regions") else None)
        keep_rows.append(row)

    captions = [r["caption"] for r in keep_rows]
    units = splitter.split_many(captions)
    sentence_texts = [[u.text for u in us] or [cap] for us, cap in zip(units, captions, strict=True)]
    flat = [t for ts in sentence_texts for t in ts]
    flat_tokens = tokenize(processor, flat) if flat else []
    cap_sentence_tokens, pos = [], 0
    for ts in sentence_texts:
        cap_sentence_tokens.append(flat_tokens[pos : pos + len(ts)])
        pos += len(ts)

    data = ClipData(
        images_u8=torch.stack(images) if images else torch.zeros((0, 3, *size_hw), dtype=torch.uint8),
        image_ids=image_ids,
        image_pids=np.asarray(image_pids, dtype=np.int64),
        cap_image_index=np.asarray([image_index[r["image_id"]] for r in keep_rows], dtype=np.int64),
        cap_pids=np.asarray([r["person_id"] for r in keep_rows], dtype=np.int64),
        sample_ids=[r["sample_id"] for r in keep_rows],
        captions=captions,
        cap_tokens=tokenize(processor, captions) if captions else [],
        cap_sentence_tokens=cap_sentence_tokens,
        cap_n_sentences=np.asarray([len(us) for us in units], dtype=np.int64),
        cap_gt_links=[json.loads(r["gt_links"]) if r.get("gt_links") else None for r in keep_rows],
        image_gt_regions=gt_regions,
        image_scale_xy=np.asarray(scales, dtype=np.float32).reshape(-1, 2),
        skipped=skipped,
    )
    data.local_pairs = _attach_pairs(
        data, processor, pairs, use_reliability, reliability_threshold, max_pairs_per_caption
    )
    return data


def _attach_pairs(
    data, processor, pairs, use_reliability, threshold, max_per_caption
) -> list[list[LocalPair]]:
    """Per caption, its mined pairs at or above `threshold`, highest reliability first."""
    out: list[list[LocalPair]] = [[] for _ in range(len(data))]
    if pairs is None or pairs.num_rows == 0:
        return out
    row_of = {sid: i for i, sid in enumerate(data.sample_ids)}
    cols = pairs.select(["sample_id", "sentence", "bbox_xyxy", "reliability", "region_id"]).to_pydict()
    chosen: list[tuple[int, str, list[float], float, int]] = []
    for sid, text, box, rel, rid in zip(*cols.values(), strict=True):
        i = row_of.get(sid)
        if i is None or rel is None or rel < threshold:
            continue
        chosen.append((i, text, box, float(rel), int(rid)))
    chosen.sort(key=lambda c: (c[0], -c[3]))
    tokens = tokenize(processor, [c[1] for c in chosen]) if chosen else []
    for (i, _, box, rel, rid), tok in zip(chosen, tokens, strict=True):
        if len(out[i]) >= max_per_caption:
            continue
        sx, sy = data.image_scale_xy[data.cap_image_index[i]]
        box_in = np.asarray(box, dtype=np.float32) * np.array([sx, sy, sx, sy], dtype=np.float32)
        out[i].append(LocalPair(tok, box_in, rel if use_reliability else 1.0, rid))
    return out
