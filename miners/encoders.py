"""CLIP forward helpers shared by the scorer, the trainer and evaluation.

Consumes a `transformers.CLIPModel` (tiny bootstrapped or real, loaded with `from_pretrained`) and
pre-processed tensors; produces L2-normalised embeddings in the joint space:
- `image_embeddings`: one per image (pooled CLS → projection);
- `region_embeddings`: one per box, pooled from the vision tower's patch tokens inside the box, from the
  SAME single vision forward per image (never a forward per crop);
- `text_embeddings`: one per token sequence.
transformers 5.x returns output objects from `get_*_features`; these helpers go through the towers
directly so they work the same on 4.x and 5.x.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def pick_device(name: str = "auto") -> torch.device:
    """ "auto": CUDA when present, else the CPU; any other name is passed to torch as is."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def input_size_hw(processor, default_hw: tuple[int, int] = (384, 128)) -> tuple[int, int]:
    """The (height, width) images are resized to: the processor's explicit size, else `default_hw`
    (pedestrian aspect, as IRRA's 384 x 128, run with interpolated position embeddings)."""
    size = getattr(processor.image_processor, "size", None) or {}
    if "height" in size and "width" in size:
        return int(size["height"]), int(size["width"])
    return default_hw


def normalisation(processor) -> tuple[torch.Tensor, torch.Tensor]:
    ip = processor.image_processor
    mean = torch.tensor(ip.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(ip.image_std, dtype=torch.float32).view(1, 3, 1, 1)
    return mean, std


def to_pixel_values(images_u8: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """B x 3 x H x W uint8 (already at model input size) → normalised float pixel values."""
    x = images_u8.float().div_(255.0)
    return (x - mean.to(x.device)) / std.to(x.device)


def _vision_tokens(model, pixel_values: torch.Tensor) -> torch.Tensor:
    out = model.vision_model(pixel_values=pixel_values, interpolate_pos_encoding=True)
    return out.last_hidden_state  # B x (1 + P) x D


def _project_vision(model, tokens_bd: torch.Tensor) -> torch.Tensor:
    pooled = model.vision_model.post_layernorm(tokens_bd)
    return F.normalize(model.visual_projection(pooled), dim=-1)


def image_embeddings(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """B x E normalised image embeddings."""
    return _project_vision(model, _vision_tokens(model, pixel_values)[:, 0])


def patch_grid_hw(model, image_hw: tuple[int, int]) -> tuple[int, int]:
    patch = model.config.vision_config.patch_size
    return image_hw[0] // patch, image_hw[1] // patch


def box_patch_weights(
    boxes_xyxy: np.ndarray, grid_hw: tuple[int, int], image_hw: tuple[int, int]
) -> np.ndarray:
    """R x P weights (rows sum to 1) selecting the patches whose centres fall inside each box
    (box in model-input pixels); a box too small to hold a centre takes its nearest patch."""
    gh, gw = grid_hw
    ph, pw = image_hw[0] / gh, image_hw[1] / gw
    cy = (np.arange(gh) + 0.5) * ph
    cx = (np.arange(gw) + 0.5) * pw
    boxes = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    inside_y = (cy[None, :] >= boxes[:, 1:2]) & (cy[None, :] < boxes[:, 3:4])  # R x gh
    inside_x = (cx[None, :] >= boxes[:, 0:1]) & (cx[None, :] < boxes[:, 2:3])  # R x gw
    w = (inside_y[:, :, None] & inside_x[:, None, :]).reshape(len(boxes), gh * gw).astype(np.float32)
    empty = w.sum(1) == 0
    if empty.any():
        centre_y = (boxes[empty, 1] + boxes[empty, 3]) / 2
        centre_x = (boxes[empty, 0] + boxes[empty, 2]) / 2
        iy = np.clip((centre_y / ph).astype(int), 0, gh - 1)
        ix = np.clip((centre_x / pw).astype(int), 0, gw - 1)
        w[np.flatnonzero(empty), iy * gw + ix] = 1.0
    return w / w.sum(1, keepdims=True)


def image_and_region_embeddings(
    model, pixel_values: torch.Tensor, region_image_index: torch.Tensor, region_patch_weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One vision forward for B images → (B x E image embeddings, R x E region embeddings).

    region_image_index: R (which image each region belongs to); region_patch_weights: R x P
    (from `box_patch_weights`, P = patches per image). Region tokens are weighted means of patch
    tokens, then the same post-layernorm and projection as the CLS token.
    """
    tokens = _vision_tokens(model, pixel_values)
    images = _project_vision(model, tokens[:, 0])
    if region_image_index.numel() == 0:
        return images, images.new_zeros((0, images.shape[1]))
    patches = tokens[region_image_index, 1:]  # R x P x D
    pooled = torch.einsum("rp,rpd->rd", region_patch_weights.to(patches.dtype), patches)
    return images, _project_vision(model, pooled)


def text_embeddings(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """N x E normalised text embeddings (CLIP pools the first EOS token)."""
    return F.normalize(text_features(model, input_ids, attention_mask), dim=-1)


def text_features(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """N x E *unnormalised* projections of the pooled EOS token (`text_embeddings` before L2)."""
    out = model.text_model(input_ids=input_ids, attention_mask=attention_mask)
    return model.text_projection(out.pooler_output)


def vision_token_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """B x (1 + P) x E *unnormalised* projections of every vision token (CLS first): post-layernorm and
    the visual projection applied to each token, as IRRA does for its cross-modal fusion. Row 0,
    L2-normalised, is `image_embeddings`."""
    tokens = _vision_tokens(model, pixel_values)
    return model.visual_projection(model.vision_model.post_layernorm(tokens))


def text_token_features(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N x T x E projections of every text token, N x E projection of the pooled EOS token), both
    *unnormalised*. The text tower's last hidden state already has its final layer norm. The pooled row,
    L2-normalised, is `text_embeddings`."""
    out = model.text_model(input_ids=input_ids, attention_mask=attention_mask)
    return model.text_projection(out.last_hidden_state), model.text_projection(out.pooler_output)


def pad_token_ids(seqs: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id lists → (input_ids, attention_mask), both N x T long."""
    length = max((len(s) for s in seqs), default=1)
    ids = torch.full((len(seqs), max(length, 1)), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def tokenize(processor, texts: list[str], max_tokens: int | None = None) -> list[list[int]]:
    """Token id lists (with BOS/EOS, truncated to the model's context) for `texts`."""
    tok = processor.tokenizer
    limit = max_tokens or min(int(getattr(tok, "model_max_length", 77) or 77), 77)
    return tok(list(texts), truncation=True, max_length=limit)["input_ids"]


def encode_texts(model, processor, texts: list[str], batch_size: int = 256, device=None) -> torch.Tensor:
    """N x E embeddings for raw strings, batched; inference only.

    Batches are cut from the texts sorted by token count, so a batch pads to about its own length, not
    to the longest text of the call (a sentence of 12 tokens beside one of 60 cost 60 positions).
    CLIP's text tower is causal and pools the EOS token, so right-padding does not change a text's
    embedding beyond float rounding."""
    device = device or next(model.parameters()).device
    pad_id = processor.tokenizer.pad_token_id or 0
    ids = tokenize(processor, texts)
    order = sorted(range(len(ids)), key=lambda k: len(ids[k]))
    outs = []
    with torch.inference_mode():
        for i in range(0, len(order), batch_size):
            input_ids, mask = pad_token_ids([ids[k] for k in order[i : i + batch_size]], pad_id, device)
            outs.append(text_embeddings(model, input_ids, mask).float())
    if not outs:
        return torch.zeros((0, model.config.projection_dim))
    emb = torch.cat(outs)
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
    return emb[inverse.to(emb.device)]
