"""`--method ivt`: IVT ("See Finer, See More", seed 003) on a CLIP dual encoder — multi-level alignment
(MLA), bidirectional mask modelling (BMM) and, for from-scratch models, the single shared network.

Consumes a `Batch` (the training ClipData's captions, their person ids, three augmented views of each
image, the run's CLIP) and produces the loss and its logs; `build_heads` (no heads) splits the training
captions into their level candidates once and, with `shared_network`, ties the two towers' attention and
layer norms before the optimizer is built. Nothing is written; the checkpoint stays a plain CLIP folder.

What follows IVT's released code (/work/shared/METHODS.md §4, verified from
TencentYoutuResearch/PersonRetrieval-IVT; the paper's text beyond the abstract is unverified):
- MLA: every caption enters three times — the whole caption (sentence level), a phrase and a word-level
  unit — each paired with its *own* augmented view of the image (views 0, 1, 2 of the run's
  augmentation), and ONE identity-aware loss covers the 3B rows with labels [pid, pid, pid], so
  cross-level pairs of one person are positives too. IVT's loss is CMPM (the method's default
  `global_loss`), computed on the masked forward.
- BMM: in training, in each forward over the 3B rows, n ~ U{0, …, ⌊ratio·N⌋} of the N token positions
  (CLS / SOT excluded, ratio 0.2) are dropped, the same positions for the whole batch, separately for
  images and text. There is no reconstruction target (IVT's fine-tuning has none).
- Shared network (IVT's `BlockVisTxt`): attention and layer norms shared by both modalities, MLPs
  modality-specific.

The project's own choices (each an option or stated here):
- The levels come from this project's caption splitter (`levels: "splitter"`): phrase = one sentence of
  the caption (`ClipData.cap_sentence_tokens`), word = one part clause of `CaptionSplitter(split_clauses=
  True)` (e.g. "black trousers"), the nearest this project has to IVT's attribute phrases; a caption for
  which the splitter yields nothing at a level falls back to IVT's released string rules (below). With
  `levels: "ivt-rule"` both levels use IVT's rules: phrase = `ivt_phrase_candidates`, word = one
  comma-chunk longer than 5 characters (IVT's ICFG/RSTP rule; its CUHK word level is a random subset of
  precomputed attribute phrases this project does not have).
- CLIP's text tower is causal and pools the first EOS token: BMM never drops SOT nor a row's pooled EOS
  (METHODS.md §4 "porting"). Text tokens are dropped by removing them from the attention (their key
  entries in the mask); for every kept token this equals removing them from the sequence with the kept
  tokens' original positions (tested), and it keeps the per-row EOS protection simple. Image patches are
  dropped for real (fewer tokens through the tower), positions added before the drop, as IVT.
- `--text-augment` (when on) applies to all three levels; the sentence level is always the truncated
  caption (the run's `text_mode` still decides evaluation).
- With BMM on and `--local rsm`, the Trainer's local branch runs its own unmasked forward of view 0 (its
  region pooling needs every patch).
- `shared_network` ties layer k's `layer_norm1`, `self_attn` (q/k/v/out) and `layer_norm2` of the text
  tower to the vision tower's, and the text `final_layer_norm` to the vision `post_layernorm` (IVT's
  shared final norm); token/patch embeddings, the vision `pre_layrnorm`, the MLPs and the projections stay
  per modality. The text tower's own attention values are discarded, so it is refused unless the model
  was built from scratch (`config.tiny_clip`) or is already tied (a resumed shared run): a pretrained
  CLIP (ViT-B/16: vision 768-d/12 heads, text 512-d/8 heads) cannot be tied at all.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from miners.encoders import pad_token_ids
from miners.training.data import ClipData, tokenize_nested
from miners.training.losses import GLOBAL_LOSSES
from miners.training.methods.base import Batch, Method

LEVEL_NAMES = ("sentence", "phrase", "word")  # the order of the 3B rows (IVT: word, phrase, sentence)
LEVEL_SOURCES = ("splitter", "ivt-rule")
# IVT's released phrase/word rules keep only chunks longer than this many characters
IVT_MIN_CHUNK_CHARS = 5
# The per-layer submodules the shared network ties (IVT: norm1, attn, norm2 of BlockVisTxt)
SHARED_LAYER_PARTS = (
    "layer_norm1",
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.out_proj",
    "layer_norm2",
)


@dataclass
class IvtOptions:
    # seed 003 (verified code: `percent = 0.2`): at most ⌊ratio·N⌋ tokens dropped per forward; 0 turns
    # BMM off
    mask_ratio: float = 0.2
    # project's own: where the phrase and word levels come from, "splitter" (this project's caption
    # splitter, IVT's rules as the fallback) or "ivt-rule" (IVT's released string rules only)
    levels: str = "splitter"
    # seed 003 (abstract: "a single network"; verified code: shared attention and norms, per-modality
    # MLPs): tie the towers; from-scratch models with equal tower widths, heads and depths only
    shared_network: bool = False


class IvtMethod(Method):
    name = "ivt"
    options = IvtOptions
    # IVT: CMPM only, its pad-crop / flip / erasing augmentation, no ID loss, no MLM; views k >= 1 are
    # independent draws of the augmentation (with `augment: none` the three views are the same images)
    defaults: ClassVar[dict] = {
        "local": "none",
        "text_mode": "truncate",
        "global_loss": "cmpm",
        "augment": "irra",
    }

    def __init__(self, options: IvtOptions | None = None):
        super().__init__(options)
        opts = self.opts
        if not 0.0 <= opts.mask_ratio < 1.0:
            raise ValueError(f"ivt.mask_ratio must be in [0, 1), got {opts.mask_ratio}")
        if opts.levels not in LEVEL_SOURCES:
            raise ValueError(f"ivt.levels must be one of {', '.join(LEVEL_SOURCES)}, got {opts.levels!r}")
        # id(ClipData) -> (the data, its LevelCandidates): the splitter runs once per data object
        self._levels: dict[int, tuple[ClipData, LevelCandidates]] = {}

    def build_heads(self, trainer, train) -> dict[str, torch.nn.Module]:
        if trainer.cfg.global_loss == "itc":
            raise ValueError(
                "--method ivt needs an identity-aware global loss (cmpm, sdm or identity-infonce): itc makes "
                "the three levels of one caption, and every other caption of the person, negatives"
            )
        if self.opts.shared_network:
            tie_towers(trainer.model)
        self.levels_for(train, trainer.processor)
        return {}

    def levels_for(self, data: ClipData, processor) -> LevelCandidates:
        """The level candidates of `data`'s captions, computed once per data object."""
        hit = self._levels.get(id(data))
        if hit is None or hit[0] is not data:
            hit = (data, LevelCandidates.build(data, processor, self.opts.levels))
            self._levels[id(data)] = hit
        return hit[1]

    def loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        trainer, model, gen = batch.trainer, batch.model, batch.generator
        levels = self.levels_for(batch.data, trainer.processor)
        # Every draw is made over the global batch (`idx_all`; one process: the batch) and then cut to this
        # process's rows [lo, hi), so N processes draw what one would and share one BMM draw per forward
        idx_all, lo, hi = batch.idx_all, batch.lo, batch.hi
        n_all, n_levels = len(idx_all), len(LEVEL_NAMES)
        # rows: [sentences | phrases | words], each block in the global batch's caption order
        seqs = [batch.data.cap_tokens[i] for i in idx_all]
        seqs += levels.draw(idx_all, "phrase", gen) + levels.draw(idx_all, "word", gen)
        ids_all, mask_all = pad_token_ids(batch.augment_text(seqs), trainer.pad_id, batch.device)
        mine = torch.cat([torch.arange(k * n_all + lo, k * n_all + hi) for k in range(n_levels)])
        ids, mask = ids_all[mine.to(batch.device)], mask_all[mine.to(batch.device)]
        # `loss` is only ever the training loss (evaluation never calls it), so BMM applies whatever the
        # model's train/eval flag (a bench timing `train_step` may leave it in eval mode)
        ratio = self.opts.mask_ratio
        logs: dict[str, float] = {}
        if ratio > 0:
            pixels = torch.cat([batch.pixels(v) for v in range(n_levels)])
            n_tokens = 1 + _patch_count(model, pixels)
            keep_image = bmm_keep_positions(n_tokens, ratio, gen).to(batch.device)
            image = vision_forward(model, pixels, keep_image)[0]
            keep_text = bmm_text_keep(ids_all, mask_all, model.text_model, ratio, gen)[mine.to(batch.device)]
            text = text_forward(model, ids, mask * keep_text)
            logs["bmm_image_dropped_frac"] = 1.0 - len(keep_image) / n_tokens
            logs["bmm_text_dropped_frac"] = float(1.0 - (mask * keep_text).sum() / mask.sum())
        else:  # the Batch's shared forwards (view 0 is then also the local branch's)
            image = torch.cat([batch.vision(v).image for v in range(n_levels)])
            text = batch.encode_text(ids, mask)[1]
        pids = batch.pids.repeat(n_levels)
        loss = mla_loss(
            batch.gather(text),
            batch.gather(image),
            batch.gather(pids),
            batch.logit_scale,
            batch.cfg.global_loss,
            batch.cfg.sdm_temperature,
        )
        logs["loss_mla"] = float(loss.detach())
        n = hi - lo
        with torch.no_grad():  # per level, this process's rows only: how each level fares (logs)
            for k, name in enumerate(LEVEL_NAMES):
                rows = slice(k * n, (k + 1) * n)
                part = mla_loss(
                    text[rows], image[rows], pids[rows], batch.logit_scale, batch.cfg.global_loss,
                    batch.cfg.sdm_temperature,
                )  # fmt: skip
                logs[f"mla_{name}_only"] = float(part)
        return loss, logs


