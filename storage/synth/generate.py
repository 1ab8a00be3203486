"""The synthetic P-VLG benchmark: drawn pedestrians, long captions and exact region ground truth.

Consumes a `SynthConfig` (identities, images per identity, seed, split fraction, image size). Produces
a `pvlg`-format dataset (README "The pvlg format") under an output directory:

    DIR/pvlg.json                                  one record per image (written last, atomically)
    DIR/imgs/<split>/<pid:05d>/<pid:05d>_<k:02d>.png
    DIR/synth_config.json                          the parameters that produced it
    DIR/synth_identities.json                      each identity's clothing attributes (for audits)

Every random stream is seeded from (seed, stream, identity[, image]), so the output is byte-identical
for a seed whatever the number of worker processes. Drawing lives in `storage.synth.draw`, captions in
`storage.synth.text`.

The command line is `python -m storage.synth` (storage/synth/__main__.py).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from storage.rle import encode_mask, mask_to_box_xyxy
from storage.schemas import BODY_PARTS
from storage.synth.draw import MIN_PART_PX, PersonAttrs, draw_image, sample_person
from storage.synth.text import SceneFacts, build_caption

SYNTH_VERSION = "1"
ANNOTATION_FILE = "pvlg.json"
CONFIG_FILE = "synth_config.json"
IDENTITIES_FILE = "synth_identities.json"
# Independent random streams, so changing one part of the generator never reshuffles another.
_ID_STREAM, _SPLIT_STREAM, _IMAGE_STREAM, _TEXT_STREAM = 1, 2, 3, 4
_WORD = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*")


@dataclass(frozen=True)
class SynthConfig:
    identities: int
    images_per_id: int
    seed: int = 0
    test_fraction: float = 0.25  # share of identities in the test split; the rest are train
    width: int = 128  # pixels
    height: int = 256  # pixels
    captions_per_image: int = 2

    def validate(self) -> None:
        problems = []
        if self.identities < 1:
            problems.append(f"identities must be >= 1, got {self.identities}")
        if not 1 <= self.images_per_id <= 999:
            problems.append(f"images-per-id must be in [1, 999], got {self.images_per_id}")
        if not 0.0 <= self.test_fraction < 1.0:
            problems.append(f"test-fraction must be in [0, 1), got {self.test_fraction}")
        if self.width < 32 or self.height < 64:
            problems.append(f"image size must be at least 32 x 64 pixels, got {self.width} x {self.height}")
        if self.captions_per_image < 1:
            problems.append(f"captions-per-image must be >= 1, got {self.captions_per_image}")
        if self.seed < 0:
            problems.append(f"seed must be >= 0, got {self.seed}")
        if problems:
            raise ValueError("invalid synthetic benchmark config: " + "; ".join(problems))


def sample_identities(n: int, seed: int) -> list[PersonAttrs]:
    """Attributes of identities 1..n, pairwise different in clothing (redrawn on a clash)."""
    seen: set[tuple] = set()
    people = []
    for pid in range(1, n + 1):
        for attempt in range(1000):
            attrs = sample_person(np.random.default_rng([seed, _ID_STREAM, pid, attempt]))
            if attrs.signature() not in seen:
                break
        else:
            raise RuntimeError(f"could not draw a distinct identity {pid} after 1000 attempts")
        seen.add(attrs.signature())
        people.append(attrs)
    return people


def split_identities(n: int, test_fraction: float, seed: int) -> list[str]:
    """Split of identities 1..n (index pid - 1): test_fraction of them test, at least one of each when n >= 2."""
    n_test = int(round(n * test_fraction))
    if test_fraction > 0 and n >= 2:
        n_test = min(max(n_test, 1), n - 1)
    test = set(np.random.default_rng([seed, _SPLIT_STREAM]).permutation(n)[:n_test].tolist())
    return ["test" if i in test else "train" for i in range(n)]


def processed_tokens(caption: str) -> list[str]:
    """Lowercase word tokens, as in CUHK-PEDES' `processed_tokens` (punctuation dropped)."""
    return _WORD.findall(caption.lower())


def _regions(part_map_hw: np.ndarray) -> tuple[list[dict], dict[str, int]]:
    """Regions (ids 0.. in BODY_PARTS order) of the parts visible in the image, and label → id."""
    regions, visible = [], {}
    for index, label in enumerate(BODY_PARTS):
        mask = part_map_hw == index
        if int(mask.sum()) < MIN_PART_PX:
            continue
        box = mask_to_box_xyxy(mask)
        visible[label] = len(regions)
        regions.append(
            {"id": len(regions), "label": label, "bbox": [float(v) for v in box], "mask": encode_mask(mask)}
        )
    return regions, visible


