"""The reference bank: per body part, region and sentence embeddings of other people, to judge content.

A mined pair's raw cosine says little on its own: some sentences score high against every region, some
crops against every sentence. Set against a fixed bank of the same part from *other* people it does:
a sentence that fits its own region better than most people's same-part regions is specific to this
image ("a green top" on a green top), one that fits other people's regions better is not ("a purple
top" on a green top). Two content features per pair, both z-scores with the pair's own cosine:

- `bank_region_z`: the unit's text against the bank's same-part *regions* (how the region ranks);
- `bank_sentence_z`: the chosen region against the bank's same-part *sentences* (how the text ranks).

Entries of the pair's own person are left out, so a bank built on the split being mined does not
compare a person with themself. The features depend only on the pair's two embeddings, its person and
the bank: the same pair gets the same values in any shard or batch.

Consumes a manifest split (images + captions) and a CLIP folder (with the miner's proposer and crop
mode); produces `<clip-model>/rsm-bank.npz` (arrays) and `rsm-bank.json` (version, model fingerprint,
crop mode, proposer, the source manifest, counts per part, sha256 of the arrays).

    python -m miners.bank --manifest M --clip-model DIR [--split train] [--per-part 512] [--seed 0]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from storage.schemas import BODY_PARTS

BANK_VERSION = 1
BANK_ARRAYS = "rsm-bank.npz"
BANK_META = "rsm-bank.json"
Z_CLIP = 8.0  # a z-score beyond this carries no more information, and would dominate a linear model
MIN_ENTRIES = 8  # fewer same-part entries than this give no usable spread: the feature is 0 (neutral)


class BankError(ValueError):
    """A bank that cannot be used with this model or these settings (the message says how to rebuild)."""


@dataclass
class PartBank:
    """One body part's entries: L2-normalised embeddings and the person each came from."""

    region_emb: np.ndarray  # n_r x E float32
    region_person: np.ndarray  # n_r int64
    sentence_emb: np.ndarray  # n_s x E float32
    sentence_person: np.ndarray  # n_s int64


