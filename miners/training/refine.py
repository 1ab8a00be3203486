"""The region–sentence objective: fine-tune the mining CLIP on a run's own kept pairs.

Consumes mined pairs (PAIRS_SCHEMA rows: image, box / mask, sentence, reliability, person, region
label) and the dataset root; produces `RefineData` (each distinct region cropped once, in the miner's
crop mode, at the model's input size; each pair's sentence tokenised once) and `RegionSentenceObjective`,
which the one Trainer (miners.training.trainer) optimises:

- crop ↔ sentence InfoNCE in both directions over the batch, each pair weighted by its reliability;
- identity-aware negatives: another region of the *same person and the same part* (another image of
  them) is neither positive nor negative, since the sentence describes it too;
- hard negatives: each pair's region must also rank its own sentence above a sentence of the same part
  from another person, drawn anew every epoch (what the reference bank's `bank_sentence_z` measures).

`evaluate` reports, on held-out pairs, how often a region scores its own sentence above such a
same-part sentence of another person (`own_beats_other_rate`) and the AUROC of the two cosines.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F

from miners.bank import judged_part
from miners.caption_noise import colour_swap, corpus_garments, garment_swap
from miners.encoders import image_embeddings, pad_token_ids, text_embeddings, to_pixel_values, tokenize
from miners.images import ImageLoadError, contained_path, load_rgb
from miners.metrics import auroc
from storage.rle import decode_mask


@dataclass
class RefineData:
    crops_u8: torch.Tensor  # N_regions x 3 x H x W uint8, model input size, miner's crop mode
    region_person: np.ndarray  # N_regions
    pair_region: np.ndarray  # N_pairs → row of crops_u8
    pair_tokens: list[list[int]]
    pair_weight: np.ndarray  # N_pairs: reliability (or 1.0 for uniform)
    pair_person: np.ndarray  # N_pairs
    pair_part: np.ndarray  # N_pairs: judged body part ("" when none)
    sentences: list[str]
    skipped: dict[str, str]  # image_id → why its pairs were left out
    # Per pair, its sentence with one colour word changed (miners.caption_noise.colour_swap), tokenised;
    # None where the sentence names no colour. A negative no other sentence can be as hard as.
    pair_altered_tokens: list[list[int] | None] = field(default_factory=list)
    # The same with one garment phrase changed to another kind of its part (caption_noise.garment_swap):
    # without it the tiny CLIP learns colours but not garment kinds (a jeans unit rewritten as "shorts"
    # kept its reliability: attribute-swap AUROC 0.52 on garment swaps, 0.77 on colour swaps).
    pair_garment_tokens: list[list[int] | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.pair_tokens)


def build_refine_data(
    pairs: pa.Table,
    image_paths: dict[str, str],
    root: str | Path,
    scorer,
    processor,
    use_reliability: bool = True,
) -> RefineData:
    """Crop every distinct (image, region) of `pairs` once with `scorer.crop` (the miner's crop code),
    from images (`image_paths`: image_id → manifest path) opened safely inside `root`; images that fail
    to load, or that the manifest no longer lists, are skipped by name."""
    root = Path(root)
    rows = pairs.to_pylist()
    by_image: dict[str, list[dict]] = {}
    for r in rows:
        by_image.setdefault(r["image_id"], []).append(r)
    crops, region_person, region_of = [], [], {}
    kept_rows, skipped = [], {}
    for iid, image_rows in by_image.items():
        if iid not in image_paths:
            skipped[iid] = "not in the manifest"
            continue
        try:
            rgb = load_rgb(contained_path(root, image_paths[iid]))
        except ImageLoadError as exc:
            skipped[iid] = f"{exc.kind}: {exc}"
            continue
        for r in image_rows:
            key = (iid, r["region_id"])
            if key not in region_of:
                mask = decode_mask(r["mask_rle"]) if r.get("mask_rle") else None
                region_of[key] = len(crops)
                crops.append(torch.from_numpy(scorer.crop(rgb, np.asarray(r["bbox_xyxy"]), mask).copy()))
                region_person.append(r["person_id"])
            kept_rows.append(r)
    size_hw = scorer.size_hw
    rng = np.random.default_rng(0)  # pair order is the table's, so the alterations are reproducible
    sentences = [r["sentence"] for r in kept_rows]
    worn = corpus_garments(sentences)  # hard garment negatives: kinds the data's people wear
    return RefineData(
        pair_altered_tokens=_altered_tokens(processor, [colour_swap(t, rng) for t in sentences]),
        pair_garment_tokens=_altered_tokens(processor, [garment_swap(t, rng, worn) for t in sentences]),
        crops_u8=torch.stack(crops) if crops else torch.zeros((0, 3, *size_hw), dtype=torch.uint8),
        region_person=np.asarray(region_person, dtype=np.int64),
        pair_region=np.asarray(
            [region_of[(r["image_id"], r["region_id"])] for r in kept_rows], dtype=np.int64
        ),
        pair_tokens=tokenize(processor, [r["sentence"] for r in kept_rows]) if kept_rows else [],
        pair_weight=np.asarray(
            [float(r["reliability"]) if use_reliability else 1.0 for r in kept_rows], dtype=np.float32
        ),
        pair_person=np.asarray([r["person_id"] for r in kept_rows], dtype=np.int64),
        pair_part=np.asarray(
            [judged_part(tuple(r["part_tags"]), r["region_label"]) or "" for r in kept_rows], dtype=object
        ),
        sentences=[r["sentence"] for r in kept_rows],
        skipped=skipped,
    )


def _altered_tokens(processor, altered: list[str | None]) -> list[list[int] | None]:
    """Token ids per altered sentence, None where there is none (one tokenizer call for all)."""
    tokens = iter(tokenize(processor, [a for a in altered if a is not None]) if any(altered) else [])
    return [next(tokens) if a is not None else None for a in altered]


def split_by_image(pairs: pa.Table, held_out_fraction: float, seed: int) -> tuple[pa.Table, pa.Table]:
    """(train, held-out) pairs, whole images on one side (a region never appears on both)."""
    images = sorted(set(pairs["image_id"].to_pylist()))
    rng = np.random.default_rng(seed)
    n_out = int(round(held_out_fraction * len(images)))
    held = set(rng.choice(len(images), size=n_out, replace=False).tolist()) if n_out else set()
    out_ids = pa.array([images[k] for k in sorted(held)], pa.string())
    is_out = pc.is_in(pairs["image_id"], value_set=out_ids)
    return pairs.filter(pc.invert(is_out)), pairs.filter(is_out)


def other_person_same_part(data: RefineData, seed: int, epoch: int) -> np.ndarray:
    """Per pair, the index of a pair of the same judged part from another person (-1 if none), drawn
    from (seed, epoch) only, so a resumed run sees the same negatives."""
    rng = np.random.default_rng([seed, epoch, 7])
    out = np.full(len(data), -1, dtype=np.int64)
    for part in np.unique(data.pair_part):
        if part == "":
            continue
        members = np.flatnonzero(data.pair_part == part)
        draws = members[rng.integers(len(members), size=(len(members), 4))]  # a few tries per pair
        for slot, k in enumerate(members):
            other = draws[slot][data.pair_person[draws[slot]] != data.pair_person[k]]
            if other.size:
                out[k] = other[0]
    return out


class RegionSentenceObjective:
    """See the module docstring. `hard_weight` scales the same-part hard-negative term."""

    def __init__(
        self,
        temperature: float = 0.05,
        hard_weight: float = 1.0,
        colour_weight: float = 1.0,
        garment_weight: float = 1.0,
    ):
        self.temperature = temperature
        self.hard_weight = hard_weight
        self.colour_weight = colour_weight
        self.garment_weight = garment_weight
        # The current epoch's hard negatives, keyed by (data, epoch): drawn once per epoch, not per batch
        self._hard: dict[tuple[int, int], np.ndarray] = {}

    def batches(self, data: RefineData, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
        order = np.random.default_rng([seed, epoch]).permutation(len(data))
        steps = max(1, len(data) // batch_size)
        return [order[b * batch_size : (b + 1) * batch_size] for b in range(steps)]

    def loss(self, trainer, data: RefineData, idx: np.ndarray) -> tuple[torch.Tensor, dict]:
        dev = trainer.device
        regions, region_col = np.unique(data.pair_region[idx], return_inverse=True)
        reg = _regions(trainer.model, trainer, data, regions)
        sent = _sentences(trainer.model, trainer, data, idx)
        w = torch.from_numpy(data.pair_weight[idx]).to(dev, sent.dtype)
        logits = sent @ reg.T / self.temperature  # B pairs x U regions
        col = torch.from_numpy(region_col).to(dev)
        positive = col[:, None] == torch.arange(len(regions), device=dev)[None, :]
        person = torch.from_numpy(data.pair_person[idx]).to(dev)
        region_person = torch.from_numpy(data.region_person[regions]).to(dev)
        parts = data.pair_part[idx]
        region_part = np.array(
            [parts[np.flatnonzero(region_col == u)[0]] for u in range(len(regions))], dtype=object
        )
        same_part = torch.from_numpy((parts[:, None] == region_part[None, :]) & (parts[:, None] != "")).to(
            dev
        )
        ignore = (person[:, None] == region_person[None, :]) & same_part & ~positive
        masked = logits.masked_fill(ignore, float("-inf"))
        t2r = -(torch.logsumexp(masked.masked_fill(~positive, float("-inf")), 1) - torch.logsumexp(masked, 1))
        # Region → sentence: each region against the batch's sentences; its pairs are its positives.
        masked_t = masked.T
        r2t_each = -(
            torch.logsumexp(masked_t.masked_fill(~positive.T, float("-inf")), 1)
            - torch.logsumexp(masked_t, 1)
        )
        region_w = torch.zeros(len(regions), device=dev, dtype=sent.dtype).index_add_(0, col, w)
        region_w = region_w / torch.bincount(col, minlength=len(regions)).clamp_min(1)
        loss_t2r = (w * t2r).sum() / w.sum().clamp_min(1e-6)
        loss_r2t = (region_w * r2t_each).sum() / region_w.sum().clamp_min(1e-6)
        loss = (loss_t2r + loss_r2t) / 2
        logs = {"loss_t2r": float(loss_t2r.detach()), "loss_r2t": float(loss_r2t.detach())}
        if self.hard_weight > 0:
            hard = self._hard_for(data, trainer.cfg.seed, trainer.epoch)[idx]
            has = hard >= 0
            if has.any():
                neg = _sentences(trainer.model, trainer, data, hard[has])
                own_reg = reg[col[torch.from_numpy(has).to(dev)]]
                pos_cos = (sent[torch.from_numpy(has).to(dev)] * own_reg).sum(1)
                neg_cos = (neg * own_reg).sum(1)
                wh = w[torch.from_numpy(has).to(dev)]
                # Two-way softmax: own sentence against another person's same-part sentence.
                hard_loss = F.softplus((neg_cos - pos_cos) / self.temperature)
                loss_hard = (wh * hard_loss).sum() / wh.sum().clamp_min(1e-6)
                loss = loss + self.hard_weight * loss_hard
                logs["loss_hard"] = float(loss_hard.detach())
        for name, weight, tokens in (
            ("colour", self.colour_weight, data.pair_altered_tokens),
            ("garment", self.garment_weight, data.pair_garment_tokens),
        ):
            rows = [k for k, i in enumerate(idx) if tokens and tokens[i] is not None] if weight > 0 else []
            if rows:
                # Own sentence against itself with one attribute changed, on the pair's own region
                altered = _tokens(trainer.model, trainer, [tokens[idx[k]] for k in rows])
                at = torch.tensor(rows, device=dev)
                gap = ((altered - sent[at]) * reg[col[at]]).sum(1) / self.temperature
                term = (w[at] * F.softplus(gap)).sum() / w[at].sum().clamp_min(1e-6)
                loss = loss + weight * term
                logs[f"loss_{name}"] = float(term.detach())
        logs["loss"] = float(loss.detach())
        return loss, logs

    def _hard_for(self, data: RefineData, seed: int, epoch: int) -> np.ndarray:
        key = (id(data), epoch)
        if key not in self._hard:
            self._hard = {key: other_person_same_part(data, seed, epoch)}
        return self._hard[key]

    @torch.no_grad()
    def evaluate(self, trainer, test: RefineData) -> dict:
        return own_vs_other_sentence(trainer.model, trainer, test)


@torch.no_grad()
def own_vs_other_sentence(model, trainer, data: RefineData, seed: int = 12345, batch: int = 256) -> dict:
    """Held-out figures: cos(region, own sentence) vs cos(region, a same-part sentence of another
    person): the rate at which the own one wins, and the AUROC of the two cosine populations."""
    was_training = model.training
    model.eval()
    others = other_person_same_part(data, seed, 0)
    has = np.flatnonzero(others >= 0)
    own, other = [], []
    for b in range(0, len(has), batch):
        idx = has[b : b + batch]
        r = _regions(model, trainer, data, data.pair_region[idx])
        s_own = _sentences(model, trainer, data, idx)
        s_other = _sentences(model, trainer, data, others[idx])
        own.append((s_own * r).sum(1).float().cpu().numpy())
        other.append((s_other * r).sum(1).float().cpu().numpy())
    altered_rate = _own_beats_altered(model, trainer, data, data.pair_altered_tokens, batch)
    garment_rate = _own_beats_altered(model, trainer, data, data.pair_garment_tokens, batch)
    if was_training:
        model.train()
    if not own:
        return {"pairs": 0}
    own_c, other_c = np.concatenate(own), np.concatenate(other)
    return {
        "own_beats_altered_rate": altered_rate,
        "own_beats_garment_rate": garment_rate,
        "pairs": int(own_c.size),
        "own_beats_other_rate": float((own_c > other_c).mean()),
        "own_vs_other_auroc": auroc(
            np.concatenate([own_c, other_c]), np.r_[np.ones(own_c.size), np.zeros(other_c.size)].astype(bool)
        ),
        "own_cosine_mean": float(own_c.mean()),
        "other_cosine_mean": float(other_c.mean()),
    }


def _own_beats_altered(model, trainer, data: RefineData, tokens: list, batch: int) -> float | None:
    """How often a region scores its own sentence above the same sentence with one colour (or one
    garment: `tokens` says which alteration) changed."""
    has = np.array([i for i, t in enumerate(tokens) if t is not None], dtype=np.int64)
    wins = []
    for b in range(0, len(has), batch):
        idx = has[b : b + batch]
        r = _regions(model, trainer, data, data.pair_region[idx])
        altered = _tokens(model, trainer, [tokens[i] for i in idx])
        own = _sentences(model, trainer, data, idx)
        wins.append(((own * r).sum(1) > (altered * r).sum(1)).cpu().numpy())
    return float(np.concatenate(wins).mean()) if wins else None


def _regions(model, trainer, data: RefineData, rows: np.ndarray) -> torch.Tensor:
    """Embeddings of crops `rows` of `data` (rows of crops_u8, not pairs)."""
    pix = to_pixel_values(data.crops_u8[torch.from_numpy(rows)].to(trainer.device), trainer.mean, trainer.std)
    return image_embeddings(model, pix)


def _tokens(model, trainer, token_lists: list[list[int]]) -> torch.Tensor:
    ids, mask = pad_token_ids(token_lists, trainer.pad_id, trainer.device)
    return text_embeddings(model, ids, mask)


def _sentences(model, trainer, data: RefineData, idx: np.ndarray) -> torch.Tensor:
    """Embeddings of pairs `idx`' own sentences."""
    return _tokens(model, trainer, [data.pair_tokens[i] for i in idx])


def write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    tmp.replace(path)
