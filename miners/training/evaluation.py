"""TBPS evaluation protocols on `ClipData`.

Consumes a CLIP model and evaluation `ClipData` (test split); produces metric dicts:
- global: text→image retrieval (R1/R5/R10/mAP/mINP via miners.metrics), all queries and the long-query
  subset (captions with ≥ LONG_QUERY_MIN_SENTENCES sentences);
- local: sentence→region grounding accuracy against ground-truth links (pvlg / synthetic): each
  groundable ground-truth sentence picks one of its image's ground-truth regions; correct when the pick
  is one of the sentence's linked regions.
"""

from __future__ import annotations

import numpy as np
import torch

from miners.encoders import (
    box_patch_weights,
    image_and_region_embeddings,
    image_embeddings,
    normalisation,
    pad_token_ids,
    patch_grid_hw,
    text_embeddings,
    text_features,
    to_pixel_values,
    tokenize,
)
from miners.metrics import retrieval_metrics
from miners.training.data import ClipData

LONG_QUERY_MIN_SENTENCES = 5


def caption_features(
    model, data: ClipData, indices: np.ndarray, text_mode: str, pad_id: int, device
) -> torch.Tensor:
    """Unnormalised global text features for captions `indices`: the whole caption's projected EOS token
    ("truncate"), or the sum of its sentences' normalised embeddings ("sentence-pool": L2-normalised, that
    is their normalised mean)."""
    if text_mode == "truncate":
        ids, mask = pad_token_ids([data.cap_tokens[i] for i in indices], pad_id, device)
        return text_features(model, ids, mask)
    if text_mode != "sentence-pool":
        raise ValueError(f"unknown text_mode {text_mode!r}: use 'truncate' or 'sentence-pool'")
    flat, owner = [], []
    for k, i in enumerate(indices):
        flat.extend(data.cap_sentence_tokens[i])
        owner.extend([k] * len(data.cap_sentence_tokens[i]))
    return pooled_sentence_features(model, flat, owner, len(indices), pad_id, device)


def pooled_sentence_features(
    model, sentences: list[list[int]], owner: list[int], n: int, pad_id: int, device
) -> torch.Tensor:
    """n x E: row k is the sum of the normalised embeddings of the sentences whose owner is k."""
    ids, mask = pad_token_ids(sentences, pad_id, device)
    sent = text_embeddings(model, ids, mask)
    owner_t = torch.tensor(owner, device=sent.device)
    pooled = torch.zeros((n, sent.shape[1]), device=sent.device, dtype=sent.dtype)
    pooled.index_add_(0, owner_t, sent)
    return pooled


def caption_embeddings(
    model, data: ClipData, indices: np.ndarray, text_mode: str, pad_id: int, device
) -> torch.Tensor:
    """Global text embeddings (L2-normalised `caption_features`): the whole caption ("truncate") or the
    normalised mean of its sentence embeddings ("sentence-pool")."""
    return torch.nn.functional.normalize(
        caption_features(model, data, indices, text_mode, pad_id, device), dim=-1
    )


TEXT_MODES = ("sentence-pool", "truncate")


@torch.inference_mode()
def evaluate_global(
    model, data: ClipData, processor, text_mode: str, batch_size: int = 256, all_text_modes: bool = True
) -> dict:
    """Text→image figures (and image→text under "i2t", the long-query subset under "long_query") for
    `text_mode`; with `all_text_modes`, "text_modes" holds the headline figures of every way a long caption
    becomes one query (both are in use in the field: IRRA truncates at 77 tokens), from the same gallery."""
    device = next(model.parameters()).device
    model.eval()
    mean, std = normalisation(processor)
    pad_id = processor.tokenizer.pad_token_id or 0
    gallery = torch.cat(
        [
            image_embeddings(model, to_pixel_values(data.images_u8[i : i + batch_size].to(device), mean, std))
            for i in range(0, data.images_u8.shape[0], batch_size)
        ]
    ).float()
    all_idx = np.arange(len(data))
    by_mode: dict[str, dict] = {}
    for mode in [text_mode] + [m for m in TEXT_MODES if m != text_mode and all_text_modes]:
        queries = torch.cat(
            [
                caption_embeddings(model, data, all_idx[i : i + batch_size], mode, pad_id, device).float()
                for i in range(0, len(data), batch_size)
            ]
        )
        # ranked where it was computed: a GPU evaluation never copies the Q x G matrix to the host
        by_mode[mode] = _retrieval_figures(queries @ gallery.T, data)
        by_mode[mode]["num_gallery"] = int(gallery.shape[0])
    out = by_mode[text_mode]
    out["text_mode"] = text_mode
    if all_text_modes:
        out["text_modes"] = {
            mode: {k: v for k, v in figures.items() if k in ("R1", "R5", "R10", "mAP", "mINP")}
            | {
                "long_query_R1": figures["long_query"].get("R1"),
                "i2t_R1": figures["i2t"].get("R1"),
            }
            for mode, figures in by_mode.items()
        }
    return out


