"""CLIP scoring of regions against text units.

Consumes a `from_pretrained` CLIP directory (the tiny bootstrapped model, or a real one such as a saved
openai/clip-vit-base-patch16), images (H x W x 3 uint8) with their `Regions`, and text units; produces
per-sample cosine matrices (units x regions). Region crops are made in one of three modes — `box`
(the box's pixels), `mask` (background blanked to the processor's mean colour) and `blur` (background
Gaussian-blurred) — and ALL crops of a batch of images go through ONE batched vision forward per
`batch_size` crops; a caller may make the crops first (`region_crops`) and score them later
(`score_crops`), to drop each full-size image early. Identical texts are embedded once; nothing to score
runs no model. Inference only; bf16 autocast on CUDA.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

from miners.encoders import (
    encode_texts,
    image_embeddings,
    input_size_hw,
    normalisation,
    pick_device,
    to_pixel_values,
)
from miners.model_folder import CROP_MODES, clip_folder_problem, model_fingerprint


@dataclass(frozen=True)
class ScorerConfig:
    crop_mode: str = "box"
    crop_padding_frac: float = 0.05  # context around each box, as a fraction of its size
    batch_size: int = 256
    blur_radius_px: float = 6.0
    device: str = "auto"
    # Text embeddings kept across calls (least recently used out first): a miner embeds the same
    # strings again and again (the colour probe's variants, templated or repeated sentences). 0: off.
    # Speed only: the model is frozen while it scores.
    text_cache_entries: int = 0


def load_clip(model_dir: str | Path, device: str = "auto"):
    """(model, processor) from a local folder; nothing is fetched from a hub."""
    from transformers import AutoProcessor, CLIPModel

    model_dir = Path(model_dir)
    problem = clip_folder_problem(model_dir)
    if problem:
        raise FileNotFoundError(
            f"{problem}; build one with "
            "`python -m miners.training.bootstrap` or save a real CLIP there with save_pretrained"
        )
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a "Loading weights" bar per load says nothing about a local folder
    model = CLIPModel.from_pretrained(model_dir, local_files_only=True)
    processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
    return model.to(pick_device(device)).eval(), processor


class ClipScorer:
    def __init__(self, model_dir: str | Path, cfg: ScorerConfig | None = None):
        self.cfg = cfg or ScorerConfig()
        if self.cfg.crop_mode not in CROP_MODES:
            raise ValueError(f"crop_mode {self.cfg.crop_mode!r}: use one of {CROP_MODES}")
        self.model, self.processor = load_clip(model_dir, self.cfg.device)
        self.device = next(self.model.parameters()).device
        self._text_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.fingerprint = model_fingerprint(model_dir)
        self.size_hw = input_size_hw(self.processor)
        self.mean, self.std = normalisation(self.processor)
        self._fill_rgb = tuple(int(round(255 * m)) for m in self.processor.image_processor.image_mean)

    # --- crops ---------------------------------------------------------------------------------------
    def crop(self, image_rgb: np.ndarray, box_xyxy: np.ndarray, mask_hw: np.ndarray | None) -> np.ndarray:
        """One region as a 3 x H x W uint8 array at the model's input size."""
        h, w = image_rgb.shape[:2]
        x0, y0, x1, y1 = (float(v) for v in box_xyxy)
        pad_x, pad_y = (x1 - x0) * self.cfg.crop_padding_frac, (y1 - y0) * self.cfg.crop_padding_frac
        x0, y0 = int(max(0, np.floor(x0 - pad_x))), int(max(0, np.floor(y0 - pad_y)))
        x1, y1 = int(min(w, np.ceil(x1 + pad_x))), int(min(h, np.ceil(y1 + pad_y)))
        x1, y1 = max(x1, x0 + 1), max(y1, y0 + 1)
        patch = Image.fromarray(image_rgb[y0:y1, x0:x1])
        if self.cfg.crop_mode != "box":
            if mask_hw is None:  # a box-only region: its box is its mask
                keep = np.zeros((h, w), dtype=bool)
                keep[
                    int(box_xyxy[1]) : int(np.ceil(box_xyxy[3])), int(box_xyxy[0]) : int(np.ceil(box_xyxy[2]))
                ] = True
            else:
                keep = mask_hw
            keep_img = Image.fromarray((keep[y0:y1, x0:x1] * 255).astype(np.uint8))
            if self.cfg.crop_mode == "mask":
                background = Image.new("RGB", patch.size, self._fill_rgb)
            else:
                background = patch.filter(ImageFilter.GaussianBlur(self.cfg.blur_radius_px))
            patch = Image.composite(patch, background, keep_img)
        patch = patch.resize((self.size_hw[1], self.size_hw[0]), Image.Resampling.BICUBIC)
        return np.asarray(patch).transpose(2, 0, 1)

    # --- embeddings ----------------------------------------------------------------------------------
    def embed_crops(self, crops_chw: list[np.ndarray]) -> torch.Tensor:
        out = []
        with (
            torch.inference_mode(),
            torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"),
        ):
            for i in range(0, len(crops_chw), self.cfg.batch_size):
                batch = torch.from_numpy(np.stack(crops_chw[i : i + self.cfg.batch_size])).to(self.device)
                out.append(image_embeddings(self.model, to_pixel_values(batch, self.mean, self.std)).float())
        return torch.cat(out) if out else self._no_embeddings()

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """Embeddings for `texts`, computing each distinct string once — and, with
        `text_cache_entries`, once across calls (none: a 0 x E tensor)."""
        if not texts:  # tokenizers fail on an empty batch (IndexError), and there is nothing to run
            return self._no_embeddings()
        unique = list(dict.fromkeys(texts))
        cache, limit = self._text_cache, self.cfg.text_cache_entries
        missing = [t for t in unique if t not in cache] if limit else unique
        found: dict[str, torch.Tensor] = {}
        if missing:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                emb = encode_texts(self.model, self.processor, missing, self.cfg.batch_size, self.device)
            found = dict(zip(missing, emb, strict=True))
        if not limit:
            return torch.stack([found[t] for t in texts])
        for t in unique:
            if t in found:
                cache[t] = found[t]
            else:
                found[t] = cache[t]
                cache.move_to_end(t)
        while len(cache) > limit:
            cache.popitem(last=False)
        return torch.stack([found[t] for t in texts])

    def clear_text_cache(self) -> None:
        """Forget every cached text embedding (what `embed_texts` returns next depends on its input alone)."""
        self._text_cache.clear()

    def _no_embeddings(self) -> torch.Tensor:
        """0 x E, on the model's device so it multiplies with real embeddings."""
        return torch.zeros((0, self.model.config.projection_dim), device=self.device)

    def region_crops(self, image_rgb: np.ndarray, regions) -> list[np.ndarray]:
        """The model-input crops of one image's regions, in region order (none for no regions)."""
        return [self.crop(image_rgb, regions.boxes_xyxy[r], regions.masks[r]) for r in range(len(regions))]

    def score(
        self,
        images: list[np.ndarray],
        regions: list,
        texts_per_sample: list[list[str]],
        image_of_sample: list[int],
    ) -> list[np.ndarray]:
        """Cosine matrices, one per sample: len(texts) x len(regions of its image).

        images[i] has regions[i] (a `miners.regions.Regions`); sample j's texts are scored against the
        regions of image `image_of_sample[j]` — several captions share one image's crops. Empty inputs
        are fine: no samples give [], a sample without texts a 0 x R matrix, an image without regions
        N x 0 matrices; the model runs only on what exists.
        """
        if not texts_per_sample:
            return []
        crops = [self.region_crops(image, regs) for image, regs in zip(images, regions, strict=True)]
        return self.score_crops(crops, texts_per_sample, image_of_sample)

    def score_crops(
        self,
        crops_per_image: list[list[np.ndarray]],
        texts_per_sample: list[list[str]],
        image_of_sample: list[int],
    ) -> list[np.ndarray]:
        """`score` from crops made beforehand (`region_crops`), so a caller can drop each full-size
        image as soon as its crops exist; all crops still go through one batched vision pass."""
        region_emb, text_emb = self.embed_crops_and_texts(crops_per_image, texts_per_sample)
        return [t @ region_emb[image_of_sample[j]].T for j, t in enumerate(text_emb)]

    def embed_crops_and_texts(
        self, crops_per_image: list[list[np.ndarray]], texts_per_sample: list[list[str]]
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """(per image: R x E region embeddings, per sample: S x E text embeddings), L2-normalised float32
        numpy; one batched vision pass over all crops, one text pass (each distinct text once)."""
        if not texts_per_sample:
            return [], []
        crops = [c for image_crops in crops_per_image for c in image_crops]
        bounds = np.cumsum([0, *(len(c) for c in crops_per_image)])
        region_emb = self.embed_crops(crops).cpu().numpy().astype(np.float32)
        per_image = [region_emb[bounds[i] : bounds[i + 1]] for i in range(len(crops_per_image))]
        text_emb = (
            self.embed_texts([t for ts in texts_per_sample for t in ts]).cpu().numpy().astype(np.float32)
        )
        bounds = np.cumsum([0, *(len(ts) for ts in texts_per_sample)])
        per_sample = [text_emb[bounds[j] : bounds[j + 1]] for j in range(len(texts_per_sample))]
        return per_image, per_sample
