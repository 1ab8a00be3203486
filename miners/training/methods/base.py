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
from miners.training.evaluation import pooled_sentence_features
from miners.training.heads import mask_tokens


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
    """One training step's inputs and shared forwards (see the module docstring).

    Under torchrun every process gets the same global batch `idx_all` and computes on its own contiguous
    share `idx` (rows [rank * B/N, (rank + 1) * B/N)). Random draws (augmentations, token masks) are made
    for the whole global batch with the step's generator and then cut to the share, so N processes draw
    what one process would. Every tensor a Batch returns holds this process's rows; `gather` makes them
    the global batch's."""

    def __init__(self, trainer, data: ClipData, idx: np.ndarray, generator: torch.Generator):
        self.trainer, self.data, self.generator = trainer, data, generator
        self.cfg, self.device, self.model = trainer.cfg, trainer.device, trainer.model
        self.idx_all = idx
        world, rank = trainer.world_size, trainer.rank
        if len(idx) % world:
            raise ValueError(f"a batch of {len(idx)} does not split over {world} processes")
        share = len(idx) // world
        self.lo, self.hi = rank * share, (rank + 1) * share
        self.idx = idx[self.lo : self.hi]
        self.img_rows = data.cap_image_index[self.idx]
        self.pids = torch.from_numpy(data.cap_pids[self.idx]).to(self.device)
        lookup = trainer.class_of_pid
        self.classes = torch.tensor([lookup[int(p)] for p in data.cap_pids[self.idx]], device=self.device)
        self.num_classes = len(lookup)
        self.logs: dict[str, float] = {}
        self.logit_scale = trainer.model.logit_scale.exp().clamp(max=100.0)
        # ROGLE's local pairs of view 0 over the global batch, as (row in the global batch, pair); the image
        # augmentation drops a pair whose box it crops or erases away, for this step only
        self._pairs_all: list[tuple[int, LocalPair]] = (
            [(k, p) for k, i in enumerate(idx) for p in data.local_pairs[i]] if trainer.local_on else []
        )
        self._pixels: dict[int, torch.Tensor] = {}
        self._vision: dict[int, VisionOut] = {}
        self._boxes_all = np.zeros((0, 4), dtype=np.float32)
        self._text: TextOut | None = None
        self._view0_done = False

    @property
    def pairs(self) -> list[tuple[int, LocalPair]]:
        """This process's local pairs kept by view 0's augmentation, as (row in `idx`, pair)."""
        self.pixels(0)
        return [(k - self.lo, p) for k, p in self._pairs_all if self.lo <= k < self.hi]

    def _local_boxes(self) -> np.ndarray:
        rows = np.asarray([k for k, _ in self._pairs_all], dtype=np.int64)
        return self._boxes_all[(rows >= self.lo) & (rows < self.hi)]

    # --- images ---------------------------------------------------------------------------------
    def pixels(self, view: int = 0) -> torch.Tensor:
        """B x 3 x H x W normalised pixels of augmentation view `view` (0: the one the local pairs' boxes
        follow; k >= 1: another independent draw of the run's augmentation, e.g. IVT's view per level)."""
        if view not in self._pixels:
            trainer = self.trainer
            images = self.data.images_u8[self.data.cap_image_index[self.idx_all]]
            pairs = self._pairs_all if view == 0 else []
            boxes = np.stack([p.box_xyxy for _, p in pairs]).astype(np.float32) if pairs else None
            if trainer.image_augment is not None:
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
                    self._pairs_all = [pair for pair, ok in zip(pairs, keep, strict=True) if ok]
                    self._boxes_all = boxes_out[keep]
            elif view == 0 and boxes is not None:
                self._boxes_all = boxes
            local = images[self.lo : self.hi]
            self._pixels[view] = to_pixel_values(local.to(self.device), trainer.mean, trainer.std)
        return self._pixels[view]

    def vision(self, view: int = 0) -> VisionOut:
        """The vision forward of `view` on this process's rows, once per step (a method and the local
        branch share it)."""
        if view not in self._vision:
            pix = self.pixels(view)
            model = self.model
            hidden = model.vision_model(pixel_values=pix, interpolate_pos_encoding=True).last_hidden_state
            tokens = model.visual_projection(model.vision_model.post_layernorm(hidden))
            regions = tokens.new_zeros((0, tokens.shape[-1]))
            pairs = self.pairs if view == 0 else []
            if pairs:
                size_hw = tuple(self.data.images_u8.shape[2:])
                weights = box_patch_weights(self._local_boxes(), patch_grid_hw(model, size_hw), size_hw)
                rows = torch.tensor([k for k, _ in pairs], device=self.device)
                patches = hidden[rows, 1:]
                pooled = torch.einsum("rp,rpd->rd", torch.from_numpy(weights).to(patches), patches)
                regions = torch.nn.functional.normalize(
                    model.visual_projection(model.vision_model.post_layernorm(pooled)), dim=-1
                )
            self._vision[view] = VisionOut(tokens[:, 0], tokens, hidden, regions)
        return self._vision[view]

    # --- text -----------------------------------------------------------------------------------
    def augment_text(self, seqs: list[list[int]]) -> list[list[int]]:
        """`--text-augment` applied to token lists (unchanged without it). Draws from the step's
        generator: call it on the global batch's lists (see `text`) for draws independent of the share."""
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
        """This process's captions' global features under the run's text mode, text augmentation drawn
        over the global batch."""
        if self._text is None:
            trainer = self.trainer
            if self.cfg.text_mode == "truncate":
                seqs = self.augment_text([self.data.cap_tokens[i] for i in self.idx_all])
                ids, mask = pad_token_ids(seqs, trainer.pad_id, self.device)
                ids, mask = ids[self.lo : self.hi], mask[self.lo : self.hi]
                tokens, pooled = text_token_features(self.model, ids, mask)
                self._text = TextOut(pooled, tokens, ids, mask)
            elif self.cfg.text_mode == "sentence-pool":
                flat, owner = [], []
                for k, i in enumerate(self.idx_all):
                    flat.extend(self.data.cap_sentence_tokens[i])
                    owner.extend([k] * len(self.data.cap_sentence_tokens[i]))
                flat = self.augment_text(flat)
                mine = [j for j, k in enumerate(owner) if self.lo <= k < self.hi]
                pooled = pooled_sentence_features(
                    self.model,
                    [flat[j] for j in mine],
                    [owner[j] - self.lo for j in mine],
                    len(self.idx),
                    trainer.pad_id,
                    self.device,
                )
                self._text = TextOut(pooled, None, None, None)
            else:
                raise ValueError(
                    f"unknown text_mode {self.cfg.text_mode!r}: use 'truncate' or 'sentence-pool'"
                )
        return self._text

    def caption_token_ids(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, mask) of this process's whole captions, truncated to the context, padded to the global
        batch's longest (no augmentation)."""
        ids, mask = pad_token_ids(
            [self.data.cap_tokens[i] for i in self.idx_all], self.trainer.pad_id, self.device
        )
        return ids[self.lo : self.hi], mask[self.lo : self.hi]

    def mask_captions(self, prob: float = 0.15) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """IRRA's token masking (heads.mask_tokens) drawn over the global batch's captions: (masked ids,
        labels (-100 where not masked), attention mask), this process's rows, on the device."""
        trainer = self.trainer
        ids, mask = pad_token_ids([self.data.cap_tokens[i] for i in self.idx_all], trainer.pad_id)
        masked, labels = mask_tokens(
            ids,
            mask,
            mask_id=trainer.mask_id,
            vocab_size=trainer.vocab_size,
            special_ids=trainer.special_ids,
            generator=self.generator,
            prob=prob,
        )
        cut = slice(self.lo, self.hi)
        return masked[cut].to(self.device), labels[cut].to(self.device), mask[cut].to(self.device)

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N x T x E token features, N x E pooled EOS feature), unnormalised, for any token ids."""
        return text_token_features(self.model, ids, mask)

    # --- distribution ------------------------------------------------------------------------------
    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every process's rows of `x` in rank order, with gradients (one process: `x` itself). Apply it to
        features, pids and classes alike before a loss that compares rows across the batch."""
        return self.trainer.gather(x)

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """The mean of per-item loss values over the global batch (e.g. MLM's masked tokens, which differ
        in number per process): a per-process mean would weigh the processes' items unequally."""
        values = self.gather(values)
        return values.mean() if values.numel() else values.sum()


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