@dataclass
class ReferenceBank:
    parts: dict[str, PartBank]
    meta: dict = field(default_factory=dict)

    # --- identity and files ------------------------------------------------------------------------
    def _arrays(self) -> dict[str, np.ndarray]:
        out = {}
        for part in BODY_PARTS:
            if part in self.parts:
                pb = self.parts[part]
                out |= {
                    f"{part}/region_emb": pb.region_emb,
                    f"{part}/region_person": pb.region_person,
                    f"{part}/sentence_emb": pb.sentence_emb,
                    f"{part}/sentence_person": pb.sentence_person,
                }
        return out

    def save(self, model_dir: str | Path) -> Path:
        """Write the arrays, then the meta file naming their sha256 (written last: the commit)."""
        model_dir = Path(model_dir)
        buf = io.BytesIO()
        np.savez(buf, **self._arrays())  # uncompressed: byte-identical for identical arrays
        data = buf.getvalue()
        tmp = model_dir / (BANK_ARRAYS + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(model_dir / BANK_ARRAYS)
        meta = {
            **self.meta,
            "version": BANK_VERSION,
            "sha256": hashlib.sha256(data).hexdigest(),
            "counts": {
                p: {"regions": int(len(b.region_person)), "sentences": int(len(b.sentence_person))}
                for p, b in self.parts.items()
            },
        }
        self.meta = meta
        tmp = model_dir / (BANK_META + ".tmp")
        tmp.write_text(json.dumps(meta, indent=2, sort_keys=True))
        tmp.replace(model_dir / BANK_META)
        return model_dir / BANK_META

    @property
    def fingerprint(self) -> str:
        return str(self.meta.get("sha256", ""))[:16]

    @classmethod
    def load(
        cls, model_dir: str | Path, expect_fingerprint: str | None = None, crop_mode: str | None = None
    ) -> ReferenceBank:
        model_dir = Path(model_dir)
        meta_path, arrays_path = model_dir / BANK_META, model_dir / BANK_ARRAYS
        folder = shlex.quote(str(model_dir))
        # MANIFEST spelled out: a bare `M` left the reader guessing
        rebuild = (
            f"rebuild it with `python -m miners.bank --manifest MANIFEST --clip-model {folder}` "
            "(MANIFEST: the manifest of the data it was built from, e.g. your training set's)"
        )
        try:
            meta = json.loads(meta_path.read_text())
            data = arrays_path.read_bytes()
        except (OSError, ValueError) as exc:
            raise BankError(f"{meta_path}: unreadable reference bank ({exc}); {rebuild}") from exc
        if meta.get("version") != BANK_VERSION:
            raise BankError(f"{meta_path}: bank version {meta.get('version')} != {BANK_VERSION}; {rebuild}")
        if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
            raise BankError(
                f"{arrays_path}: sha256 differs from {meta_path} (damaged or replaced); {rebuild}"
            )
        if expect_fingerprint and meta.get("model_fingerprint") != expect_fingerprint:
            raise BankError(
                f"{meta_path}: built with CLIP model {meta.get('model_fingerprint')}, not {expect_fingerprint}; "
                f"{rebuild}"
            )
        if crop_mode and meta.get("crop_mode") != crop_mode:
            # Never rebuild it in place: every run that uses this model folder reads this bank
            copy = shlex.quote(f"{model_dir}-{crop_mode}")
            raise BankError(
                f"{meta_path}: the reference bank beside this CLIP model was built for --crop-mode "
                f"{meta.get('crop_mode')!r}, not {crop_mode!r}, and other runs use it as it is. To mine with "
                f"--crop-mode {crop_mode}, copy the model folder and build a {crop_mode}-mode bank in the "
                f"copy: `cp -r {folder} {copy} && python -m miners.bank --manifest MANIFEST --clip-model "
                f"{copy} --crop-mode {crop_mode}` (MANIFEST: the manifest the bank is built from, e.g. your "
                f"training set's), then pass --clip-model {copy}"
            )
        with np.load(io.BytesIO(data)) as npz:
            arrays = {k: npz[k] for k in npz.files}
        parts = {
            part: PartBank(
                arrays[f"{part}/region_emb"],
                arrays[f"{part}/region_person"],
                arrays[f"{part}/sentence_emb"],
                arrays[f"{part}/sentence_person"],
            )
            for part in BODY_PARTS
            if f"{part}/region_emb" in arrays
        }
        return cls(parts=parts, meta=meta)

    # --- the features --------------------------------------------------------------------------------
    def content_features(
        self, text_emb: np.ndarray, region_emb: np.ndarray, parts: list[str | None], person: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """(bank_region_z, bank_sentence_z) for S pairs of one sample.

        text_emb and region_emb are S x E (row s: unit s and its chosen region, L2-normalised), parts the
        body part each pair is judged as (None: no part known, both features 0)."""
        n = len(parts)
        z_region = np.zeros(n, dtype=np.float32)
        z_sentence = np.zeros(n, dtype=np.float32)
        own = np.einsum("se,se->s", text_emb, region_emb)
        for s, part in enumerate(parts):
            pb = self.parts.get(part) if part is not None else None
            if pb is None:
                continue
            others_r = pb.region_person != person
            others_s = pb.sentence_person != person
            z_region[s] = _z(own[s], pb.region_emb[others_r] @ text_emb[s])
            z_sentence[s] = _z(own[s], pb.sentence_emb[others_s] @ region_emb[s])
        return z_region, z_sentence


def _z(value: float, reference: np.ndarray) -> float:
    if reference.size < MIN_ENTRIES:
        return 0.0
    std = float(reference.std())
    if std < 1e-6:
        return 0.0
    return float(np.clip((value - float(reference.mean())) / std, -Z_CLIP, Z_CLIP))


def judged_part(unit_tags: tuple[str, ...], region_label: str | None) -> str | None:
    """The part a pair is compared within: the region's label when the unit names it (or names no
    part), else the unit's own first part word (what the text claims), else none."""
    if region_label is not None and (not unit_tags or region_label in unit_tags):
        return region_label
    return unit_tags[0] if unit_tags else None


# ---------------------------------------------------------------------------------------------- building


def build_bank(
    manifest_path: str | Path,
    clip_model: str | Path,
    split: str | None = "train",
    per_part: int = 512,
    seed: int = 0,
    proposer: str = "prior",
    crop_mode: str = "box",
    max_images: int | None = 4000,
    progress=None,
) -> ReferenceBank:
    """Sample up to `per_part` regions and sentences per body part from `split` and embed them.

    Images are visited in a seeded order; each contributes its labelled regions (one per label) and the
    caption units that name exactly one part. Sampling stops once every part is full."""
    import pyarrow.compute as pc

    from miners.captions import CaptionSplitter
    from miners.clip_scorer import ClipScorer, ScorerConfig
    from miners.images import ImageLoadError, contained_path, load_rgb
    from miners.regions import build_proposer
    from storage.manifest import read_manifest

    table, meta = read_manifest(manifest_path)
    if split:
        table = table.filter(pc.equal(table["split"], split))
    if table.num_rows == 0:
        raise BankError(f"{manifest_path}: no rows in split {split!r} to build a bank from")
    rows_by_image: dict[str, list[dict]] = {}
    for row in table.to_pylist():
        rows_by_image.setdefault(row["image_id"], []).append(row)
    image_ids = sorted(rows_by_image)
    order = np.random.default_rng(seed).permutation(len(image_ids))
    if max_images:
        order = order[:max_images]
    scorer = ClipScorer(clip_model, ScorerConfig(crop_mode=crop_mode))
    regions_of = build_proposer(proposer, max_regions=8)
    splitter = CaptionSplitter(split_clauses=True)
    crops: dict[str, list] = {p: [] for p in BODY_PARTS}
    texts: dict[str, list] = {p: [] for p in BODY_PARTS}
    root = Path(meta["root"])
    skipped = 0
    for k in order:
        if all(len(crops[p]) >= per_part and len(texts[p]) >= per_part for p in BODY_PARTS):
            break
        rows = rows_by_image[image_ids[k]]
        person = int(rows[0]["person_id"])
        try:
            rgb = load_rgb(contained_path(root, rows[0]["image_path"]))
        except ImageLoadError:
            skipped += 1
            continue
        regs = regions_of.propose(rgb)
        seen: set[str] = set()
        for r, label in enumerate(regs.labels):
            if label is None or label in seen or len(crops[label]) >= per_part:
                continue
            seen.add(label)
            crops[label].append((scorer.crop(rgb, regs.boxes_xyxy[r], regs.masks[r]), person))
        for units in splitter.split_many([row["caption"] for row in rows]):
            for u in units:
                if len(u.part_tags) == 1 and len(texts[u.part_tags[0]]) < per_part:
                    texts[u.part_tags[0]].append((u.text, person))
        if progress is not None:
            progress(sum(map(len, crops.values())), sum(map(len, texts.values())))
    parts = {}
    for part in BODY_PARTS:
        if not crops[part] and not texts[part]:
            continue
        region_emb = scorer.embed_crops([c for c, _ in crops[part]]).cpu().numpy().astype(np.float32)
        sentence_emb = scorer.embed_texts([t for t, _ in texts[part]]).cpu().numpy().astype(np.float32)
        parts[part] = PartBank(
            region_emb.reshape(len(crops[part]), -1),
            np.array([p for _, p in crops[part]], dtype=np.int64),
            sentence_emb.reshape(len(texts[part]), -1),
            np.array([p for _, p in texts[part]], dtype=np.int64),
        )
    info = {
        "model_fingerprint": scorer.fingerprint,
        "crop_mode": crop_mode,
        "proposer": proposer,
        "manifest": str(manifest_path),
        "split": split,
        "per_part": per_part,
        "seed": seed,
        "images_visited": int(min(len(order), len(image_ids))),
        "images_skipped": skipped,
    }
    return ReferenceBank(parts=parts, meta=info)


def bank_fingerprint(model_dir: str | Path) -> str:
    """sha256[:16] of the bank's arrays as its meta file records them ("none" without a bank)."""
    meta_path = Path(model_dir) / BANK_META
    if not meta_path.is_file():
        return "none"
    try:
        return str(json.loads(meta_path.read_text()).get("sha256", "unreadable"))[:16]
    except ValueError:
        return "unreadable"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m miners.bank", description=__doc__.split("\n\n")[0])
    ap.add_argument("--manifest", required=True, type=Path)
    ap.add_argument("--clip-model", required=True, type=Path)
    ap.add_argument("--split", default="train", help="split to sample ('' for all)")
    ap.add_argument("--per-part", type=int, default=512, help="regions and sentences per body part")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--proposer", default="prior")
    ap.add_argument("--crop-mode", default="box", choices=["box", "mask", "blur"])
    ap.add_argument("--max-images", type=int, default=4000)
    args = ap.parse_args(argv)
    try:
        bank = build_bank(
            args.manifest,
            args.clip_model,
            args.split or None,
            args.per_part,
            args.seed,
            args.proposer,
            args.crop_mode,
            args.max_images,
        )
    except (BankError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    path = bank.save(args.clip_model)
    counts = ", ".join(f"{p} {c['regions']}/{c['sentences']}" for p, c in bank.meta["counts"].items())
    print(f"reference bank saved to {path} (regions/sentences per part: {counts})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
