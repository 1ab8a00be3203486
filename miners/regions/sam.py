"""Segment-anything region proposers: prior zones as box prompts ("sam-prompted"), or a point grid ("sam-auto").

Consumes a SAM model (a real checkpoint loaded by `load_sam`, or the tiny randomly initialised one from
`build_tiny_sam` for tests) and H x W x 3 uint8 images; produces `Regions` with boolean H x W masks,
tight boxes around them (storage.rle.mask_to_box_xyxy) and body-part labels from the prior zones.

sam-prompted: one image embedding per image, the prior zones of that image decoded as box prompts in a
  single batch (3 masks each), the mask with the highest predicted IoU kept per prompt;
  quality = predicted IoU clipped to [0, 1]; label = the prompting zone's. Empty masks are dropped.
  Canvas packing (`pack_images` > 1, in `propose_batch`): tall narrow pedestrian images share one
  encoder canvas, each resized into its own column (`canvas_slots`), so one encoder pass serves several
  images; each image's zone boxes are offset into its column, all of a canvas's prompts decode in one
  call, and each mask is cut back out of its column and resized to its image's own size. The encoder
  sees its neighbours (global attention, absolute position embeddings), so packed masks approximate
  the unpacked ones (tests/miners/test_sam_packing.py measures by how much).
sam-auto: `SamAutomaticMaskGenerator` with pedestrian-sized settings, then area filters, duplicate
  removal (mask IoU > dedup_mask_iou keeps the better one) and the best `max_regions`;
  quality = clip(predicted IoU) x stability score (both in [0, 1]: a mask must be both confident and
  stable under threshold shifts to rank high); label = the zone holding the largest share of the mask.

torch and segment_anything are imported when a model or proposer is built, never at module import.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from miners.regions.base import RegionProposer, Regions, check_image_rgb, top_k_by_quality
from miners.regions.prior import PriorConfig, estimate_person_extent, label_masks_by_zones, prior_zones
from storage.rle import mask_iou, mask_to_box_xyxy

TINY_SAM_TYPE = "tiny"
SAM_PATCH_PX = 16


def _import_sam() -> tuple[Any, Any]:
    """(torch, segment_anything), or an ImportError that says what to install."""
    try:
        import segment_anything
        import torch
    except ImportError as err:
        raise ImportError(
            "SAM region proposers need torch, torchvision and segment-anything "
            "(pip install torch torchvision segment-anything==1.0); the 'prior' proposer needs none"
        ) from err
    return torch, segment_anything


def resolve_device(device: str | None) -> str:
    """`device` as given, or "cuda" when a GPU is visible, else "cpu"."""
    torch, _ = _import_sam()
    if device is not None:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def sam_model_types() -> tuple[str, ...]:
    """Names `load_sam` accepts: segment-anything's registry plus "tiny"."""
    _, sa = _import_sam()
    return (TINY_SAM_TYPE, *sa.sam_model_registry.keys())


def build_tiny_sam(img_size: int = 256, seed: int = 0):
    """A randomly initialised tiny SAM (~0.2M parameters) from segment_anything.modeling parts.

    Same wiring as the real ones (ViT encoder with windowed + global attention, prompt encoder, two-way
    transformer mask decoder), shrunk so that tests run in milliseconds on CPU. The global RNG is left
    untouched: `seed` alone fixes the weights.
    """
    torch, sa = _import_sam()
    m = sa.modeling
    if img_size % SAM_PATCH_PX:
        raise ValueError(f"img_size must be a multiple of {SAM_PATCH_PX}, got {img_size}")
    prompt_dim = 32  # the mask decoder upsamples to prompt_dim // 8 channels, so a multiple of 8
    grid = img_size // SAM_PATCH_PX
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sam = m.Sam(
            image_encoder=m.ImageEncoderViT(
                img_size=img_size,
                patch_size=SAM_PATCH_PX,
                embed_dim=64,
                depth=2,
                num_heads=2,
                mlp_ratio=2.0,
                out_chans=prompt_dim,
                qkv_bias=True,
                norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                use_rel_pos=True,
                window_size=4,
                global_attn_indexes=(1,),
            ),
            prompt_encoder=m.PromptEncoder(
                embed_dim=prompt_dim,
                image_embedding_size=(grid, grid),
                input_image_size=(img_size, img_size),
                mask_in_chans=8,
            ),
            mask_decoder=m.MaskDecoder(
                num_multimask_outputs=3,
                transformer=m.TwoWayTransformer(depth=2, embedding_dim=prompt_dim, mlp_dim=64, num_heads=2),
                transformer_dim=prompt_dim,
                iou_head_depth=3,
                iou_head_hidden_dim=32,
            ),
            pixel_mean=[123.675, 116.28, 103.53],
            pixel_std=[58.395, 57.12, 57.375],
        )
    return sam.eval()


