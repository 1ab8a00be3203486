"""An OpenAI CLIP `.pt` checkpoint → a `from_pretrained` CLIP folder (weights, processor, tokenizer).

Consumes a ViT CLIP checkpoint as OpenAI distributes it (a TorchScript archive, whose `state_dict()` holds
the weights) or a plain `torch.save`d state dict with the same keys; produces a folder that
`transformers.CLIPModel.from_pretrained` and `AutoProcessor.from_pretrained` load, so that every command
(`--init`, `--clip-model`) takes one code path for every CLIP.

    python -m miners.convert_clip CHECKPOINT.pt OUT_DIR [--tokenizer SRC] [--image-size H W]

The architecture is read from the tensor shapes (vision width, layers, patch size, resolution from the
position embedding; text width, layers, context length, vocabulary; embedding size), with OpenAI's one
convention that shapes do not carry: 64 channels per attention head. The model uses QuickGELU and layer
norm eps 1e-5, as OpenAI's. Every tensor is mapped to its `CLIPModel` name (the packed q/k/v projection
split in three, the two projections transposed) and the conversion fails, naming the leftovers, unless
every HF parameter is filled and every source tensor used. Only ViT checkpoints: a ModifiedResNet one is
refused. Weights are written in float32 (OpenAI ships float16): this project trains them.

The processor resizes to an explicit height x width (`--image-size`, default 384 x 128, the pedestrian
input of `miners.encoders.input_size_hw`; the position embeddings are interpolated to it) with CLIP's
mean/std. The tokenizer comes from `--tokenizer`: a Hugging Face CLIP folder, or OpenAI's
`bpe_simple_vocab_16e6.txt.gz` (its first merges, as many as the checkpoint's vocabulary holds, as
OpenAI's own tokenizer takes them); without it, `bpe_simple_vocab_16e6.txt.gz` beside the checkpoint
(this project's convention, so that `--init X.pt` needs no further flag), else the `clip` package's copy.

`converted_folder` is the "converted once" cache `--init X.pt` goes through: one folder per checkpoint
content under `$RSM_CONVERTED_CACHE` (default `$XDG_CACHE_HOME/rsm-miners/converted`, `~/.cache/...`).

Not checked against a real OpenAI checkpoint (none is available offline here): the mapping is tested
against a random-init state dict in OpenAI's layout and a forward computed from it directly
(tests/miners/test_convert_clip.py).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where a checkpoint is read: `--help` answers without it
    import torch

DEFAULT_IMAGE_SIZE_HW = (384, 128)
# OpenAI's build_model derives the head count from the width; the shapes cannot tell it
HEAD_WIDTH = 64
OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]
BPE_NAME = "bpe_simple_vocab_16e6.txt.gz"
SOT, EOT = "<|startoftext|>", "<|endoftext|>"
RECORD_NAME = (
    "convert_clip.json"  # what was converted, how (miners.model_folder leaves it out of the fingerprint)
)
# Scalars OpenAI's TorchScript archives carry beside the weights; checked against the shapes, not mapped
META_KEYS = ("input_resolution", "context_length", "vocab_size")


class ConversionError(ValueError):
    """The checkpoint or the tokenizer cannot make a CLIP folder; the message says why."""


# --- reading and inferring -----------------------------------------------------------------------------
def load_openai_state_dict(pt: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors: a plain state dict through `torch.load(weights_only=True)`, else a
    TorchScript archive's `state_dict()`."""
    import torch

    try:
        with warnings.catch_warnings():  # on a TorchScript archive it warns, then refuses weights_only
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(pt, map_location="cpu", weights_only=True)
    except Exception:  # a TorchScript archive (as OpenAI ships it) is no pickle torch.load may read
        obj = None
    if isinstance(obj, torch.jit.ScriptModule):  # torch.load dispatched to torch.jit.load itself
        obj = obj.state_dict()
    if obj is None:
        try:
            with warnings.catch_warnings():  # TorchScript is deprecated, but it is the format OpenAI ships
                warnings.simplefilter("ignore", FutureWarning)
                obj = torch.jit.load(str(pt), map_location="cpu").state_dict()
        except Exception as exc:
            raise ConversionError(
                f"{pt}: neither a state dict (torch.load) nor a TorchScript archive (torch.jit.load): {exc}"
            ) from exc
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConversionError(f"{pt}: holds a {type(obj).__name__}, not a state dict of tensors")
    return dict(obj)


