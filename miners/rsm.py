"""The RSM entry point: a batch of manifest rows → (pairs table, per-row status table).

Consumes manifest rows (MANIFEST_SCHEMA) and their dataset root; produces a `MineResult` whose `pairs`
follow PAIRS_SCHEMA (one row per text unit: its chosen region, the matching features, a calibrated
reliability and the kept flag) and whose `status` follows STATUS_SCHEMA (exactly one row per input row:
"ok" or an error kind with its message). Models load once per `RSMMiner` (build one per worker/actor):
the splitter, the region proposer, the CLIP scorer and the calibrator. No Prefect, no Ray here.

Per batch: load images safely → propose regions (batched) → split captions (spaCy pipe) → score all
crops and units of the batch in one CLIP pass → match each unit → reliability → rows.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import pyarrow as pa

from miners.calibration import CALIBRATOR_FILENAME, Calibrator, default_calibrator
from miners.clip_scorer import ClipScorer, ScorerConfig
from miners.images import ImageLoadError, load_rgb
from miners.matching import MatchConfig, UnitMatches, match_units
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
    match: MatchConfig = field(default_factory=MatchConfig)
    calibrator: str | None = None  # None: <clip_model>/rsm-calibrator.json if present, else the default prior
    images_per_batch: int = 32
    device: str = "auto"

    # Change speed, not output: not part of a run's identity (nor of the pairs' config_fingerprint)
    RUNTIME_FIELDS: ClassVar[tuple[str, ...]] = ("device", "images_per_batch")

    def __post_init__(self) -> None:
        if self.images_per_batch < 1:
            raise ValueError(f"images_per_batch must be >= 1, got {self.images_per_batch}")

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


@dataclass
class MineResult:
    pairs: pa.Table
    status: pa.Table
    seconds: dict[str, float]


class RSMMiner:
    def __init__(self, cfg: RSMConfig, calibrator: Calibrator | None = None):
        """`calibrator` overrides the one `cfg` points at (used to fit or compare calibrators)."""
        from miners.captions import CaptionSplitter
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
        self.scorer = ClipScorer(cfg.clip_model, ScorerConfig(crop_mode=cfg.crop_mode, device=cfg.device))
        self.calibrator = calibrator or self._load_calibrator()
        self.clip_fingerprint = self.scorer.fingerprint
        cal_id = hashlib.sha256(json.dumps(self.calibrator.to_json(), sort_keys=True).encode()).hexdigest()[
            :8
        ]
        self.config_fingerprint = f"{cfg.fingerprint()}-{cal_id}"

    def _load_calibrator(self) -> Calibrator:
        path = calibrator_path(self.cfg)
        if path.exists():
            cal = Calibrator.load(path, expect_fingerprint=self.scorer.fingerprint)
            if cal.fit_info.get("mode", self.cfg.match.mode) == self.cfg.match.mode:
                return cal
        elif self.cfg.calibrator:
            raise FileNotFoundError(f"calibrator {path} does not exist")
        return default_calibrator(self.cfg.match.mode)

    # --- the batch ---------------------------------------------------------------------------------
    def mine(self, rows: pa.Table, root: str | Path) -> MineResult:
        root = Path(root)
        pairs_parts, status_parts = [], []
        seconds: dict[str, float] = defaultdict(float)
        by_image: dict[str, list[dict]] = defaultdict(list)
        for row in rows.to_pylist():
            by_image[row["image_id"]].append(row)
        image_ids = list(by_image)
        for i in range(0, len(image_ids), self.cfg.images_per_batch):
            chunk = {iid: by_image[iid] for iid in image_ids[i : i + self.cfg.images_per_batch]}
            p, s = self._mine_chunk(chunk, root, seconds)
            pairs_parts.append(p)
            status_parts.append(s)
        pairs = _rows_to_table(pairs_parts, PAIRS_SCHEMA)
        status = _rows_to_table(status_parts, STATUS_SCHEMA)
        return MineResult(pairs=pairs, status=status, seconds=dict(seconds))

    def _mine_chunk(self, chunk: dict[str, list[dict]], root: Path, seconds) -> tuple[list[dict], list[dict]]:
        status: dict[str, dict] = {}
        t = time.perf_counter()
        images: dict[str, np.ndarray] = {}
        for iid, rows in chunk.items():
            try:
                images[iid] = load_rgb(root / rows[0]["image_path"])
            except ImageLoadError as exc:
                for r in rows:
                    status[r["sample_id"]] = _status(r, exc.kind, str(exc))
        seconds["load"] += time.perf_counter() - t

        t = time.perf_counter()
        loaded = list(images)
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

        t = time.perf_counter()
        samples = [r for iid in regions for r in chunk[iid]]
        units = self.splitter.split_many([r["caption"] for r in samples])
        scored = []
        for r, us in zip(samples, units, strict=True):
            if not us:
                status[r["sample_id"]] = _status(
                    r, ErrorKind.NO_SENTENCES, f"{r['sample_id']}: caption has no sentences"
                )
            else:
                scored.append((r, us))
        seconds["split"] += time.perf_counter() - t

        t = time.perf_counter()
        image_order = list(regions)
        image_pos = {iid: k for k, iid in enumerate(image_order)}
        cosines = self.scorer.score(
            [images[iid] for iid in image_order],
            [regions[iid] for iid in image_order],
            [[u.text for u in us] for _, us in scored],
            [image_pos[r["image_id"]] for r, _ in scored],
        )
        seconds["clip"] += time.perf_counter() - t

        t = time.perf_counter()
        pair_rows: list[dict] = []
        rle_cache: dict[tuple[str, int], str | None] = {}
        for (r, us), cos in zip(scored, cosines, strict=True):
            regs = regions[r["image_id"]]
            m = match_units(cos, [u.part_tags for u in us], regs.labels, regs.quality, self.cfg.match)
            reliability = self.calibrator.predict(m)
            kept = reliability >= self.cfg.match.keep_threshold
            for k, u in enumerate(us):
                pair_rows.append(
                    self._pair_row(r, u, regs, m, k, float(reliability[k]), bool(kept[k]), rle_cache)
                )
            status[r["sample_id"]] = _status(r, "ok", None, len(regs), len(us), len(us), int(kept.sum()))
        seconds["match"] += time.perf_counter() - t
        ordered_status = [status[r["sample_id"]] for rows in chunk.values() for r in rows]
        return pair_rows, ordered_status

    def _pair_row(
        self, r, u, regs, m: UnitMatches, k: int, reliability: float, kept: bool, rle_cache
    ) -> dict:
        ri = int(m.region_index[k])
        key = (r["image_id"], ri)
        if key not in rle_cache:
            mask = regs.masks[ri]
            rle_cache[key] = json.dumps(encode_mask(mask)) if mask is not None else None
        return {
            "sample_id": r["sample_id"],
            "image_id": r["image_id"],
            "person_id": r["person_id"],
            "split": r["split"],
            "caption_index": r["caption_index"],
            "sentence_index": u.sentence_index,
            "sentence": u.text,
            "char_start": u.char_start,
            "char_end": u.char_end,
            "part_tags": list(u.part_tags),
            "region_id": ri,
            "region_source": regs.source,
            "region_label": regs.labels[ri],
            "bbox_xyxy": [float(v) for v in regs.boxes_xyxy[ri]],
            "mask_rle": rle_cache[key],
            "region_quality": float(m.region_quality[k]),
            "clip_cosine": float(m.clip_cosine[k]),
            "softmax_prob": float(m.softmax_prob[k]),
            "margin": float(m.margin[k]),
            "mutual_best": bool(m.mutual_best[k]),
            "part_agreement": float(m.part_agreement[k]),
            "reliability": reliability,
            "kept": kept,
            "clip_fingerprint": self.clip_fingerprint,
            "config_fingerprint": self.config_fingerprint,
        }


def calibrator_path(cfg: RSMConfig) -> Path:
    """The calibrator a miner with `cfg` uses: the configured file, else the one beside the CLIP model."""
    return Path(cfg.calibrator) if cfg.calibrator else Path(cfg.clip_model) / CALIBRATOR_FILENAME


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
    )


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


def _rows_to_table(parts: list[list[dict]], schema: pa.Schema) -> pa.Table:
    rows = [row for part in parts for row in part]
    return pa.Table.from_pylist(rows, schema=schema)


__all__ = ["MineResult", "RSMConfig", "RSMMiner", "matches_from_pairs"]