def load_sam(checkpoint: str | Path, model_type: str = "vit_b", device: str | None = None):
    """A SAM of architecture `model_type` with the state dict at `checkpoint`, in eval mode on `device`.

    Real and tiny checkpoints share this path: build the architecture, `torch.load(weights_only=True)`,
    `load_state_dict`. For "tiny" the input size is read from the checkpoint's position embedding.
    """
    torch, sa = _import_sam()
    valid = sam_model_types()
    if model_type not in valid:
        raise ValueError(f"unknown SAM model type {model_type!r}; valid types: {', '.join(valid)}")
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"SAM checkpoint not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a SAM state dict, found {type(state).__name__}")
    if model_type == TINY_SAM_TYPE:
        pos_embed = state.get("image_encoder.pos_embed")
        if pos_embed is None:
            raise ValueError(f"{path}: no image_encoder.pos_embed, so not a SAM state dict")
        model = build_tiny_sam(img_size=int(pos_embed.shape[1]) * SAM_PATCH_PX)
    else:
        model = sa.sam_model_registry[model_type](checkpoint=None)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"{path}: not a state dict for SAM {model_type!r}: {err}") from err
    return model.to(resolve_device(device)).eval()


@dataclass(frozen=True)
class CanvasSlot:
    """Where one image lies in a packed encoder canvas (all in canvas pixels)."""

    canvas: int  # index of the canvas in the batch
    x0_px: int  # left edge of the image's column; the image is top-aligned in it
    resized_hw: tuple[int, int]  # the image's size once resized into the column


