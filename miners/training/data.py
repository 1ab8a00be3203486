"""In-memory training/evaluation data for the CLIP trainer.

Consumes a manifest table (plus its dataset root), a processor, and optionally mined pairs; produces
`ClipData`: every image decoded once (safely) and resized to the model input as uint8, every caption
tokenised once — whole (truncated to CLIP's context) and per sentence (for sentence pooling) — and,
when pairs are given, each caption's (sentence tokens, region box in model-input pixels, reliability).
Images that fail to load are skipped *and reported* (`skipped`), never silently dropped.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from miners.encoders import input_size_hw, tokenize

if TYPE_CHECKING:  # ClipData and the trainer need neither pyarrow nor spaCy; building the data does
    import pyarrow as pa

    from miners.captions import CaptionSplitter


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
    decode_cache: dict = field(default_factory=dict)  # the decode cache's path, hit, MiB (empty: none)

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


# ---------------------------------------------------------------------------------------------- decoding

DECODE_CACHE_ENV = "RSM_DECODE_CACHE"  # a folder, or "off"; default ~/.cache/rsm-miners/decoded
DECODE_WORKERS_ENV = "RSM_DECODE_WORKERS"  # threads that decode (default: the CPUs this process may use)
DECODE_CACHE_VERSION = 1  # bump when decoding or resizing changes: older entries are then never read


@dataclass
class DecodedImages:
    images_u8: torch.Tensor  # N_ok x 3 x H x W uint8, in the order given, skipped ones left out
    scales_xy: list[tuple[float, float]]  # model-input px per original px, per decoded image
    skipped: dict[str, str]  # image_id → why it could not be read
    cache: dict  # {"path", "hit", "mb"} or {} without a cache


def decode_cache_dir() -> Path | None:
    value = os.environ.get(DECODE_CACHE_ENV, "")
    if value.lower() == "off":
        return None
    if value:
        return Path(value)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "rsm-miners" / "decoded"


def _decode_key(root: Path, items: list[tuple[str, str]], size_hw: tuple[int, int]) -> str:
    """What the decoded tensor depends on: the resize, and each image's path, size and mtime (an image
    replaced on disk makes another key; so does a reordered or extended list)."""
    h = hashlib.sha256(json.dumps([DECODE_CACHE_VERSION, list(size_hw), str(root)]).encode())
    for iid, rel in items:
        try:
            st = (root / rel).stat()
            h.update(f"{iid}\0{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{iid}\0{rel}\0missing\n".encode())
    return h.hexdigest()[:24]


def _decode_one(root: Path, rel: str, size_hw: tuple[int, int]):
    from miners.images import ImageLoadError, contained_path, load_rgb

    try:
        # Training reads the same manifests as mining, so the same root containment holds.
        rgb = load_rgb(contained_path(root, rel))
    except ImageLoadError as exc:
        return None, f"{exc.kind}: {exc}"
    return (_resize_u8(rgb, size_hw), (size_hw[1] / rgb.shape[1], size_hw[0] / rgb.shape[0])), None


def decode_images(root: Path, items: list[tuple[str, str]], size_hw: tuple[int, int]) -> DecodedImages:
    """Decode (image_id, path) items to uint8 tensors of the model input size, with several threads (PIL
    decodes and resizes outside the GIL), through a cache on disk reused across runs: a second run, and
    every ablation on the same data and input size, reads one file instead of decoding again."""
    cache_dir = decode_cache_dir()
    key = _decode_key(root, items, size_hw) if cache_dir is not None else ""
    if cache_dir is not None and (cache_dir / f"{key}.json").is_file():
        meta = json.loads((cache_dir / f"{key}.json").read_text())
        array = np.load(cache_dir / f"{key}.npy")
        return DecodedImages(
            torch.from_numpy(array),
            [tuple(x) for x in meta["scales_xy"]],
            meta["skipped"],
            {"path": str(cache_dir / f"{key}.npy"), "hit": True, "mb": round(array.nbytes / 2**20, 1)},
        )
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = int(os.environ.get(DECODE_WORKERS_ENV, 0)) or max(1, cpus)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(lambda item: _decode_one(root, item[1], size_hw), items))
    tensors, scales, skipped = [], [], {}
    for (iid, _), (done, error) in zip(items, results, strict=True):
        if done is None:
            skipped[iid] = error
        else:
            tensors.append(done[0])
            scales.append(done[1])
    images = torch.stack(tensors) if tensors else torch.zeros((0, 3, *size_hw), dtype=torch.uint8)
    cache: dict = {}
    if cache_dir is not None:
        try:  # written beside, then renamed; the .json (written last) marks a whole entry
            cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = cache_dir / f".{key}.{os.getpid()}.npy"
            np.save(tmp, images.numpy())
            tmp.replace(cache_dir / f"{key}.npy")
            meta_tmp = cache_dir / f".{key}.{os.getpid()}.json"
            meta_tmp.write_text(json.dumps({"scales_xy": scales, "skipped": skipped, "n": len(items)}))
            meta_tmp.replace(cache_dir / f"{key}.json")
            cache = {
                "path": str(cache_dir / f"{key}.npy"),
                "hit": False,
                "mb": round(images.numpy().nbytes / 2**20, 1),
            }
        except OSError as exc:  # a read-only or full disk costs the next run a decode, nothing else
            cache = {"path": str(cache_dir), "hit": False, "mb": 0.0, "error": str(exc)}
    return DecodedImages(images, scales, skipped, cache)


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
    from miners.captions import CaptionSplitter

    splitter = splitter or CaptionSplitter(split_clauses=False)
    rows = manifest.to_pylist()

    first_rows, seen = [], set()  # each image once, at its first row (the order images are stacked in)
    for r in rows:
        if r["image_id"] not in seen:
            seen.add(r["image_id"])
            first_rows.append(r)
    decoded = decode_images(root, [(r["image_id"], r["image_path"]) for r in first_rows], size_hw)
    skipped = decoded.skipped
    image_index: dict[str, int] = {}
    image_ids, image_pids, gt_regions = [], [], []
    for row in first_rows:
        iid = row["image_id"]
        if iid not in skipped:
            image_index[iid] = len(image_ids)
            image_ids.append(iid)
            image_pids.append(row["person_id"])
            gt_regions.append(json.loads(row["gt_regions"]) if row.get("gt_regions") else None)
    keep_rows = [r for r in rows if r["image_id"] not in skipped]
    images, scales = decoded.images_u8, decoded.scales_xy

    captions = [r["caption"] for r in keep_rows]
    units = splitter.split_many(captions)
    sentence_texts = [[u.text for u in us] or [cap] for us, cap in zip(units, captions, strict=True)]
    cap_sentence_tokens = tokenize_nested(processor, sentence_texts)

    data = ClipData(
        images_u8=images,
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
        decode_cache=decoded.cache,
    )
    data.local_pairs = _attach_pairs(
        data, processor, pairs, use_reliability, reliability_threshold, max_pairs_per_caption
    )
    return data


def tokenize_nested(processor, texts: list[list[str]]) -> list[list[list[int]]]:
    """Token id lists for lists of texts (per caption, its sentences), tokenised in one call."""
    flat = [t for ts in texts for t in ts]
    tokens = tokenize(processor, flat) if flat else []
    out, pos = [], 0
    for ts in texts:
        out.append(tokens[pos : pos + len(ts)])
        pos += len(ts)
    return out


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