def infer_architecture(sd: dict[str, torch.Tensor]) -> dict[str, int]:
    """The sizes a ViT CLIP is built from, read from the tensor shapes as OpenAI's build_model does."""
    if "visual.proj" not in sd:
        if any(k.startswith("visual.layer1.") for k in sd):
            raise ConversionError(
                "a ModifiedResNet CLIP checkpoint (visual.layer1..., no visual.proj): only ViT checkpoints "
                "convert to transformers.CLIPModel"
            )
        raise ConversionError("not an OpenAI CLIP checkpoint: no visual.proj (the image projection)")
    needed = ["visual.conv1.weight", "visual.positional_embedding", "token_embedding.weight"]
    needed += ["positional_embedding", "text_projection", "ln_final.weight"]
    missing = [k for k in needed if k not in sd]
    if missing:
        raise ConversionError(f"not an OpenAI CLIP ViT checkpoint: missing {missing}")
    vision_width, _, patch, _ = sd["visual.conv1.weight"].shape
    positions = sd["visual.positional_embedding"].shape[0]
    grid = round((positions - 1) ** 0.5)
    if grid * grid + 1 != positions:
        raise ConversionError(f"visual.positional_embedding has {positions} rows: not 1 + a square grid")
    text_width = sd["ln_final.weight"].shape[0]
    arch = {
        "vision_width": int(vision_width),
        "vision_layers": _count_blocks(sd, "visual.transformer.resblocks."),
        "vision_mlp": int(sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
        "patch_size": int(patch),
        "image_resolution": int(patch * grid),
        "embed_dim": int(sd["text_projection"].shape[1]),
        "context_length": int(sd["positional_embedding"].shape[0]),
        "vocab_size": int(sd["token_embedding.weight"].shape[0]),
        "text_width": int(text_width),
        "text_layers": _count_blocks(sd, "transformer.resblocks."),
        "text_mlp": int(sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
    }
    for tower in ("vision", "text"):
        if arch[f"{tower}_width"] % HEAD_WIDTH:
            raise ConversionError(f"{tower} width {arch[f'{tower}_width']} is not a multiple of {HEAD_WIDTH}")
        arch[f"{tower}_heads"] = arch[f"{tower}_width"] // HEAD_WIDTH
    if sd["visual.proj"].shape[1] != arch["embed_dim"]:
        raise ConversionError(
            f"visual.proj projects to {sd['visual.proj'].shape[1]}, text_projection to {arch['embed_dim']}"
        )
    expected = {"input_resolution": "image_resolution", "context_length": "context_length"}
    expected["vocab_size"] = "vocab_size"
    for key, name in expected.items():
        if key in sd and int(sd[key]) != arch[name]:
            raise ConversionError(
                f"the checkpoint's {key} {int(sd[key])} disagrees with its shapes ({arch[name]})"
            )
    return arch


def _count_blocks(sd: dict, prefix: str) -> int:
    blocks = {k[len(prefix) :].split(".")[0] for k in sd if k.startswith(prefix)}
    if not blocks:
        raise ConversionError(f"no {prefix}N blocks in the checkpoint")
    return len(blocks)


# --- mapping -------------------------------------------------------------------------------------------
def hf_config(arch: dict[str, int], tokenizer):
    from transformers import CLIPConfig

    text = dict(vocab_size=arch["vocab_size"], hidden_size=arch["text_width"])
    text |= dict(intermediate_size=arch["text_mlp"], num_hidden_layers=arch["text_layers"])
    text |= dict(num_attention_heads=arch["text_heads"], max_position_embeddings=arch["context_length"])
    # The end-of-text id is the largest (checked in build_tokenizer), so pooling its first occurrence is
    # OpenAI's argmax-of-ids pooling
    text |= dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    text |= dict(pad_token_id=tokenizer.pad_token_id, hidden_act="quick_gelu", layer_norm_eps=1e-5)
    vision = dict(hidden_size=arch["vision_width"], intermediate_size=arch["vision_mlp"])
    vision |= dict(num_hidden_layers=arch["vision_layers"], num_attention_heads=arch["vision_heads"])
    vision |= dict(image_size=arch["image_resolution"], patch_size=arch["patch_size"])
    vision |= dict(hidden_act="quick_gelu", layer_norm_eps=1e-5)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=arch["embed_dim"])


def map_state_dict(sd: dict[str, torch.Tensor], arch: dict[str, int]) -> dict[str, torch.Tensor]:
    """OpenAI names → `CLIPModel` names, float32, contiguous. Raises ConversionError naming any source
    tensor left unused."""
    used: set[str] = set(k for k in META_KEYS if k in sd)
    out: dict[str, torch.Tensor] = {}

    def take(src: str) -> torch.Tensor:
        if src not in sd:
            raise ConversionError(f"the checkpoint has no {src}")
        used.add(src)
        t = sd[src]
        return t.float() if t.is_floating_point() else t

    def put(dst: str, t: torch.Tensor) -> None:
        out[dst] = t.contiguous()

    def ln(src: str, dst: str) -> None:
        put(f"{dst}.weight", take(f"{src}.weight"))
        put(f"{dst}.bias", take(f"{src}.bias"))

    def blocks(src_prefix: str, dst_prefix: str, layers: int) -> None:
        for i in range(layers):
            src, dst = f"{src_prefix}.{i}", f"{dst_prefix}.{i}"
            # OpenAI packs q, k, v into one projection (nn.MultiheadAttention's in_proj), in that order
            for part, name in (("weight", "in_proj_weight"), ("bias", "in_proj_bias")):
                q, k, v = take(f"{src}.attn.{name}").chunk(3, dim=0)
                for proj, t in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                    put(f"{dst}.self_attn.{proj}.{part}", t)
            for part in ("weight", "bias"):
                put(f"{dst}.self_attn.out_proj.{part}", take(f"{src}.attn.out_proj.{part}"))
                put(f"{dst}.mlp.fc1.{part}", take(f"{src}.mlp.c_fc.{part}"))
                put(f"{dst}.mlp.fc2.{part}", take(f"{src}.mlp.c_proj.{part}"))
            ln(f"{src}.ln_1", f"{dst}.layer_norm1")
            ln(f"{src}.ln_2", f"{dst}.layer_norm2")

    # Vision tower
    put("vision_model.embeddings.class_embedding", take("visual.class_embedding"))
    put("vision_model.embeddings.patch_embedding.weight", take("visual.conv1.weight"))
    put("vision_model.embeddings.position_embedding.weight", take("visual.positional_embedding"))
    ln("visual.ln_pre", "vision_model.pre_layrnorm")  # HF's spelling
    blocks("visual.transformer.resblocks", "vision_model.encoder.layers", arch["vision_layers"])
    ln("visual.ln_post", "vision_model.post_layernorm")
    # OpenAI multiplies x @ proj (width x embed); nn.Linear stores embed x width
    put("visual_projection.weight", take("visual.proj").t())
    # Text tower
    put("text_model.embeddings.token_embedding.weight", take("token_embedding.weight"))
    put("text_model.embeddings.position_embedding.weight", take("positional_embedding"))
    blocks("transformer.resblocks", "text_model.encoder.layers", arch["text_layers"])
    ln("ln_final", "text_model.final_layer_norm")
    put("text_projection.weight", take("text_projection").t())
    put("logit_scale", take("logit_scale"))

    unused = sorted(set(sd) - used)
    if unused:
        shown = ", ".join(unused[:8]) + (f" and {len(unused) - 8} more" if len(unused) > 8 else "")
        raise ConversionError(f"{len(unused)} checkpoint tensor(s) have no CLIPModel counterpart: {shown}")
    return out


def build_model(sd: dict[str, torch.Tensor], arch: dict[str, int], tokenizer):
    """A `CLIPModel` holding exactly the checkpoint's weights."""
    from transformers import CLIPModel

    mapped = map_state_dict(sd, arch)
    model = CLIPModel(hf_config(arch, tokenizer))
    expected = model.state_dict()
    unfilled = sorted(set(expected) - set(mapped))
    extra = sorted(set(mapped) - set(expected))
    if unfilled or extra:
        raise ConversionError(
            f"CLIPModel parameters left unfilled: {unfilled}; mapped names it lacks: {extra}"
        )
    wrong = [
        f"{k} {tuple(t.shape)} ≠ {tuple(expected[k].shape)}"
        for k, t in mapped.items()
        if t.shape != expected[k].shape
    ]
    if wrong:
        raise ConversionError(f"shapes disagree with the inferred architecture: {'; '.join(wrong[:8])}")
    model.load_state_dict(mapped, strict=True)
    return model.eval()


# --- tokenizer and processor ---------------------------------------------------------------------------
def bytes_to_unicode() -> dict[int, str]:
    """The byte → printable character table byte-level BPE (GPT-2's, CLIP's) runs on: printable Latin-1
    bytes stand for themselves, the rest take the code points from 256 on, in byte order."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    rest = [b for b in range(256) if b not in table]
    table |= {b: chr(256 + i) for i, b in enumerate(rest)}
    return table


def vocab_from_bpe(bpe_gz: Path, vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(token → id, merges) from OpenAI's merges file: the 256 byte symbols, the same with `</w>`, one
    token per merge (its first `vocab_size - 514` merges, the first line being a header), then
    `<|startoftext|>` and `<|endoftext|>`."""
    with gzip.open(bpe_gz, "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")[1:]
    n_merges = vocab_size - 2 * 256 - 2
    merges = [tuple(line.split()) for line in lines if line.strip()]
    if len(merges) < n_merges:
        raise ConversionError(
            f"vocabulary size mismatch: the checkpoint's token embedding has {vocab_size} rows, {bpe_gz} makes "
            f"at most {2 * 256 + len(merges) + 2} tokens ({len(merges)} merges)"
        )
    merges = merges[:n_merges]
    bad = [m for m in merges if len(m) != 2]
    if bad:
        raise ConversionError(f"{bpe_gz}: merge lines must hold two symbols, e.g. {' '.join(bad[0])!r}")
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + [a + b for a, b in merges] + [SOT, EOT]
    if len(set(tokens)) != len(tokens):
        raise ConversionError(f"{bpe_gz}: its merges make duplicate tokens")
    return {t: i for i, t in enumerate(tokens)}, merges  # type: ignore[return-value]


def default_tokenizer_source(pt: Path) -> Path:
    """`bpe_simple_vocab_16e6.txt.gz` beside the checkpoint, else the `clip` package's copy."""
    beside = pt.parent / BPE_NAME
    if beside.is_file():
        return beside
    try:
        import clip  # type: ignore[import-not-found]

        packaged = Path(clip.__file__).parent / BPE_NAME
        if packaged.is_file():
            return packaged
    except ImportError:
        pass
    raise ConversionError(
        f"no tokenizer for {pt}: pass --tokenizer (a Hugging Face CLIP folder, or OpenAI's {BPE_NAME}), put "
        f"{BPE_NAME} beside the checkpoint, or install OpenAI's `clip` package (which ships it)"
    )


def build_tokenizer(source: Path, vocab_size: int, context_length: int):
    """A `CLIPTokenizer` from an HF CLIP folder or OpenAI's bpe file, checked against the checkpoint."""
    from transformers import AutoTokenizer, CLIPTokenizer

    source = Path(source)
    if source.is_dir():
        tokenizer = AutoTokenizer.from_pretrained(
            source, local_files_only=True, model_max_length=context_length
        )
    elif source.name.endswith(".gz"):
        vocab, merges = vocab_from_bpe(source, vocab_size)
        with tempfile.TemporaryDirectory(prefix="rsm-bpe-") as tmp:
            (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
            lines = "".join(f"{a} {b}\n" for a, b in merges)
            (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + lines)
            tokenizer = CLIPTokenizer.from_pretrained(tmp, model_max_length=context_length)
    else:
        raise ConversionError(
            f"tokenizer source {source}: neither a Hugging Face CLIP folder nor a {BPE_NAME}"
        )
    if len(tokenizer) != vocab_size:
        raise ConversionError(
            f"vocabulary size mismatch: the checkpoint's token embedding has {vocab_size} rows, the tokenizer "
            f"from {source} {len(tokenizer)} tokens"
        )
    # CLIP pools the end-of-text token as the position of the largest id: it must be the largest id
    if tokenizer.eos_token_id != vocab_size - 1 or tokenizer.bos_token_id is None:
        raise ConversionError(
            f"tokenizer from {source}: end-of-text id {tokenizer.eos_token_id}, expected {vocab_size - 1} "
            "(the last id, as CLIP pools the largest id)"
        )
    return tokenizer


def build_processor(tokenizer, image_size_hw: tuple[int, int]):
    from transformers import CLIPImageProcessor, CLIPProcessor

    size = {"height": int(image_size_hw[0]), "width": int(image_size_hw[1])}
    image_processor = CLIPImageProcessor(
        do_resize=True,
        size=size,
        resample=3,  # bicubic, as OpenAI's preprocessing
        do_center_crop=False,  # a pedestrian crop is resized whole to the explicit size
        crop_size=size,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=OPENAI_MEAN,
        image_std=OPENAI_STD,
        do_convert_rgb=True,
    )
    return CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


# --- the library functions -----------------------------------------------------------------------------
def convert_checkpoint(
    pt: Path,
    out: Path,
    tokenizer: Path | None = None,
    image_size_hw: tuple[int, int] = DEFAULT_IMAGE_SIZE_HW,
) -> Path:
    """Write the from_pretrained folder `out` (new or empty) for checkpoint `pt`; returns `out`.
    Raises ConversionError (a ValueError) with the reason when it cannot."""
    pt, out = Path(pt), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConversionError(f"{out} exists and is not an empty folder: pass a new one")
    sd = load_openai_state_dict(pt)
    arch = infer_architecture(sd)
    source = Path(tokenizer) if tokenizer is not None else default_tokenizer_source(pt)
    tok = build_tokenizer(source, arch["vocab_size"], arch["context_length"])
    model = build_model(sd, arch, tok)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    build_processor(tok, image_size_hw).save_pretrained(out)
    record = {"source": str(pt.resolve()), "tokenizer": str(source), "image_size_hw": list(image_size_hw)}
    (out / RECORD_NAME).write_text(json.dumps(record | {"architecture": arch}, indent=2) + "\n")
    return out


def converted_cache_root() -> Path:
    """`$RSM_CONVERTED_CACHE`, else `$XDG_CACHE_HOME/rsm-miners/converted` (`~/.cache` without it)."""
    if os.environ.get("RSM_CONVERTED_CACHE"):
        return Path(os.environ["RSM_CONVERTED_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "rsm-miners" / "converted"


def file_sha256(path: Path, chunk_bytes: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk_bytes):
            h.update(block)
    return h.hexdigest()


def converted_folder(
    pt: Path,
    tokenizer: Path | None = None,
    image_size_hw: tuple[int, int] = DEFAULT_IMAGE_SIZE_HW,
    say: Callable[[str], None] = print,
) -> Path:
    """The converted folder of checkpoint `pt`, converting it the first time only: keyed by the first 16
    hex digits of the checkpoint bytes' sha256 (plus `-HxW` for a non-default image size), built in a
    temporary folder and renamed whole, so that a crash leaves no half folder and two processes racing
    keep one. `say` is told whether the folder was converted now or reused. A cached folder is reused
    whatever `tokenizer` names (the checkpoint's vocabulary fixes it)."""
    pt = Path(pt)
    key = file_sha256(pt)[:16]
    if tuple(image_size_hw) != DEFAULT_IMAGE_SIZE_HW:
        key += f"-{image_size_hw[0]}x{image_size_hw[1]}"
    root = converted_cache_root()
    target = root / key
    if (target / "config.json").is_file():
        say(f"convert_clip: {pt}: reusing {target} (converted earlier)")
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
    try:
        convert_checkpoint(pt, tmp, tokenizer, image_size_hw)
        try:
            tmp.rename(target)
        except OSError:  # another process renamed its copy first: keep that one
            if not (target / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    say(f"convert_clip: {pt}: converted once into {target}")
    return target


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m miners.convert_clip", description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", type=Path, help="OpenAI CLIP .pt (TorchScript archive or state dict)")
    ap.add_argument("out_dir", type=Path, help="the from_pretrained folder to write (new or empty)")
    ap.add_argument(
        "--tokenizer",
        type=Path,
        help=f"a Hugging Face CLIP folder or OpenAI's {BPE_NAME} (default: {BPE_NAME} beside the checkpoint, "
        "else the clip package's)",
    )
    ap.add_argument(
        "--image-size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        default=list(DEFAULT_IMAGE_SIZE_HW),
        help="the processor's input height and width in pixels (default: 384 128)",
    )
    args = ap.parse_args(argv)
    if not args.checkpoint.is_file():
        print(f"error: {args.checkpoint}: no such checkpoint file", file=sys.stderr)
        return 2
    try:
        convert_checkpoint(args.checkpoint, args.out_dir, args.tokenizer, tuple(args.image_size))
    except ConversionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"convert_clip: {args.checkpoint} → {args.out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