def canvas_slots(
    sizes_hw: list[tuple[int, int]], canvas_px: int, per_canvas: int, align_px: int = SAM_PATCH_PX
) -> list[CanvasSlot]:
    """Pack images of `sizes_hw` (H, W) into square canvases of `canvas_px`, `per_canvas` to a canvas.

    Image i goes to canvas i // per_canvas, column i % per_canvas, left to right. Columns are
    canvas_px // per_canvas wide, rounded down to a multiple of `align_px` (the encoder's patch) so that
    every image starts on a patch boundary and is cut into patches as it is alone; each image is resized,
    aspect kept, to the largest size that fits its column. per_canvas=1 gives SAM's own
    ResizeLongestSide geometry (longest side = canvas_px).
    """
    if per_canvas < 1:
        raise ValueError(f"per_canvas must be >= 1, got {per_canvas}")
    col_w = canvas_px if per_canvas == 1 else (canvas_px // per_canvas) // align_px * align_px
    if col_w < 1:
        raise ValueError(
            f"{per_canvas} columns of {align_px}-pixel patches do not fit a {canvas_px}-pixel canvas"
        )
    slots = []
    for i, (h, w) in enumerate(sizes_hw):
        scale = min(canvas_px / h, col_w / w)
        new_hw = (min(canvas_px, max(1, int(h * scale + 0.5))), min(col_w, max(1, int(w * scale + 0.5))))
        slots.append(CanvasSlot(canvas=i // per_canvas, x0_px=(i % per_canvas) * col_w, resized_hw=new_hw))
    return slots


@dataclass
class SamPromptedConfig:
    prior: PriorConfig = field(default_factory=PriorConfig)  # zones used as box prompts
    max_regions: int = 8
    multimask_output: bool = True  # 3 candidates per prompt, the best by predicted IoU kept
    encoder_batch_size: int = 8  # canvases (= images when unpacked) per image-encoder call in propose_batch
    # Images per encoder canvas in propose_batch, side by side in columns (1: one image per canvas, SAM's
    # own layout). Three 384 x 128 pedestrians fill a 1024 x 1024 canvas at 1008 x 336 each; packing
    # trades exactness (neighbours share attention) and, past the aspect that fits, resolution for speed.
    pack_images: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.pack_images, int) or self.pack_images < 1:
            raise ValueError(f"pack_images must be an integer >= 1, got {self.pack_images!r}")


class SamPromptedProposer(RegionProposer):
    """Prior zones refined by SAM: one embedding per image, all zone boxes decoded in one batch."""

    name = "sam-prompted"

    def __init__(self, model, config: SamPromptedConfig | None = None):
        _, sa = _import_sam()
        self.config = config or SamPromptedConfig()
        self.model = model.eval()
        self.predictor = sa.SamPredictor(model)

    def propose(self, image_rgb: np.ndarray) -> Regions:
        check_image_rgb(image_rgb)
        torch, _ = _import_sam()
        with torch.inference_mode():
            self.predictor.set_image(image_rgb)
            regions = self._decode_zones(image_rgb)
        self.predictor.reset_image()
        return regions

    def propose_batch(self, images: list[np.ndarray]) -> list[Regions]:
        """Like `propose` per image, but the image encoder sees `encoder_batch_size` images per call
        (canvases of `pack_images` images each when packing, see `propose_packed`)."""
        torch, _ = _import_sam()
        for image in images:
            check_image_rgb(image)
        if self.config.pack_images > 1:
            return self.propose_packed(images, self.config.pack_images)
        out: list[Regions] = []
        step = max(1, self.config.encoder_batch_size)
        with torch.inference_mode():
            for start in range(0, len(images), step):
                chunk = images[start : start + step]
                inputs = [self._to_input(image) for image in chunk]
                # preprocess pads every image to the encoder's square size, so they stack.
                batch = torch.cat([self.model.preprocess(x) for x in inputs])
                features = self.model.image_encoder(batch)
                for i, image in enumerate(chunk):
                    # Hand the predictor this image's embedding: the state set_torch_image would set.
                    self.predictor.reset_image()
                    self.predictor.original_size = image.shape[:2]
                    self.predictor.input_size = tuple(inputs[i].shape[-2:])
                    self.predictor.features = features[i : i + 1]
                    self.predictor.is_image_set = True
                    out.append(self._decode_zones(image))
        self.predictor.reset_image()
        return out

    def _to_input(self, image_rgb: np.ndarray):
        torch, _ = _import_sam()
        resized = self.predictor.transform.apply_image(image_rgb)
        return torch.as_tensor(resized, device=self.predictor.device).permute(2, 0, 1).contiguous()[None]

    def propose_packed(self, images: list[np.ndarray], per_canvas: int) -> list[Regions]:
        """One `Regions` per image, `per_canvas` images packed into each encoder canvas (`canvas_slots`).

        Per canvas: one encoder pass (`encoder_batch_size` canvases per call), all its images' zone
        boxes decoded in one call, each best mask upscaled to the canvas as SAM's postprocess does, cut
        out of its column and resized to its image's size. per_canvas=1 reproduces `propose_batch`'s
        unpacked output up to the resize (here on the model's device, there SamPredictor's PIL resize:
        pixel values at most 1 level apart; tests/miners/test_sam_packing.py measures the effect).
        """
        torch, _ = _import_sam()
        for image in images:
            check_image_rgb(image)
        canvas_px = self.model.image_encoder.img_size
        slots = canvas_slots([im.shape[:2] for im in images], canvas_px, per_canvas)
        n_canvases = slots[-1].canvas + 1 if slots else 0
        members: list[list[int]] = [[] for _ in range(n_canvases)]
        for i, slot in enumerate(slots):
            members[slot.canvas].append(i)
        out: list[Regions | None] = [None] * len(images)
        step = max(1, self.config.encoder_batch_size)
        with torch.inference_mode():
            for start in range(0, n_canvases, step):
                chunk = members[start : start + step]
                canvases = torch.cat(
                    [self._canvas([images[i] for i in m], [slots[i] for i in m]) for m in chunk]
                )
                features = self.model.image_encoder(canvases)
                for c, idx in enumerate(chunk):
                    decoded = self._decode_canvas(
                        features[c : c + 1], [images[i] for i in idx], [slots[i] for i in idx]
                    )
                    for i, regions in zip(idx, decoded, strict=True):
                        out[i] = regions
        return [r if r is not None else Regions.empty(self.name) for r in out]

    def _canvas(self, images: list[np.ndarray], slots: list[CanvasSlot]):
        """1 x 3 x S x S normalised canvas: each image resized into its column, zeros (the pixel mean,
        as SAM's own padding) elsewhere."""
        torch, _ = _import_sam()
        import torch.nn.functional as F

        size = self.model.image_encoder.img_size
        device = self.predictor.device
        canvas = torch.zeros((1, 3, size, size), dtype=torch.float32, device=device)
        mean, std = self.model.pixel_mean.float(), self.model.pixel_std.float()
        for image, slot in zip(images, slots, strict=True):
            h, w = slot.resized_hw
            # Resized on the model's device (SAM's apply_image_torch convention, rounded to uint8 levels as
            # a PIL resize is): a PIL resize of a pedestrian to 1008 x 336 costs ~6 ms of host time.
            pixels = torch.as_tensor(image, device=device).permute(2, 0, 1)[None].float()
            resized = F.interpolate(pixels, (h, w), mode="bilinear", align_corners=False, antialias=True)
            resized = resized.round_().clamp_(0, 255)[0]
            canvas[0, :, :h, slot.x0_px : slot.x0_px + w] = (resized - mean) / std
        return canvas

    def _decode_canvas(self, features, images: list[np.ndarray], slots: list[CanvasSlot]) -> list[Regions]:
        """Decode every image's zone boxes (offset into its column) against one canvas embedding."""
        torch, _ = _import_sam()
        import torch.nn.functional as F

        prompts = [self._zone_prompts(image) for image in images]
        boxes, owner = [], []
        for k, ((zone_boxes, _), image, slot) in enumerate(zip(prompts, images, slots, strict=True)):
            if len(zone_boxes) == 0:
                continue
            (h, w), (nh, nw) = image.shape[:2], slot.resized_hw
            scaled = np.asarray(zone_boxes, dtype=np.float64) * np.array([nw / w, nh / h, nw / w, nh / h])
            boxes.append(scaled + np.array([slot.x0_px, 0, slot.x0_px, 0]))
            owner += [k] * len(zone_boxes)
        if not boxes:
            return [Regions.empty(self.name) for _ in images]
        boxes_t = torch.as_tensor(np.concatenate(boxes), dtype=torch.float32, device=self.predictor.device)
        sparse, dense = self.model.prompt_encoder(points=None, boxes=boxes_t, masks=None)
        low_res, iou_preds = self.model.mask_decoder(
            image_embeddings=features,
            image_pe=self.model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=self.config.multimask_output,
        )
        best = iou_preds.argmax(dim=1)
        rows = torch.arange(len(best), device=best.device)
        size = self.model.image_encoder.img_size
        # Upscale to the canvas first, then cut out, as Sam.postprocess_masks does with its padding.
        canvas_logits = F.interpolate(
            low_res[rows, best][:, None], (size, size), mode="bilinear", align_corners=False
        )
        best_iou = iou_preds[rows, best].float().cpu().numpy()
        owner_arr = np.array(owner)
        out = []
        for k, (image, slot) in enumerate(zip(images, slots, strict=True)):
            sel = np.flatnonzero(owner_arr == k)
            if len(sel) == 0:
                out.append(Regions.empty(self.name))
                continue
            (nh, nw), x0 = slot.resized_hw, slot.x0_px
            cut = canvas_logits[torch.as_tensor(sel, device=canvas_logits.device), :, :nh, x0 : x0 + nw]
            logits = F.interpolate(cut, image.shape[:2], mode="bilinear", align_corners=False)
            masks = (logits[:, 0] > self.model.mask_threshold).cpu().numpy()
            out.append(self._regions(masks, best_iou[sel], prompts[k][1]))
        return out

    def _zone_prompts(self, image_rgb: np.ndarray) -> tuple[np.ndarray, list[str]]:
        """The image's prior zones: (Z x 4 XYXY boxes in its pixels, Z labels)."""
        extent = estimate_person_extent(image_rgb, self.config.prior)
        return prior_zones(extent.box_xyxy, image_rgb.shape[:2], self.config.prior.zones)

    def _decode_zones(self, image_rgb: np.ndarray) -> Regions:
        """Decode the image's prior zones as box prompts against the predictor's current embedding."""
        torch, _ = _import_sam()
        zone_boxes, zone_labels = self._zone_prompts(image_rgb)
        if len(zone_boxes) == 0:
            return Regions.empty(self.name)
        boxes_t = torch.as_tensor(zone_boxes, dtype=torch.float32, device=self.predictor.device)
        boxes_t = self.predictor.transform.apply_boxes_torch(boxes_t, image_rgb.shape[:2])
        masks, iou_preds, _ = self.predictor.predict_torch(
            None, None, boxes=boxes_t, multimask_output=self.config.multimask_output
        )
        best = iou_preds.argmax(dim=1)
        rows = torch.arange(len(best), device=best.device)
        best_masks = masks[rows, best].cpu().numpy()
        best_iou = iou_preds[rows, best].float().cpu().numpy()
        return self._regions(best_masks, best_iou, zone_labels)

    def _regions(self, best_masks: np.ndarray, best_iou: np.ndarray, zone_labels: list[str]) -> Regions:
        """Regions from each prompt's best mask (Z x H x W bool) and predicted IoU (Z), in zone order."""
        # Tight boxes from the masks; a prompt whose mask came out empty gives no region.
        boxes, kept_masks, labels, quality = [], [], [], []
        for mask, iou, label in zip(best_masks, best_iou, zone_labels, strict=True):
            box = mask_to_box_xyxy(mask)
            if box is None:
                continue
            boxes.append(box)
            kept_masks.append(mask.astype(bool))
            labels.append(label)
            quality.append(float(np.clip(np.nan_to_num(iou), 0.0, 1.0)))
        if not boxes:
            return Regions.empty(self.name)
        regions = Regions(np.stack(boxes), kept_masks, labels, np.array(quality), source=self.name)
        return top_k_by_quality(regions, self.config.max_regions, keep_order=True)


@dataclass
class SamAutoConfig:
    """Point-grid SAM tuned for pedestrian crops (e.g. 384 x 128): a 12 x 12 grid instead of 32 x 32."""

    prior: PriorConfig = field(default_factory=PriorConfig)  # zones that label the masks
    max_regions: int = 8
    points_per_side: int = 12
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.86  # SAM's defaults (0.88 / 0.95) are for ViT-H on large photos
    stability_score_thresh: float = 0.92
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    min_mask_region_area: int = 0  # pixels; > 0 runs SAM's hole/island cleanup, which needs opencv
    dedup_mask_iou: float = 0.8  # masks overlapping more than this are duplicates; the better one stays
    min_area_frac: float = 0.01  # of the image: specks are no describable region
    max_area_frac: float = 0.6  # of the image: background or the whole person, not a part
    min_zone_fraction: float = 0.3  # a mask needs this share inside its best zone to get a label


class SamAutoProposer(RegionProposer):
    """Whole-image SAM masks, filtered to part-sized, distinct regions and labelled by prior zones."""

    name = "sam-auto"

    def __init__(self, model, config: SamAutoConfig | None = None):
        _, sa = _import_sam()
        self.config = c = config or SamAutoConfig()
        try:
            self.generator = sa.SamAutomaticMaskGenerator(
                model.eval(),
                points_per_side=c.points_per_side,
                points_per_batch=c.points_per_batch,
                pred_iou_thresh=c.pred_iou_thresh,
                stability_score_thresh=c.stability_score_thresh,
                stability_score_offset=c.stability_score_offset,
                box_nms_thresh=c.box_nms_thresh,
                min_mask_region_area=c.min_mask_region_area,
                output_mode="binary_mask",
            )
        except ImportError as err:
            raise ImportError(
                f"sam-auto with min_mask_region_area={c.min_mask_region_area} needs opencv "
                "(pip install opencv-python-headless), or set min_mask_region_area=0"
            ) from err

    def propose(self, image_rgb: np.ndarray) -> Regions:
        check_image_rgb(image_rgb)
        torch, _ = _import_sam()
        c = self.config
        with torch.inference_mode():
            records = self.generator.generate(image_rgb)
        h, w = image_rgb.shape[:2]

        # Filter by area: part-sized masks only.
        masks = [r["segmentation"].astype(bool) for r in records]
        areas = np.array([m.sum() for m in masks], dtype=np.float64) / (h * w)
        keep = np.flatnonzero((areas > 0) & (areas >= c.min_area_frac) & (areas <= c.max_area_frac))
        masks = [masks[i] for i in keep]
        iou = np.array([records[i]["predicted_iou"] for i in keep], dtype=np.float64)
        stability = np.array([records[i]["stability_score"] for i in keep], dtype=np.float64)
        quality = np.clip(np.nan_to_num(iou), 0, 1) * np.clip(np.nan_to_num(stability), 0, 1)

        # Best first; drop duplicates of an already kept mask; stop at max_regions.
        # (IoU only against kept masks: at most N x max_regions comparisons, not N x N.)
        chosen: list[int] = []
        for i in np.argsort(-quality, kind="stable"):
            if len(chosen) >= c.max_regions:
                break
            if not chosen or mask_iou([masks[i]], [masks[j] for j in chosen]).max() <= c.dedup_mask_iou:
                chosen.append(int(i))
        if not chosen:
            return Regions.empty(self.name)
        masks = [masks[i] for i in chosen]

        # Label each mask by the prior zone that holds most of it.
        extent = estimate_person_extent(image_rgb, c.prior)
        zone_boxes, zone_labels = prior_zones(extent.box_xyxy, (h, w), c.prior.zones)
        labels = label_masks_by_zones(masks, zone_boxes, zone_labels, c.min_zone_fraction)
        boxes = np.stack([mask_to_box_xyxy(m) for m in masks])
        return Regions(boxes, masks, labels, quality[chosen].astype(np.float32), source=self.name)
