"""The RSM entry point: a batch of manifest rows → (pairs table, per-row status table).

Consumes manifest rows (MANIFEST_SCHEMA) and their dataset root; produces a `MineResult` whose `pairs`
follow PAIRS_SCHEMA (one row per text unit: its chosen region, the matching features, a calibrated
reliability and the kept flag) and whose `status` follows STATUS_SCHEMA (exactly one row per input row:
"ok" or an error kind with its message). Models load once per `RSMMiner` (build one per worker/actor):
the splitter, the region proposer, the CLIP scorer and the calibrator. No Prefect, no Ray here.

Per batch (`images_per_batch` images): load images safely (inside the dataset root, regular files only)
→ propose regions (batched) → crop them and drop the full-size pixels, `max_batch_pixels` decoded at a
time (sizes read from the headers) → split captions (spaCy pipe) → score all crops and units of the
batch in one CLIP pass → match each unit → reliability → rows. A batch in which nothing survives
(every image unreadable, regionless or captioned with no sentences) gives no pairs, not an error.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import ClassVar

import numpy as np
import pyarrow as pa

from miners.bank import BANK_META, BankError, ReferenceBank, judged_part
from miners.calibration import CALIBRATOR_FILENAME, Calibrator, default_calibrator
from miners.images import ImageLoadError, contained_path, header_pixels, load_rgb
from miners.matching import MatchConfig, UnitMatches, match_units
from miners.regions import Regions
from storage.rle import encode_mask
from storage.schemas import PAIRS_SCHEMA, STATUS_SCHEMA, ErrorKind


@dataclass(frozen=True)
class RSMConfig:
    """Every RSM setting and its default (the flow, its CLI and the deployments derive theirs from here)."""

    clip_model: str  # from_pretrained folder (tiny bootstrapped CLIP or a real one)
    proposer: str = "prior"  # prior | sam-prompted | sam-auto
    sam_checkpoint: str | None = None
    sam_model_type: str = "vit_b"  # vit_b | vit_l | vit_h | tiny
    max_regions: int = 8
    crop_mode: str = "box"  # box | mask | blur
    split_clauses: bool = True
    colour_probe: bool = True  # the colour_logit feature (miners.attribute_probe): one more text pass
    garment_probe: bool = True  # the garment_logit feature (the same): garment variants in that pass
    match: MatchConfig = field(default_factory=MatchConfig)
    calibrator: str | None = None  # None: <clip_model>/rsm-calibrator.json if present, else the default prior
    bank: str | None = None  # reference-bank folder; None: <clip_model> if it holds rsm-bank.json, else none
    images_per_batch: int = 32
    # Decoded pixels held at once: a batch is cut further so its images' width x height sum stays
    # under this (about 200 MB of RGB at the default); one larger image still goes alone.
    max_batch_pixels: int = 64_000_000
    device: str = "auto"

    # Change speed, not output: not part of a run's identity (nor of the pairs' config_fingerprint)
    RUNTIME_FIELDS: ClassVar[tuple[str, ...]] = ("device", "images_per_batch", "max_batch_pixels")

    def __post_init__(self) -> None:
        if self.images_per_batch < 1:
            raise ValueError(f"images_per_batch must be >= 1, got {self.images_per_batch}")
        if self.max_batch_pixels < 1:
            raise ValueError(f"max_batch_pixels must be >= 1, got {self.max_batch_pixels}")

    def identity_dict(self) -> dict:
        """The fields that change the output, as plain JSON-able values."""
        d = asdict(self)
        for name in self.RUNTIME_FIELDS:
            d.pop(name)
        return d

    def fingerprint(self) -> str:
        """Hash of everything that changes the output (the device does not)."""
        return hashlib.sha256(json.dumps(self.identity_dict(), sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, d: dict) -> RSMConfig:
        d = dict(d)
        if isinstance(d.get("match"), dict):
            d["match"] = MatchConfig(**d["match"])
        return cls(**d)


# Text embeddings a miner keeps across the batches of ONE `mine` call (one shard), then forgets. The
# colour probe's variants ("a red top", "a blue top", ...) recur in most captions, so the cache saves
# most of the text pass. It is emptied at the start of every call because a cache kept across shards
# makes a shard's floats depend on what the worker mined before (an embedding computed in another
# batch differs in the last bits), which would break the byte-identical re-mining the fault tests hold
# runs to (tests/flows/test_chaos.py). 65,536 entries of 512 float32 are at most 134 MB.
TEXT_CACHE_ENTRIES = 65_536

# The stage profile's keys (MineResult.seconds), in pipeline order.
STAGES = ("load", "regions", "sentences", "scoring", "matching", "tables")


@dataclass
class MineResult:
    pairs: pa.Table
    status: pa.Table
    seconds: dict[str, float]


class RSMMiner:
    def __init__(self, cfg: RSMConfig, calibrator: Calibrator | None = None):
        """`calibrator` overrides the one `cfg` points at (used to fit or compare calibrators)."""
        # Imported here, not at the top: the flow's driver imports this module for RSMConfig and the run
        # identity, and torch, transformers and spaCy would add seconds to every command's start-up
        from miners.captions import CaptionSplitter
        from miners.clip_scorer import ClipScorer, ScorerConfig
        from miners.regions import build_proposer

        self.cfg = cfg
        self.splitter = CaptionSplitter(split_clauses=cfg.split_clauses)
        self.proposer = build_proposer(
            cfg.proposer,
            sam_checkpoint=cfg.sam_checkpoint,
            sam_model_type=cfg.sam_model_type,
            device=None if cfg.device == "auto" else cfg.device,
            max_regions=cfg.max_regions,
        )
        self.scorer = ClipScorer(
            cfg.clip_model,
            ScorerConfig(crop_mode=cfg.crop_mode, device=cfg.device, text_cache_entries=TEXT_CACHE_ENTRIES),
        )
        self.bank, self.calibrator = load_companions(cfg, self.scorer.fingerprint, calibrator)
        self.clip_fingerprint = self.scorer.fingerprint
        cal_id = hashlib.sha256(json.dumps(self.calibrator.to_json(), sort_keys=True).encode()).hexdigest()[
            :8
        ]
        bank_id = self.bank.fingerprint[:8] if self.bank is not None else "nobank"
        self.config_fingerprint = f"{cfg.fingerprint()}-{cal_id}-{bank_id}"

    # --- the batch ---------------------------------------------------------------------------------
    def mine(self, rows: pa.Table, root: str | Path) -> MineResult:
        """`seconds` is the stage profile, summed over the batches: load (headers, decode), regions
        (proposer, mask RLE), sentences (caption split), scoring (crops, CLIP forwards), matching
        (matcher, bank, colour probe, calibrator) and tables (the pairs and status columns)."""
        root = Path(root)
        self.scorer.clear_text_cache()  # a shard's bytes depend on the shard alone (see TEXT_CACHE_ENTRIES)
        pair_blocks: list[dict[str, list | np.ndarray]] = []
        status_parts = []
        seconds: dict[str, float] = dict.fromkeys(STAGES, 0.0)
        by_image: dict[str, list[dict]] = defaultdict(list)
        for row in rows.to_pylist():
            by_image[row["image_id"]].append(row)
        image_ids = list(by_image)
        for i in range(0, len(image_ids), self.cfg.images_per_batch):
            chunk = {iid: by_image[iid] for iid in image_ids[i : i + self.cfg.images_per_batch]}
            p, s = self._mine_chunk(chunk, root, seconds)
            pair_blocks += p
            status_parts += s
        t = time.perf_counter()
        pairs = _blocks_to_table(pair_blocks)
        status = pa.Table.from_pylist(status_parts, schema=STATUS_SCHEMA)
        seconds["tables"] += time.perf_counter() - t
        return MineResult(pairs=pairs, status=status, seconds=seconds)

    def _mine_chunk(self, chunk: dict[str, list[dict]], root: Path, seconds) -> tuple[list[dict], list[dict]]:
        """One batch of images → (pair column blocks, one status row per input row, in input order).

        Full-size images are decoded `max_batch_pixels` at a time and dropped once their regions are
        cropped; captions, CLIP and matching then run over the whole batch as one. So the budget bounds
        memory without changing which crops and texts share a forward (the output does not depend on
        it). Every stage tolerates an empty input: a batch where nothing survives gives no pairs."""
        status: dict[str, dict] = {}
        prepared: dict[str, _Prepared] = {}
        for part in self._pixel_budget_parts(chunk, root, seconds):
            images = self._load_images(part, root, status, seconds)
            regions = self._propose_regions(part, images, status, seconds)
            prepared |= self._prepare(images, regions, seconds)
        scored = self._split_captions(chunk, prepared, status, seconds)
        embedded = self._score(prepared, scored, seconds)
        pair_rows = self._match(scored, embedded, prepared, status, seconds)
        ordered_status = [status[r["sample_id"]] for rows in chunk.values() for r in rows]
        return pair_rows, ordered_status

    def _pixel_budget_parts(self, chunk: dict[str, list[dict]], root: Path, seconds) -> list[dict]:
        """`chunk` cut, in order, into parts of at most `max_batch_pixels` decoded pixels (headers only)."""
        t = time.perf_counter()
        image_ids = list(chunk)
        pixels = [_header_pixels(root, chunk[iid][0]["image_path"]) for iid in image_ids]
        seconds["load"] += time.perf_counter() - t
        parts = split_by_pixel_budget(pixels, self.cfg.max_batch_pixels)
        return [{image_ids[k]: chunk[image_ids[k]] for k in part} for part in parts]

    def _load_images(self, chunk, root: Path, status: dict, seconds) -> dict[str, np.ndarray]:
        t = time.perf_counter()
        images: dict[str, np.ndarray] = {}
        for iid, rows in chunk.items():
            try:
                images[iid] = load_rgb(contained_path(root, rows[0]["image_path"]))
            except ImageLoadError as exc:
                for r in rows:
                    status[r["sample_id"]] = _status(r, exc.kind, str(exc))
        seconds["load"] += time.perf_counter() - t
        return images

    def _propose_regions(self, chunk, images: dict[str, np.ndarray], status: dict, seconds) -> dict:
        t = time.perf_counter()
        loaded = list(images)
        region_list: list = []
        if loaded:  # a proposer need not accept an empty batch
            try:
                region_list = self.proposer.propose_batch([images[iid] for iid in loaded])
            except Exception:  # one bad image must not sink the batch: retry one by one
                region_list = []
                for iid in loaded:
                    try:
                        region_list.append(self.proposer.propose(images[iid]))
                    except Exception as exc:
                        region_list.append(exc)
        regions = {}
        for iid, regs in zip(loaded, region_list, strict=True):
            if isinstance(regs, Exception) or len(regs) == 0:
                kind = ErrorKind.INTERNAL if isinstance(regs, Exception) else ErrorKind.NO_REGIONS
                msg = f"region proposer {self.cfg.proposer!r}: " + (
                    repr(regs) if isinstance(regs, Exception) else "no regions"
                )
                for r in chunk[iid]:
                    status[r["sample_id"]] = _status(r, kind, f"{r['image_path']}: {msg}")
            else:
                regions[iid] = regs
        seconds["regions"] += time.perf_counter() - t
        return regions

    def _prepare(self, images: dict[str, np.ndarray], regions: dict, seconds) -> dict[str, _Prepared]:
        """What the rest of the batch needs of each image, so its pixels (and full-size masks) can go."""
        prepared = {}
        for iid, regs in regions.items():
            t = time.perf_counter()
            rles = [json.dumps(encode_mask(m)) if m is not None else None for m in regs.masks]
            t_crop = time.perf_counter()
            crops = self.scorer.region_crops(images[iid], regs)
            seconds["regions"] += t_crop - t
            seconds["scoring"] += time.perf_counter() - t_crop
            prepared[iid] = _Prepared(replace(regs, masks=[None] * len(regs)), rles, crops)
        return prepared

    def _split_captions(self, chunk, prepared: dict, status: dict, seconds) -> list[tuple[dict, list]]:
        t = time.perf_counter()
        samples = [r for iid in prepared for r in chunk[iid]]
        units = self.splitter.split_many([r["caption"] for r in samples]) if samples else []
        scored = []
        for r, us in zip(samples, units, strict=True):
            if not us:
                status[r["sample_id"]] = _status(
                    r, ErrorKind.NO_SENTENCES, f"{r['sample_id']}: caption has no sentences"
                )
            else:
                scored.append((r, us))
        seconds["sentences"] += time.perf_counter() - t
        return scored

    def _score(self, prepared: dict[str, _Prepared], scored: list, seconds) -> list[_Embedded]:
        """Per scored sample: its units' and its image's regions' embeddings (one pass for the batch)."""
        t = time.perf_counter()
        out: list[_Embedded] = []
        if scored:  # nothing to embed: the model (and its tokenizer, which fails on []) never runs
            image_order = list(prepared)
            image_pos = {iid: k for k, iid in enumerate(image_order)}
            region_emb, text_emb = self.scorer.embed_crops_and_texts(
                [prepared[iid].crops for iid in image_order], [[u.text for u in us] for _, us in scored]
            )
            variants = self._probe_variant_embeddings(scored)
            out = [
                _Embedded(
                    text_emb[j], region_emb[image_pos[r["image_id"]]], {n: v[j] for n, v in variants.items()}
                )
                for j, (r, _) in enumerate(scored)
            ]
        seconds["scoring"] += time.perf_counter() - t
        return out

    def probes(self) -> list[str]:
        """The pair columns of the attribute probes this miner runs (miners.attribute_probe.PROBES)."""
        on = {"colour_logit": self.cfg.colour_probe, "garment_logit": self.cfg.garment_probe}
        return [name for name, enabled in on.items() if enabled]

    def _probe_variant_embeddings(self, scored: list) -> dict[str, list[list[list[np.ndarray]]]]:
        """Per probe, per sample, per unit, per probed word: the embeddings of its variants (one text
        pass for the whole batch and every probe; each distinct text once)."""
        from miners.attribute_probe import PROBES  # spaCy: see __init__

        groups = {n: [[PROBES[n](u.text) for u in us] for _, us in scored] for n in self.probes()}
        flat = [t for g in groups.values() for sample in g for unit in sample for word in unit for t in word]
        emb = self.scorer.embed_texts(flat).cpu().numpy().astype(np.float32) if flat else None
        sizes = [len(word) for g in groups.values() for sample in g for unit in sample for word in unit]
        # One V x E block per probed word, handed out in `flat`'s order
        blocks = iter(np.split(emb, np.cumsum(sizes)[:-1]) if flat else [])
        return {
            n: [[[next(blocks) for _ in unit] for unit in sample] for sample in g] for n, g in groups.items()
        }

    def _match(self, scored: list, embedded: list, prepared: dict, status: dict, seconds) -> list[dict]:
        """Match each scored sample's units; returns one block of pair columns per sample (lists and
        arrays straight from the matcher, no per-pair dicts)."""
        from miners.attribute_probe import probe_logits  # spaCy: see __init__

        t = time.perf_counter()
        blocks: list[dict] = []
        for (r, us), emb in zip(scored, embedded, strict=True):
            image = prepared[r["image_id"]]
            regs = image.regions
            tags = [u.part_tags for u in us]
            m = match_units(emb.text @ emb.regions.T, tags, regs.labels, regs.quality, self.cfg.match)
            chosen = emb.regions[m.region_index]  # each unit's matched region, S x E
            if self.bank is not None:
                parts = [judged_part(t, label) for t, label in zip(tags, m.region_label, strict=True)]
                m.bank_region_z, m.bank_sentence_z = self.bank.content_features(
                    emb.text, chosen, parts, int(r["person_id"])
                )
            for name, per_unit in emb.probe_variants.items():
                logits = probe_logits(
                    m.clip_cosine, [[v @ chosen[k] for v in words] for k, words in enumerate(per_unit)]
                )
                setattr(m, name, logits)
            reliability = self.calibrator.predict(m)
            kept = reliability >= self.cfg.match.keep_threshold
            blocks.append(self._pair_block(r, us, image, m, reliability, kept))
            status[r["sample_id"]] = _status(r, "ok", None, len(regs), len(us), len(us), int(kept.sum()))
        seconds["matching"] += time.perf_counter() - t
        return blocks

    def _pair_block(
        self, r, us: list, image: _Prepared, m: UnitMatches, reliability: np.ndarray, kept: np.ndarray
    ) -> dict[str, list | np.ndarray]:
        """One sample's pairs as PAIRS_SCHEMA columns (length S: one per unit)."""
        regs = image.regions
        n = len(us)
        ri = np.asarray(m.region_index, dtype=np.int64)
        return {
            "sample_id": [r["sample_id"]] * n,
            "image_id": [r["image_id"]] * n,
            "person_id": [r["person_id"]] * n,
            "split": [r["split"]] * n,
            "caption_index": [r["caption_index"]] * n,
            "sentence_index": [u.sentence_index for u in us],
            "sentence": [u.text for u in us],
            "char_start": [u.char_start for u in us],
            "char_end": [u.char_end for u in us],
            "part_tags": [list(u.part_tags) for u in us],
            "region_id": ri,
            "region_source": [regs.source] * n,
            "region_label": [regs.labels[i] for i in ri],
            "bbox_xyxy": np.asarray(regs.boxes_xyxy, dtype=np.float32).reshape(-1, 4)[ri],
            "mask_rle": [image.mask_rles[i] for i in ri],
            "region_quality": m.region_quality,
            "clip_cosine": m.clip_cosine,
            "softmax_prob": m.softmax_prob,
            "margin": m.margin,
            "mutual_best": m.mutual_best,
            "part_agreement": m.part_agreement,
            "bank_region_z": m.bank_region_z,
            "bank_sentence_z": m.bank_sentence_z,
            "colour_logit": m.colour_logit,
            "garment_logit": m.garment_logit,
            "reliability": reliability,
            "kept": kept,
            "clip_fingerprint": [self.clip_fingerprint] * n,
            "config_fingerprint": [self.config_fingerprint] * n,
        }