def _render_identity(job: tuple[SynthConfig, int, str, PersonAttrs, str]) -> list[dict]:
    """Draw, save and annotate every image of one identity (runs in a worker process)."""
    cfg, pid, split, attrs, imgs_root = job
    records = []
    folder = Path(imgs_root) / split / f"{pid:05d}"
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(cfg.images_per_id):
        drawn = draw_image(
            attrs, np.random.default_rng([cfg.seed, _IMAGE_STREAM, pid, k]), cfg.width, cfg.height
        )
        regions, visible = _regions(drawn.part_map_hw)
        name = f"{pid:05d}_{k:02d}.png"
        # Fixed PNG settings and no metadata chunks: same pixels → same bytes.
        Image.fromarray(drawn.rgb_hwc).save(folder / name, format="PNG", compress_level=1)
        text_rng = np.random.default_rng([cfg.seed, _TEXT_STREAM, pid, k])
        scene = SceneFacts(view=drawn.view, brightness=drawn.brightness)
        captions: list[str] = []
        links: list[list[dict]] = []
        for _ in range(cfg.captions_per_image):
            for _attempt in range(20):  # captions of one image must differ (importers drop duplicates)
                text, caption_links = build_caption(attrs, visible, scene, text_rng)
                if text not in captions:
                    break
            captions.append(text)
            links.append(caption_links)
        records.append(
            {
                "id": pid,
                "file_path": f"{split}/{pid:05d}/{name}",
                "split": split,
                "captions": captions,
                "processed_tokens": [processed_tokens(c) for c in captions],
                "regions": regions,
                "links": links,
            }
        )
    return records


def _dump_json(obj, path: Path) -> None:
    """Deterministic JSON, written to a temp file then renamed so readers never see half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True) + "\n")
    os.replace(tmp, path)


def _prepare_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out}: exists and is not a directory")
    if not out.exists() or not any(out.iterdir()):
        out.mkdir(parents=True, exist_ok=True)
        return
    if not overwrite:
        raise FileExistsError(
            f"{out}: directory is not empty; pass --overwrite to replace a previous synthetic benchmark"
        )
    if not (out / CONFIG_FILE).is_file():
        raise FileExistsError(
            f"{out}: not empty and holds no {CONFIG_FILE}, so it is not a synthetic benchmark; refusing to overwrite it"
        )
    # Replace only what a previous run wrote; anything else in the directory is left alone.
    for name in (ANNOTATION_FILE, CONFIG_FILE, IDENTITIES_FILE):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / "imgs", ignore_errors=True)


def generate(
    out_dir: str | Path,
    identities: int,
    images_per_id: int,
    seed: int = 0,
    *,
    test_fraction: float = 0.25,
    width: int = 128,
    height: int = 256,
    captions_per_image: int = 2,
    workers: int | None = None,
    overwrite: bool = False,
) -> dict:
    """Write the benchmark to `out_dir`; returns a summary (counts, paths, seconds)."""
    cfg = SynthConfig(identities, images_per_id, seed, test_fraction, width, height, captions_per_image)
    cfg.validate()
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    workers = workers or os.cpu_count() or 1
    out = Path(out_dir)
    _prepare_out_dir(out, overwrite)
    start = time.perf_counter()

    people = sample_identities(cfg.identities, cfg.seed)
    splits = split_identities(cfg.identities, cfg.test_fraction, cfg.seed)
    imgs_root = str(out / "imgs")
    jobs = [(cfg, pid, splits[pid - 1], people[pid - 1], imgs_root) for pid in range(1, cfg.identities + 1)]
    _dump_json({"synth_version": SYNTH_VERSION, **asdict(cfg)}, out / CONFIG_FILE)
    _dump_json(
        [
            {"id": pid, "split": splits[pid - 1], "attributes": people[pid - 1].to_json()}
            for pid in range(1, cfg.identities + 1)
        ],
        out / IDENTITIES_FILE,
    )

    # Render identities in parallel; imap keeps identity order, so the output does not depend on workers.
    records: list[dict] = []
    if workers == 1 or len(jobs) == 1:
        for job in jobs:
            records.extend(_render_identity(job))
    else:
        chunk = max(1, len(jobs) // (workers * 8))
        # spawn, not fork: callers may hold threads (Prefect, Ray, torch) that fork would copy half-locked.
        with mp.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
            for batch in pool.imap(_render_identity, jobs, chunksize=chunk):
                records.extend(batch)
    _dump_json(records, out / ANNOTATION_FILE)

    return {
        "out_dir": str(out),
        "annotation_path": str(out / ANNOTATION_FILE),
        "identities": cfg.identities,
        "train_identities": splits.count("train"),
        "test_identities": splits.count("test"),
        "images": len(records),
        "captions": sum(len(r["captions"]) for r in records),
        "workers": workers,
        "seconds": round(time.perf_counter() - start, 2),
    }
