"""Build a tiny CLIP (model + tokenizer + processor) from scratch, in the `from_pretrained` layout.

Consumes captions (to build a word-level vocabulary with the `tokenizers` library) and a size config;
produces a `transformers.CLIPModel` and a `CLIPProcessor` that save with `save_pretrained(dir)` and
reload with `CLIPModel.from_pretrained(dir)` / `AutoProcessor.from_pretrained(dir)` — exactly the
code path a real checkpoint such as openai/clip-vit-base-patch16 takes. Nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

# Special token ids. CLIP's text tower pools the first EOS token unless eos_token_id == 2, where it
# falls back to "position of the largest id" (legacy rule) — so EOS gets id 3 and is always appended.
PAD, UNK, BOS, EOS = "[PAD]", "[UNK]", "[BOS]", "[EOS]"
SPECIAL_TOKENS = [PAD, UNK, BOS, EOS]
EOS_ID = 3


@dataclass(frozen=True)
class TinyClipConfig:
    image_height_px: int = 192
    image_width_px: int = 64
    patch_px: int = 16
    vision_width: int = 128
    vision_layers: int = 3
    text_width: int = 128
    text_layers: int = 2
    heads: int = 4
    embed_dim: int = 128
    max_text_tokens: int = 77
    min_word_frequency: int = 1
    max_vocab: int = 20000


def build_tokenizer(captions: Iterable[str], cfg: TinyClipConfig):
    """A lower-cased word-level tokenizer trained on `captions`, wrapped as PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from tokenizers.trainers import WordLevelTrainer
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel(unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = WordLevelTrainer(
        vocab_size=cfg.max_vocab, min_frequency=cfg.min_word_frequency, special_tokens=SPECIAL_TOKENS
    )
    tok.train_from_iterator(captions, trainer=trainer)
    assert tok.token_to_id(EOS) == EOS_ID, "special tokens must take ids 0..3"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, tok.token_to_id(BOS)), (EOS, EOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        model_max_length=cfg.max_text_tokens,
    )


def build_processor(tokenizer, cfg: TinyClipConfig):
    """CLIPProcessor pairing `tokenizer` with a non-square, no-crop image processor."""
    from transformers import CLIPImageProcessor, CLIPProcessor

    image_processor = CLIPImageProcessor(
        size={"height": cfg.image_height_px, "width": cfg.image_width_px},
        do_center_crop=False,
        do_resize=True,
    )
    return CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def build_model(vocab_size: int, cfg: TinyClipConfig, seed: int = 0):
    """A randomly initialised CLIPModel of the tiny size. Position embeddings cover a square grid of
    image_height_px; non-square inputs run with interpolate_pos_encoding=True."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    text = {
        "vocab_size": vocab_size,
        "hidden_size": cfg.text_width,
        "intermediate_size": cfg.text_width * 4,
        "num_hidden_layers": cfg.text_layers,
        "num_attention_heads": cfg.heads,
        "max_position_embeddings": cfg.max_text_tokens,
        "pad_token_id": 0,
        "bos_token_id": 2,
        "eos_token_id": EOS_ID,
        "projection_dim": cfg.embed_dim,
    }
    vision = {
        "hidden_size": cfg.vision_width,
        "intermediate_size": cfg.vision_width * 4,
        "num_hidden_layers": cfg.vision_layers,
        "num_attention_heads": cfg.heads,
        "image_size": cfg.image_height_px,
        "patch_size": cfg.patch_px,
        "projection_dim": cfg.embed_dim,
    }
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=cfg.embed_dim)
    model = CLIPModel(config)
    model.config.tiny_clip = asdict(cfg)  # saved in config.json: how this model was built
    return model