@dataclass
class _Embedded:
    """One sample's embeddings: S x E for its units, R x E for its image's regions (L2-normalised)."""

    text: np.ndarray
    regions: np.ndarray
    # attribute probe column -> per unit, per probed word: V x E (only the probes the miner runs)
    probe_variants: dict[str, list[list[np.ndarray]]] = field(default_factory=dict)


@dataclass
class _Prepared:
    """One image of a batch after its pixels are dropped: regions (masks released), each region's
    mask as the pairs' RLE JSON (None for a box-only region) and its model-input crop."""

    regions: Regions
    mask_rles: list[str | None]
    crops: list[np.ndarray]


def load_companions(
    cfg: RSMConfig, model_fingerprint: str, calibrator: Calibrator | None = None
) -> tuple[ReferenceBank | None, Calibrator]:
    """The reference bank and calibrator a miner with `cfg` uses, checked against the CLIP model's
    fingerprint and against each other (`calibrator` replaces the configured one). Raises BankError,
    ValueError or FileNotFoundError saying which file is stale or missing and the command that
    rebuilds it. The flow's preflight calls it too, so a stale bank is refused before Ray starts."""
    folder = bank_folder(cfg)
    bank = (
        None
        if folder is None
        else ReferenceBank.load(folder, expect_fingerprint=model_fingerprint, crop_mode=cfg.crop_mode)
    )
    if calibrator is None:
        path = calibrator_path(cfg)
        if path.exists():
            calibrator = Calibrator.load(path, expect_fingerprint=model_fingerprint)
            if calibrator.fit_info.get("mode", cfg.match.mode) != cfg.match.mode:
                calibrator = None  # fitted for another match mode: the mode's default prior
        elif cfg.calibrator:
            raise FileNotFoundError(f"calibrator {path} does not exist")
        calibrator = calibrator or default_calibrator(cfg.match.mode)
    if calibrator.uses_colour and not cfg.colour_probe:
        raise ValueError("the calibrator reads colour_logit, which colour_probe=False does not compute")
    if calibrator.uses_garment and not cfg.garment_probe:
        raise ValueError("the calibrator reads garment_logit, which garment_probe=False does not compute")
    if calibrator.uses_content and bank is None:
        raise BankError(
            f"the calibrator reads content features but {cfg.clip_model} has no reference bank; build "
            f"one with `python -m miners.bank --manifest M --clip-model {cfg.clip_model}`"
        )
    return bank, calibrator