# --- the loss ---------------------------------------------------------------------------------------------
def mla_loss(
    text_feat: torch.Tensor,
    image_feat: torch.Tensor,
    pids: torch.Tensor,
    logit_scale: torch.Tensor | float,
    loss_name: str = "cmpm",
    sdm_temperature: float = 0.02,
) -> torch.Tensor:
    """MLA's one loss over the stacked levels: `GLOBAL_LOSSES[loss_name]` on the 3B rows (sentence, phrase
    and word captions, row i of `text_feat` paired with row i of `image_feat`, its level's image view),
    labels `pids` = [pid, pid, pid]. With CMPM (IVT's), p_ij = softmax_j(v_i · t̂_j) and

        L = mean_i KL(p_i ‖ q_i) + mean_i KL(p^{t2i}_i ‖ q_i),  q_ij = 1[pid_i = pid_j] / Σ_k 1[pid_i = pid_k],

    over all 3B × 3B pairs: a word-level caption and the sentence-level view of another image of the same
    person are positives. (IVT divides by ‖y_i‖₂ instead of Σ_k y_ik; losses.cmpm explains why the
    proper distribution is used.)"""
    fn = GLOBAL_LOSSES[loss_name]
    if loss_name == "sdm":
        return fn(text_feat, image_feat, pids, logit_scale, temperature=sdm_temperature)
    return fn(text_feat, image_feat, pids, logit_scale)


