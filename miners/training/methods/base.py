"""What a training method is, and the batch it sees.

A method (`--method NAME`) is one small module: its options (a dataclass: the config fields that are its
own, each labelled where it follows a paper and where it is the project's choice), its training-only heads,
and `loss(batch) -> (loss, logs)`. The Trainer owns everything else — the loop, the optimizer and its
parameter groups, AMP, checkpoints and exact resume, evaluation — and adds ROGLE's reliability-weighted
region–sentence branch (`--local rsm`) to whatever the method returns, from the same vision forward.

`Batch` is the one place a batch's tensors are made, lazily and once: the augmented image views, the vision
forward (CLS feature, every token's projected feature, the hidden states, the local pairs' region
embeddings), the captions' text features under the run's text mode, token-level text features, the
identities as person ids and as classifier classes. Every tensor a batch-wide loss compares goes through
`batch.gather` first (one process: the identity; torch.distributed: all ranks' rows, with gradients), so
that a method written against this interface sees the whole global batch under DDP.

Consumes: a Trainer (model, processor, config, heads, device), the training `ClipData` and the batch's
caption indices. Produces: features on the trainer's device; nothing is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from miners.encoders import (
    box_patch_weights,
    pad_token_ids,
    patch_grid_hw,
    text_token_features,
    to_pixel_values,
)
from miners.training.augment import augment_batch, augment_tokens
from miners.training.data import ClipData, LocalPair


@dataclass
class VisionOut:
    image: torch.Tensor  # B x E unnormalised projection of CLS (post-layernorm + visual projection)
    tokens: torch.Tensor  # B x (1 + P) x E the same projection of every token (CLS first)
    hidden: torch.Tensor  # B x (1 + P) x D the vision tower's last hidden state (before post-layernorm)
    regions: torch.Tensor  # R x E L2-normalised region embeddings of the batch's local pairs (view 0 only)


@dataclass
class TextOut:
    pooled: torch.Tensor  # B x E unnormalised global caption features under the run's text mode
    tokens: torch.Tensor | None  # N x T x E every token's projection ("truncate" mode; None otherwise)
    ids: torch.Tensor | None  # N x T the (augmented) token ids fed to the text tower, padded
    mask: torch.Tensor | None  # N x T attention mask


class Batch:
    """One training step's inputs and shared forwards (see the module docstring)."""

    def __init__(self, trainer, data: ClipData, idx: np.ndarray, generator: torch.Generator):
        self.trainer, self.data, self.idx, self.generator = trainer, data, idx, generator
        self.cfg, self.device, self.model = trainer.cfg, trainer.device, trainer.model
        self.img_rows = data.cap_image_index[idx]
        self.pids = torch.from_numpy(data.cap_pids[idx]).to(self.device)
        lookup = trainer.class_of_pid
        self.classes = torch.tensor([lookup[int(p)] for p in data.cap_pids[idx]], device=self.device)
        self.num_classes = len(lookup)
        self.logs: dict[str, float] = {}
        self.logit_scale = trainer.model.logit_scale.exp().clamp(max=100.0)
        # ROGLE's local pairs of view 0, as (row in the batch, pair); the image augmentation drops a pair
        # whose box it crops or erases away, for this step only
        self.pairs: list[tuple[int, LocalPair]] = (
            [(k, p) for k, i in enumerate(idx) for p in data.local_pairs[i]] if trainer.local_on else []
        )
        self._pixels: dict[int, torch.Tensor] = {}
        self._vision: dict[int, VisionOut] = {}
        self._boxes = np.zeros((0, 4), dtype=np.float32)
        self._text: TextOut | None = None

    # --- images ---------------------------------------------------------------------------------
    def pixels(self, view: int = 0) -> torch.Tensor:
        """B x 3 x H x W normalised pixels of augmentation view `view` (0: the one the local pairs' boxes
        follow; k >= 1: another independent draw of the run's augmentation, e.g. IVT's view per level)."""
        if view not in self._pixels:
            trainer = self.trainer
            images = self.data.images_u8[self.img_rows]
            if trainer.image_augment is not None:
                pairs = self.pairs if view == 0 else []
                boxes = np.stack([p.box_xyxy for _, p in pairs]).astype(np.float32) if pairs else None
                gen = self.generator if view == 0 else _view_generator(self.cfg.seed, trainer.step, view)
                images, boxes_out, keep = augment_batch(
                    images,
                    np.asarray([k for k, _ in pairs], dtype=np.int64),
                    boxes if boxes is not None else np.zeros((0, 4), dtype=np.float32),
                    trainer.image_augment,
                    gen,
                    fill_u8=trainer.fill_u8,
                )
                if view == 0:
                    if pairs:
                        self.logs["local_pairs_kept_frac"] = float(np.mean(keep))
                    self.pairs = [pair for pair, ok in zip(pairs, keep, strict=True) if ok]
                    self._boxes = boxes_out[keep]
            elif view == 0 and self.pairs:
                self._boxes = np.stack([p.box_xyxy for _, p in self.pairs]).astype(np.float32)
            self._pixels[view] = to_pixel_values(images.to(self.device), trainer.mean, trainer.std)
        return self._pixels[view]

    def vision(self, view: int = 0) -> VisionOut:
        """The vision forward of `view`, once per step (a method and the local branch share it)."""
        if view not in self._vision:
            pix = self.pixels(view)
            model = self.model
            hidden = model.vision_model(pixel_values=pix, interpolate_pos_encoding=True).last_hidden_state
            tokens = model.visual_projection(model.vision_model.post_layernorm(hidden))
            regions = tokens.new_zeros((0, tokens.shape[-1]))
            if view == 0 and self.pairs:
                size_hw = tuple(self.data.images_u8.shape[2:])
                weights = box_patch_weights(self._boxes, patch_grid_hw(model, size_hw), size_hw)
                rows = torch.tensor([k for k, _ in self.pairs], device=self.device)
                patches = hidden[rows, 1:]
                pooled = torch.einsum("rp,rpd->rd", torch.from_numpy(weights).to(patches), patches)
                regions = torch.nn.functional.normalize(
                    model.visual_projection(model.vision_model.post_layernorm(pooled)), dim=-1
                )
            self._vision[view] = VisionOut(tokens[:, 0], tokens, hidden, regions)
        return self._vision[view]

    # --- text -----------------------------------------------------------------------------------
    def augment_text(self, seqs: list[list[int]]) -> list[list[int]]:
        """`--text-augment` applied to token lists (unchanged without it)."""
        trainer = self.trainer
        if trainer.text_augment is None:
            return seqs
        return augment_tokens(
            seqs,
            trainer.text_augment,
            mask_id=trainer.mask_id,
            vocab_size=trainer.vocab_size,
            special_ids=trainer.special_ids,
            generator=self.generator,
        )

    def text(self) -> TextOut:
        """The captions' global features under the run's text mode, with the text augmentation."""
        if self._text is None:
            from miners.training.evaluation import caption_features

            if self.cfg.text_mode == "truncate":
                seqs = self.augment_text([self.data.cap_tokens[i] for i in self.idx])
                ids, mask = pad_token_ids(seqs, self.trainer.pad_id, self.device)
                tokens, pooled = text_token_features(self.model, ids, mask)
                self._text = TextOut(pooled, tokens, ids, mask)
            else:
                pooled = caption_features(
                    self.model,
                    self.data,
                    self.idx,
                    self.cfg.text_mode,
                    self.trainer.pad_id,
                    self.device,
                    self.augment_text if self.trainer.text_augment is not None else None,
                )
                self._text = TextOut(pooled, None, None, None)
        return self._text

    def caption_token_ids(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, mask) of the whole captions, truncated to the context (no augmentation): MLM's input."""
        return pad_token_ids([self.data.cap_tokens[i] for i in self.idx], self.trainer.pad_id, self.device)

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N x T x E token features, N x E pooled EOS feature), unnormalised, for any token ids."""
        return text_token_features(self.model, ids, mask)

    # --- distribution ------------------------------------------------------------------------------
    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's rows of `x` in rank order, with gradients (one process: `x` itself). Apply it to
        features, pids and classes alike before a loss that compares rows across the batch."""
        return self.trainer.gather(x)


def _view_generator(seed: int, step: int, view: int) -> torch.Generator:
    state = np.random.SeedSequence([seed, step, 0x5EED, view]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


@dataclass
class NoOptions:
    """A method without options of its own."""


class Method:
    """A training method: subclass, set `name`, `options` (a dataclass of the method's own settings, with
    defaults) and `defaults` (TrainConfig fields the method sets unless the preset, the config file or a
    flag does), and implement `build_heads` and `loss`. Stateless: per-run state lives in the heads."""

    name: ClassVar[str] = ""
    options: ClassVar[type] = NoOptions
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, options: Any = None):
        self.opts = options if options is not None else self.options()

    def build_heads(self, trainer, train: ClipData) -> dict[str, torch.nn.Module]:
        """The training-only modules (saved beside the CLIP folder as heads.pt, never in it). Their
        parameter names decide their lr: names holding cross / classifier / mlm_head get head_lr_factor."""
        return {}

    def loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """The method's loss on `batch` and the parts to log ("loss_<part>": float)."""
        raise NotImplementedError