def calibrator_path(cfg: RSMConfig) -> Path:
    """The calibrator a miner with `cfg` uses: the configured file, else the one beside the CLIP model."""
    return Path(cfg.calibrator) if cfg.calibrator else Path(cfg.clip_model) / CALIBRATOR_FILENAME


def bank_folder(cfg: RSMConfig) -> Path | None:
    """The folder whose reference bank a miner with `cfg` uses (None: no bank)."""
    if cfg.bank:
        if not (Path(cfg.bank) / BANK_META).is_file():
            raise FileNotFoundError(f"reference bank {Path(cfg.bank) / BANK_META} does not exist")
        return Path(cfg.bank)
    folder = Path(cfg.clip_model)
    return folder if (folder / BANK_META).is_file() else None


def calibrator_fingerprint(cfg: RSMConfig) -> str:
    """Content hash of that calibrator ("default-prior" when none exists): a refit calibrator changes
    every reliability, so runs must not mix shards scored with two of them."""
    path = calibrator_path(cfg)
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else "default-prior"


def matches_from_pairs(pairs: pa.Table) -> UnitMatches:
    """Rebuild the matcher's features from a pairs table (to fit or re-apply a calibrator)."""
    cols = pairs.to_pydict()
    return UnitMatches(
        region_index=np.asarray(cols["region_id"], dtype=np.int64),
        clip_cosine=np.asarray(cols["clip_cosine"], dtype=np.float32),
        softmax_prob=np.asarray(cols["softmax_prob"], dtype=np.float32),
        margin=np.asarray(cols["margin"], dtype=np.float32),
        mutual_best=np.asarray(cols["mutual_best"], dtype=bool),
        part_agreement=np.asarray(cols["part_agreement"], dtype=np.float32),
        has_part_words=np.asarray([bool(t) for t in cols["part_tags"]], dtype=bool),
        region_quality=np.asarray(cols["region_quality"], dtype=np.float32),
        region_label=list(cols["region_label"]),
        bank_region_z=_optional_column(cols.get("bank_region_z")),
        bank_sentence_z=_optional_column(cols.get("bank_sentence_z")),
        colour_logit=_optional_column(cols.get("colour_logit")),
        garment_logit=_optional_column(cols.get("garment_logit")),
    )


