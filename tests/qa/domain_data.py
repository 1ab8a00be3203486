"""Test data for qa.domain: the synthetic benchmark as the demo draws it, and the same generator's people
drawn in another style (smaller, lower in the frame, softer, grainy: what a user's own images look like
to a calibrator fitted on the demo's), each with its manifest; a tiny CLIP; a run mined from a manifest.

Not a fixture module: tests/qa/test_domain.py builds what it needs from these helpers once per module.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image, ImageFilter


def make_dataset(root: Path, seed: int, identities: int = 16, other_style: bool = False) -> Path:
    """A pvlg dataset with its manifest.parquet; `other_style` redraws every image (see the docstring)."""
    from storage.manifest import main as manifest_main
    from storage.synth import generate

    generate(root, identities=identities, images_per_id=2, seed=seed, workers=1)
    if other_style:
        rng = np.random.default_rng(seed)
        records = json.loads((root / "pvlg.json").read_text())
        for rec in records:  # the ground truth moves with the person: the new style stays judgeable
            rec["regions"] = restyle(root / "imgs" / rec["file_path"], rec["regions"], rng)
        (root / "pvlg.json").write_text(json.dumps(records))
    rc = manifest_main(["--format", "pvlg", "--root", str(root), "--out", str(root / "manifest.parquet")])
    assert rc == 0
    return root / "manifest.parquet"


SCALE = 0.7


def restyle(path: Path, regions: list[dict], rng: np.random.Generator) -> list[dict]:
    """The person at SCALE of the frame's height, in its lower right; blurred; grain added (the image in
    place); returns the regions with their boxes and masks moved the same way."""
    from storage.rle import decode_mask, encode_mask

    img = Image.open(path).convert("RGB")
    w, h = img.size
    sw, sh = int(w * SCALE), int(h * SCALE)
    dx, dy = w - sw, h - sh
    moved = []
    for r in regions:
        x0, y0, x1, y1 = r["bbox"]
        r = {**r, "bbox": [x0 * sw / w + dx, y0 * sh / h + dy, x1 * sw / w + dx, y1 * sh / h + dy]}
        if r.get("mask"):
            small_mask = Image.fromarray(decode_mask(r["mask"]).astype(np.uint8) * 255).resize((sw, sh))
            mask = np.zeros((h, w), dtype=bool)
            mask[dy:, dx:] = np.asarray(small_mask) > 127
            r["mask"] = encode_mask(mask)
        moved.append(r)
    small = img.resize((sw, sh), Image.BILINEAR).filter(ImageFilter.GaussianBlur(1.2))
    corner = np.asarray(img)[:4, :4].reshape(-1, 3).mean(0).astype(np.uint8)
    canvas = Image.new("RGB", (w, h), tuple(int(c) for c in corner))
    canvas.paste(small, (w - small.width, h - small.height))
    arr = np.asarray(canvas).astype(np.int16) + rng.integers(-25, 26, size=(h, w, 3))
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path)
    return moved


def make_clip(manifest: Path, out: Path) -> Path:
    """An untrained tiny CLIP whose vocabulary is the manifest's captions' (as the demo's is the demo's)."""
    from miners.training.tiny_clip import TinyClipConfig, build_model, build_processor, build_tokenizer

    cfg = TinyClipConfig(vision_layers=1, text_layers=1, vision_width=64, text_width=64, embed_dim=64)
    tokenizer = build_tokenizer(pq.read_table(manifest)["caption"].to_pylist(), cfg)
    build_model(len(tokenizer), cfg, seed=0).save_pretrained(out)
    build_processor(tokenizer, cfg).save_pretrained(out)
    return out


def mine(manifest: Path, clip: Path, calibrator=None):
    """(pairs, manifest table) of a whole manifest mined in one batch."""
    from miners.rsm import RSMConfig, RSMMiner
    from storage.manifest import read_manifest

    table, meta = read_manifest(manifest)
    miner = RSMMiner(RSMConfig(clip_model=str(clip), colour_probe=False, garment_probe=False), calibrator)
    return miner.mine(table, meta["root"]).pairs, table