# --- multi-level captions ---------------------------------------------------------------------------------
def ivt_phrase_candidates(caption: str) -> list[str]:
    """IVT's released phrase rule (`get_phrase_level_txt`), re-implemented: strip "." "[" "]" from the
    caption's ends, split it into sentences on "."; in each sentence split on "," and take two candidates,
    the longest chunk (the first of equal ones) and the other chunks re-joined with ","; keep those longer
    than 5 characters, stripped of spaces. May be empty."""
    out: list[str] = []
    for sentence in caption.strip(".").strip("[").strip("]").split("."):
        chunks = sentence.split(",")
        longest = max(range(len(chunks)), key=lambda k: (len(chunks[k]), -k))
        rest = ",".join(chunks[:longest] + chunks[longest + 1 :]).strip(",")
        out += [c for c in (chunks[longest], rest) if len(c) > IVT_MIN_CHUNK_CHARS]
    return [c.strip(" ") for c in out if c.strip(" ")]


def ivt_word_candidates(caption: str) -> list[str]:
    """IVT's released word rule for ICFG-PEDES / RSTPReid: the caption's chunks between "." and ","
    longer than 5 characters, stripped of spaces. May be empty."""
    chunks = [c for s in caption.split(".") for c in s.split(",")]
    return [c.strip() for c in chunks if len(c) > IVT_MIN_CHUNK_CHARS and c.strip()]