def _optional_column(values: list | None) -> np.ndarray | None:
    """A float column, or None when it is absent or all null (mined without a bank)."""
    if values is None or all(v is None for v in values):
        return None
    return np.asarray([np.nan if v is None else v for v in values], dtype=np.float32)


def split_by_pixel_budget(pixels: list[int], max_batch_pixels: int) -> list[list[int]]:
    """Consecutive index runs of `pixels` whose sums stay within `max_batch_pixels`, order kept.

    An image over the budget on its own still gets a run (alone): the budget bounds how many decoded
    images are held together, it never drops one."""
    parts: list[list[int]] = []
    total = 0
    for k, n in enumerate(pixels):
        if parts and total + n <= max_batch_pixels:
            parts[-1].append(k)
            total += n
        else:
            parts.append([k])
            total = n
    return parts


def _header_pixels(root: Path, image_path: str) -> int:
    """Decoded size of one image for the budget; 0 for anything the loader will refuse unread."""
    try:
        return header_pixels(contained_path(root, image_path))
    except ImageLoadError:
        return 0


def _status(row, status, message, n_regions=0, n_sentences=0, n_pairs=0, n_kept=0) -> dict:
    return {
        "sample_id": row["sample_id"],
        "image_id": row["image_id"],
        "status": str(status),
        "error_message": message,
        "n_regions": n_regions,
        "n_sentences": n_sentences,
        "n_pairs": n_pairs,
        "n_kept": n_kept,
    }