def _retrieval_figures(sim: torch.Tensor, data: ClipData) -> dict:
    out = retrieval_metrics(sim, data.cap_pids, data.image_pids)
    out["num_queries"] = len(data)
    try:  # image→text: each image ranks the captions; relevant = the same person's captions
        out["i2t"] = retrieval_metrics(sim.T, data.image_pids, data.cap_pids)
    except ValueError as exc:  # an image none of whose person's captions is in the set
        out["i2t"] = {"unavailable": str(exc)}
    long_mask = data.cap_n_sentences >= LONG_QUERY_MIN_SENTENCES
    if long_mask.any():
        rows = torch.from_numpy(np.flatnonzero(long_mask)).to(sim.device)
        long = retrieval_metrics(sim[rows], data.cap_pids[long_mask], data.image_pids)
        long["num_queries"] = int(long_mask.sum())
    else:
        long = {"num_queries": 0}
    long["min_sentences"] = LONG_QUERY_MIN_SENTENCES
    out["long_query"] = long
    return out


@torch.inference_mode()
def evaluate_local(model, data: ClipData, processor, max_images: int = 2000) -> dict:
    """Sentence→region grounding accuracy; {"local_grounding_acc": None} without ground truth."""
    device = next(model.parameters()).device
    model.eval()
    mean, std = normalisation(processor)
    pad_id = processor.tokenizer.pad_token_id or 0
    size_hw = tuple(data.images_u8.shape[2:])
    grid = patch_grid_hw(model, size_hw)
    correct = total = 0
    region_emb_of: dict[int, torch.Tensor] = {}  # one vision forward per image, shared by its captions
    for cap_i, links in enumerate(data.cap_gt_links):
        img_i = int(data.cap_image_index[cap_i])
        regions = data.image_gt_regions[img_i]
        if not links or not regions or (img_i not in region_emb_of and len(region_emb_of) >= max_images):
            continue
        texts, targets = [], []
        for link in links:
            if link.get("region_ids"):
                s, e = link["span"]
                texts.append(data.captions[cap_i][s:e])
                targets.append({k for k, r in enumerate(regions) if r["id"] in link["region_ids"]})
        if not texts:
            continue
        if img_i not in region_emb_of:
            sx, sy = data.image_scale_xy[img_i]
            boxes = np.asarray([r["bbox"] for r in regions], dtype=np.float32) * np.array([sx, sy, sx, sy])
            weights = torch.from_numpy(box_patch_weights(boxes, grid, size_hw)).to(device)
            pix = to_pixel_values(data.images_u8[img_i : img_i + 1].to(device), mean, std)
            index = torch.zeros(len(regions), dtype=torch.long, device=device)
            region_emb_of[img_i] = image_and_region_embeddings(model, pix, index, weights)[1]
        region_emb = region_emb_of[img_i]
        ids, mask = pad_token_ids(tokenize(processor, texts), pad_id, device)
        picks = (text_embeddings(model, ids, mask) @ region_emb.T).argmax(1).tolist()
        correct += sum(int(p in t) for p, t in zip(picks, targets, strict=True))
        total += len(texts)
    return {"local_grounding_acc": (100.0 * correct / total) if total else None, "local_sentences": total}