@dataclass
class LevelCandidates:
    """Per caption, the token id lists a level may draw from (never empty: the whole caption last)."""

    phrase: list[list[list[int]]]
    word: list[list[list[int]]]

    @classmethod
    def build(cls, data: ClipData, processor, source: str = "splitter") -> LevelCandidates:
        """The candidates of every caption of `data`, tokenised with `processor` (truncated to the
        context). "splitter": phrase = the caption's sentences (data.cap_sentence_tokens, from the
        splitter; a caption it split into none falls back to IVT's phrase rule), word = its part clauses
        (CaptionSplitter(split_clauses=True); none → IVT's word rule). "ivt-rule": IVT's rules only. A
        caption no rule yields anything for uses the whole caption at that level."""
        captions = data.captions
        if source == "splitter":
            from miners.captions import CaptionSplitter

            clauses = [
                [u.text for u in us] for us in CaptionSplitter(split_clauses=True).split_many(captions)
            ]
            n_sent = data.cap_n_sentences
        else:
            clauses, n_sent = [[] for _ in captions], np.zeros(len(captions), dtype=np.int64)
        phrase_texts: list[list[str]] = []
        word_texts: list[list[str]] = []
        for k, cap in enumerate(captions):
            # the splitter's sentences are already tokenised; [] marks "tokenise IVT's phrases instead"
            phrase_texts.append([] if n_sent[k] > 0 else ivt_phrase_candidates(cap) or [cap])
            word_texts.append(clauses[k] or ivt_word_candidates(cap) or [cap])
        phrase_tokens = tokenize_nested(processor, phrase_texts)
        phrase = [
            data.cap_sentence_tokens[k] if n_sent[k] > 0 else phrase_tokens[k] for k in range(len(captions))
        ]
        return cls(phrase=phrase, word=tokenize_nested(processor, word_texts))

    def draw(self, idx: np.ndarray, level: str, generator: torch.Generator) -> list[list[int]]:
        """One candidate per caption of `idx`, uniformly at random (one draw of `generator` per level)."""
        cands = getattr(self, level)
        u = torch.rand(len(idx), generator=generator).tolist()
        return [cands[i][min(int(x * len(cands[i])), len(cands[i]) - 1)] for i, x in zip(idx, u, strict=True)]