def _blocks_to_table(blocks: list[dict[str, list | np.ndarray]]) -> pa.Table:
    """Per-sample column blocks → one PAIRS_SCHEMA table: each column concatenated once and handed
    to Arrow as an array (numpy columns without a Python object per value). A feature that is None
    in a block (no bank, colour probe off) is null there."""
    columns = {}
    for field_ in PAIRS_SCHEMA:
        name, type_ = field_.name, field_.type
        parts = [b[name] for b in blocks]
        if pa.types.is_fixed_size_list(type_):  # bbox_xyxy: N x 4 float32
            flat = np.concatenate(parts).reshape(-1) if parts else np.zeros(0, np.float32)
            columns[name] = pa.FixedSizeListArray.from_arrays(
                pa.array(flat, type_.value_type), type_.list_size
            )
        elif parts and all(isinstance(p, np.ndarray) for p in parts):
            columns[name] = pa.array(np.concatenate(parts), type_)
        elif any(p is None for p in parts):  # an optional feature: null where a block has none
            lengths = [len(b["sentence"]) for b in blocks]
            values = np.concatenate(
                [np.zeros(n, np.float32) if p is None else p for p, n in zip(parts, lengths, strict=True)]
            )
            null = np.concatenate([np.full(n, p is None) for p, n in zip(parts, lengths, strict=True)])
            columns[name] = pa.array(values, type_, mask=null)
        else:
            columns[name] = pa.array([v for p in parts for v in p], type_)
    return pa.table(columns, schema=PAIRS_SCHEMA)


__all__ = ["STAGES", "MineResult", "RSMConfig", "RSMMiner", "matches_from_pairs", "split_by_pixel_budget"]