# --- bidirectional mask modelling: token dropping -----------------------------------------------------------
def bmm_keep_positions(n_tokens: int, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """IVT's drop draw for one forward: of positions 1..N−1 (N = `n_tokens`, position 0 = CLS/SOT always
    kept), n ~ U{0, …, ⌊ratio·N⌋} (at most N − 1) chosen uniformly are dropped. Returns the kept
    positions, ascending (long, on the CPU)."""
    limit = min(int(ratio * n_tokens), n_tokens - 1)
    n_drop = int(torch.randint(0, limit + 1, (1,), generator=generator))
    order = torch.randperm(n_tokens - 1, generator=generator) + 1
    return torch.cat([torch.zeros(1, dtype=torch.long), order[n_drop:].sort().values])


def pooled_positions(text_model, ids: torch.Tensor) -> torch.Tensor:
    """The position HF's CLIPTextTransformer pools per row (its own rule): the first `eos_token_id`, or the
    largest id when the config's eos_token_id is the legacy 2."""
    if text_model.eos_token_id == 2:
        return ids.to(torch.int).argmax(dim=-1)
    return (ids.to(torch.int) == text_model.eos_token_id).int().argmax(dim=-1)


def bmm_text_keep(
    ids: torch.Tensor, mask: torch.Tensor, text_model, ratio: float, generator: torch.Generator
) -> torch.Tensor:
    """N x T (ids' dtype, on ids' device) 1 = kept: the batch's drop draw over the T padded positions
    (`bmm_keep_positions`, the same positions for every row, as IVT), except that a row's pooled EOS
    position is never dropped (SOT, position 0, never is). Multiply the attention mask by it."""
    n, t = ids.shape
    keep = torch.zeros(t, dtype=ids.dtype)
    keep[bmm_keep_positions(t, ratio, generator)] = 1
    keep = keep.to(ids.device).expand(n, t).clone()
    keep[torch.arange(n, device=ids.device), pooled_positions(text_model, ids).to(ids.device).long()] = 1
    return keep


def _patch_count(model, pixels: torch.Tensor) -> int:
    patch = int(model.config.vision_config.patch_size)
    return (pixels.shape[-2] // patch) * (pixels.shape[-1] // patch)


def vision_forward(
    model, pixel_values: torch.Tensor, keep: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HF CLIP's vision forward with only the token positions `keep` (1 + P positions, CLS = 0; None: all)
    through the encoder: embeddings (+ interpolated positions) → keep → pre-layernorm → encoder → the
    post-layernorm and visual projection of every kept token. Returns (image B x E, the unnormalised CLS
    projection; tokens B x K x E; hidden B x K x D), as Batch.vision with K = len(keep)."""
    vm = model.vision_model
    hidden = vm.embeddings(pixel_values, interpolate_pos_encoding=True)
    if keep is not None:
        hidden = hidden[:, keep.to(hidden.device)]
    hidden = vm.encoder(inputs_embeds=vm.pre_layrnorm(hidden)).last_hidden_state
    tokens = model.visual_projection(vm.post_layernorm(hidden))
    return tokens[:, 0], tokens, hidden


def text_forward(model, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """N x E unnormalised pooled text projection, HF's causal forward with `attention_mask` (padding and
    BMM's dropped tokens at 0): a masked key is invisible to every token, as if removed from the sequence."""
    return model.text_projection(model.text_model(input_ids=ids, attention_mask=attention_mask).pooler_output)


# --- the single shared network --------------------------------------------------------------------------------
# model -> the state-dict hook that un-aliases the tied tensors when saving (one per model)
_SHARED_HOOKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def shared_pairs(model) -> list[tuple[str, str]]:
    """(text parameter name, vision parameter name) of every parameter the shared network ties."""
    pairs = []
    for k in range(int(model.config.text_config.num_hidden_layers)):
        for part in SHARED_LAYER_PARTS:
            for p in ("weight", "bias"):
                pairs.append(
                    (
                        f"text_model.encoder.layers.{k}.{part}.{p}",
                        f"vision_model.encoder.layers.{k}.{part}.{p}",
                    )
                )
    for p in ("weight", "bias"):
        pairs.append((f"text_model.final_layer_norm.{p}", f"vision_model.post_layernorm.{p}"))
    return pairs


def shared_network_problem(model) -> str | None:
    """Why the towers cannot be tied (None: they can): the widths, heads, depths and layer-norm eps must be
    equal, and the model built from scratch (config.tiny_clip) or already tied / equal (a resumed run)."""
    tc, vc = model.config.text_config, model.config.vision_config
    for field in ("hidden_size", "num_attention_heads", "num_hidden_layers", "layer_norm_eps"):
        if getattr(tc, field) != getattr(vc, field):
            return (
                f"the text and vision towers differ in {field} ({getattr(tc, field)} vs {getattr(vc, field)}); "
                "IVT's single network needs two towers of one geometry (build one from scratch with equal "
                "widths, heads and layers); a pretrained CLIP's towers never match (ViT-B/16: 512-d text, "
                "768-d vision)"
            )
    if getattr(model.config, "tiny_clip", None) is None:
        params = dict(model.named_parameters(remove_duplicate=False))
        if not all(torch.equal(params[t], params[v]) for t, v in shared_pairs(model)):
            return (
                "the model was not built from scratch (no config.tiny_clip) and its towers' attention weights "
                "differ: tying them would discard the text tower's trained attention"
            )
    return None


def tie_towers(model) -> None:
    """IVT's single network on an HF CLIPModel: the text tower's per-layer layer norms and attention
    projections, and its final layer norm, become the vision tower's Parameters (one tensor, trained by
    both modalities); MLPs, embeddings and projections stay per modality. Idempotent. Raises ValueError
    with `shared_network_problem`'s reason when the towers cannot be tied.

    Saving: safetensors refuses aliased tensors, and HF's save_pretrained would drop undeclared ones; a
    state-dict hook gives the text names their own copy in `state_dict()`, so the checkpoint is a plain
    CLIP folder with both towers complete (equal values) that any loader reads; the tie itself lives only
    in the training process (a resumed shared run ties again)."""
    problem = shared_network_problem(model)
    if problem:
        raise ValueError(f"ivt.shared_network: {problem}")
    for text_name, vision_name in shared_pairs(model):
        owner_name, _, attr = text_name.rpartition(".")
        setattr(model.get_submodule(owner_name), attr, model.get_parameter(vision_name))
    if model not in _SHARED_HOOKS:
        _SHARED_HOOKS[model] = model.register_state_dict_post_hook(_unalias_shared)


def _unalias_shared(module, state_dict, prefix, local_metadata) -> None:
    for text_name, vision_name in shared_pairs(module):
        key = prefix + text_name
        if key in state_dict and state_dict[key].data_ptr() == state_dict[prefix + vision_name].data_ptr():
            state_dict[key] = state_dict[key].clone()


def towers_tied(model) -> bool:
    """True when every shared pair is one Parameter."""
    return all(model.get_parameter(t) is model.get_parameter(v) for t, v in shared_pairs(model))


__all__ = [
    "IvtMethod",
    "IvtOptions",
    "LevelCandidates",
    "bmm_keep_positions",
    "bmm_text_keep",
    "ivt_phrase_candidates",
    "ivt_word_candidates",
    "mla_loss",
    "pooled_positions",
    "shared_network_problem",
    "shared_pairs",
    "text_forward",
    "tie_towers",
    "towers_tied",
    "vision_forward",
]
