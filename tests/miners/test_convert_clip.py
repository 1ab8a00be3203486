"""miners.convert_clip: an OpenAI-layout CLIP checkpoint → a from_pretrained folder, checked numerically.

The checkpoint is a random-init state dict in OpenAI's layout (keys and shapes written here from the
layout's description: `visual.conv1`, `visual.transformer.resblocks.N.attn.in_proj_weight`, ...), tiny
(vision width 128, text width 192, two layers each, patch 16 at 64 x 64). The converted `CLIPModel`'s image
and text embeddings are compared with a forward computed here directly from that state dict (conv patches,
class token and positions, pre-norm residual blocks with QuickGELU, the CLS / end-of-text token through
the final norm and the projection): the mapping is right only if they agree to 1e-4.
"""

from __future__ import annotations

import gzip
import json
import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from miners.convert_clip import BPE_NAME, bytes_to_unicode, convert_checkpoint, converted_folder
from tests.miners.test_real_size import clip_bpe_merges

TINY = dict(vision_width=128, vision_layers=2, patch=16, resolution=64, text_width=192, text_layers=2)
TINY |= dict(context=77, embed_dim=96, merges=300)
CAPTIONS = [
    "a man in a red shirt and blue jeans carrying a black backpack",
    "the woman wears a white dress, black shoes and holds a bag",
    "a person in a grey jacket with dark trousers walking",
]


# --- the OpenAI layout, written from its description ----------------------------------------------------
def openai_state_dict(
    vision_width: int,
    vision_layers: int,
    patch: int,
    resolution: int,
    text_width: int,
    text_layers: int,
    context: int,
    embed_dim: int,
    merges: int,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Random tensors under OpenAI's ViT CLIP names and shapes. Norm weights and biases are random too,
    and the linear weights large enough for peaked attention, so that a swapped or transposed tensor
    changes the outputs."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    def blocks(prefix: str, width: int, layers: int) -> dict[str, torch.Tensor]:
        sd = {}
        for i in range(layers):
            p = f"{prefix}.{i}"
            sd[f"{p}.attn.in_proj_weight"] = rand(3 * width, width, std=2 / math.sqrt(width))
            sd[f"{p}.attn.in_proj_bias"] = rand(3 * width, std=0.1)
            sd[f"{p}.attn.out_proj.weight"] = rand(width, width, std=1 / math.sqrt(width))
            sd[f"{p}.attn.out_proj.bias"] = rand(width, std=0.1)
            for ln in ("ln_1", "ln_2"):
                sd[f"{p}.{ln}.weight"] = 1 + rand(width, std=0.2)
                sd[f"{p}.{ln}.bias"] = rand(width, std=0.1)
            sd[f"{p}.mlp.c_fc.weight"] = rand(4 * width, width, std=1 / math.sqrt(width))
            sd[f"{p}.mlp.c_fc.bias"] = rand(4 * width, std=0.1)
            sd[f"{p}.mlp.c_proj.weight"] = rand(width, 4 * width, std=1 / math.sqrt(4 * width))
            sd[f"{p}.mlp.c_proj.bias"] = rand(width, std=0.1)
        return sd

    grid = resolution // patch
    vocab = 2 * 256 + merges + 2
    sd = {
        "visual.class_embedding": rand(vision_width, std=0.5),
        "visual.positional_embedding": rand(grid * grid + 1, vision_width, std=0.5),
        "visual.conv1.weight": rand(vision_width, 3, patch, patch, std=1 / patch),
        "visual.ln_pre.weight": 1 + rand(vision_width, std=0.2),
        "visual.ln_pre.bias": rand(vision_width, std=0.1),
        **blocks("visual.transformer.resblocks", vision_width, vision_layers),
        "visual.ln_post.weight": 1 + rand(vision_width, std=0.2),
        "visual.ln_post.bias": rand(vision_width, std=0.1),
        "visual.proj": rand(vision_width, embed_dim, std=1 / math.sqrt(vision_width)),
        "token_embedding.weight": rand(vocab, text_width, std=0.5),
        "positional_embedding": rand(context, text_width, std=0.5),
        **blocks("transformer.resblocks", text_width, text_layers),
        "ln_final.weight": 1 + rand(text_width, std=0.2),
        "ln_final.bias": rand(text_width, std=0.1),
        "text_projection": rand(text_width, embed_dim, std=1 / math.sqrt(text_width)),
        "logit_scale": torch.tensor(math.log(1 / 0.07)),
    }
    return sd


def write_bpe_gz(path: Path, corpus: list[str], n_merges: int) -> None:
    """A merges file in OpenAI's `bpe_simple_vocab_16e6.txt.gz` layout (a header line, then one "a b" merge
    a line), `n_merges` of them learned from `corpus` first (tests/miners/test_real_size.py)."""
    merges = clip_bpe_merges(corpus, n_merges)
    lines = ['"bpe_simple_vocab_16e6.txt#version: 0.2'] + [f"{a} {b}" for a, b in merges]
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")


def save_torchscript(sd: dict[str, torch.Tensor], path: Path, metadata: dict[str, int]) -> None:
    """A TorchScript archive whose `state_dict()` is `sd` plus OpenAI's scalar buffers (its modules are
    empty containers: the converter reads only the state dict)."""

    class Root(torch.nn.Module):
        def forward(self) -> torch.Tensor:
            return self.logit_scale

    root = Root()
    for key, tensor in sd.items():
        *parents, name = key.split(".")
        module = root
        for part in parents:
            if not hasattr(module, part):
                module.add_module(part, torch.nn.Module())
            module = getattr(module, part)
        module.register_parameter(name, torch.nn.Parameter(tensor, requires_grad=False))
    for key, value in metadata.items():
        root.register_buffer(key, torch.tensor(value))
    with warnings.catch_warnings():  # torch.jit.script is deprecated; OpenAI's archives are TorchScript
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(root).save(str(path))


# --- the reference forward, from the OpenAI state dict directly ------------------------------------------
def _ln(x: torch.Tensor, sd: dict, name: str) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-5)


def _block(x: torch.Tensor, sd: dict, p: str, causal: bool) -> torch.Tensor:
    b, t, d = x.shape
    heads = d // 64
    qkv = _ln(x, sd, f"{p}.ln_1") @ sd[f"{p}.attn.in_proj_weight"].T + sd[f"{p}.attn.in_proj_bias"]
    q, k, v = (z.reshape(b, t, heads, d // heads).transpose(1, 2) for z in qkv.split(d, dim=-1))
    scores = q @ k.transpose(-1, -2) / math.sqrt(d // heads)
    if causal:
        scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    attended = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d)
    x = x + attended @ sd[f"{p}.attn.out_proj.weight"].T + sd[f"{p}.attn.out_proj.bias"]
    h = _ln(x, sd, f"{p}.ln_2") @ sd[f"{p}.mlp.c_fc.weight"].T + sd[f"{p}.mlp.c_fc.bias"]
    h = h * torch.sigmoid(1.702 * h)  # QuickGELU
    return x + h @ sd[f"{p}.mlp.c_proj.weight"].T + sd[f"{p}.mlp.c_proj.bias"]


def reference_image_features(sd: dict, pixels: torch.Tensor) -> torch.Tensor:
    """B x 3 x H x W normalised pixels → B x E unnormalised image features."""
    weight = sd["visual.conv1.weight"]
    x = F.conv2d(pixels, weight, stride=weight.shape[-1]).flatten(2).transpose(1, 2)  # B x P x D
    cls = sd["visual.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + sd["visual.positional_embedding"]
    x = _ln(x, sd, "visual.ln_pre")
    n = len({k.split(".")[3] for k in sd if k.startswith("visual.transformer.resblocks.")})
    for i in range(n):
        x = _block(x, sd, f"visual.transformer.resblocks.{i}", causal=False)
    return _ln(x[:, 0], sd, "visual.ln_post") @ sd["visual.proj"]


def reference_text_features(sd: dict, ids: torch.Tensor) -> torch.Tensor:
    """B x T token ids (end-of-text the largest id, padded with 0 as OpenAI pads) → B x E features."""
    x = sd["token_embedding.weight"][ids] + sd["positional_embedding"][: ids.shape[1]]
    n = len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})
    for i in range(n):
        x = _block(x, sd, f"transformer.resblocks.{i}", causal=True)
    x = _ln(x, sd, "ln_final")
    return x[torch.arange(len(ids)), ids.argmax(-1)] @ sd["text_projection"]


def _swap_qk(sd: dict, prefix: str) -> dict:
    w = sd[f"{prefix}.attn.in_proj_weight"]
    q, k, v = w.chunk(3)
    return sd | {f"{prefix}.attn.in_proj_weight": torch.cat([k, q, v])}


# --- fixtures -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> dict:
    """The tiny OpenAI-layout state dict, saved plain (`ckpt/state.pt`) with the bpe file beside it."""
    base = tmp_path_factory.mktemp("openai_clip")
    sd = openai_state_dict(**TINY)
    (base / "ckpt").mkdir()
    torch.save(sd, base / "ckpt" / "state.pt")
    write_bpe_gz(base / "ckpt" / BPE_NAME, CAPTIONS, TINY["merges"])
    return {"sd": sd, "pt": base / "ckpt" / "state.pt", "bpe": base / "ckpt" / BPE_NAME, "base": base}


def _embeddings(folder: Path, pixels: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from miners.clip_scorer import load_clip

    model, _ = load_clip(folder, "cpu")
    with torch.no_grad():
        image = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        text = model.text_model(input_ids=ids, attention_mask=torch.ones_like(ids))
        return image, model.text_projection(text.pooler_output)


def _inputs(folder: Path, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    from miners.clip_scorer import load_clip

    _, processor = load_clip(folder, "cpu")
    ids = processor.tokenizer(CAPTIONS, padding=True, return_tensors="pt")["input_ids"]
    pixels = torch.randn(3, 3, resolution, resolution, generator=torch.Generator().manual_seed(1))
    return pixels, ids


# --- tests ----------------------------------------------------------------------------------------------
def test_converted_clip_matches_a_forward_computed_from_the_openai_state_dict(checkpoint, tmp_path):
    from miners.clip_scorer import load_clip
    from miners.encoders import image_embeddings, input_size_hw, text_embeddings

    sd, out = checkpoint["sd"], tmp_path / "clip"
    assert convert_checkpoint(checkpoint["pt"], out, tokenizer=checkpoint["bpe"]) == out
    model, processor = load_clip(out, "cpu")
    cfg = model.config
    assert cfg.vision_config.hidden_act == cfg.text_config.hidden_act == "quick_gelu"
    assert cfg.vision_config.layer_norm_eps == cfg.text_config.layer_norm_eps == 1e-5
    assert (cfg.vision_config.hidden_size, cfg.vision_config.num_attention_heads) == (128, 2)
    assert (cfg.text_config.hidden_size, cfg.text_config.num_attention_heads) == (192, 3)
    assert (cfg.vision_config.image_size, cfg.vision_config.patch_size, cfg.projection_dim) == (64, 16, 96)
    assert input_size_hw(processor) == (384, 128)  # the project's pedestrian input, explicit
    assert list(processor.image_processor.image_mean) == [0.48145466, 0.4578275, 0.40821073]

    # The tokenizer: OpenAI's vocabulary order, start/end ids, learned sub-words
    vocab = 2 * 256 + TINY["merges"] + 2
    assert len(processor.tokenizer) == vocab == cfg.text_config.vocab_size
    ids = processor.tokenizer(CAPTIONS[0])["input_ids"]
    assert ids[0] == vocab - 2 and ids[-1] == vocab - 1
    assert "shirt</w>" in processor.tokenizer.convert_ids_to_tokens(ids)
    with gzip.open(checkpoint["bpe"], "rt") as fh:
        first_merge = "".join(fh.read().split("\n")[1].split())
    symbols = list(bytes_to_unicode().values())
    expected = [symbols[0], symbols[255], symbols[0] + "</w>", first_merge, "<|endoftext|>"]
    assert processor.tokenizer.convert_ids_to_tokens([0, 255, 256, 512, vocab - 1]) == expected

    pixels, ids = _inputs(out, TINY["resolution"])
    assert (ids.argmax(-1) == (ids == vocab - 1).int().argmax(-1)).all()  # padded with end-of-text
    image, text = _embeddings(out, pixels, ids)
    ref_image = reference_image_features(sd, pixels)
    # OpenAI pads with 0 after the end-of-text token (HF's tokenizer with end-of-text): causal attention
    # makes the pooled token blind to either
    first_eot = (ids == vocab - 1).int().argmax(-1, keepdim=True)
    openai_ids = ids.masked_fill(torch.arange(ids.shape[1]) > first_eot, 0)
    ref_text = reference_text_features(sd, openai_ids)
    assert torch.allclose(image, ref_image, atol=1e-4, rtol=0), (image - ref_image).abs().max()
    assert torch.allclose(text, ref_text, atol=1e-4, rtol=0), (text - ref_text).abs().max()
    # The comparison can tell a wrong mapping: q and k swapped in one block moves the outputs
    assert (
        reference_image_features(_swap_qk(sd, "visual.transformer.resblocks.1"), pixels) - ref_image
    ).abs().max() > 1e-2
    assert (
        reference_text_features(_swap_qk(sd, "transformer.resblocks.0"), ids) - ref_text
    ).abs().max() > 1e-2
    # The project's own path (normalised, interpolation a no-op at the native size) agrees too
    with torch.no_grad():
        ours = image_embeddings(model, pixels)
        ours_text = text_embeddings(model, ids, torch.ones_like(ids))
    assert torch.allclose(ours, F.normalize(ref_image, dim=-1), atol=1e-5)
    assert torch.allclose(ours_text, F.normalize(ref_text, dim=-1), atol=1e-5)
    assert torch.allclose(model.logit_scale, sd["logit_scale"])


def test_a_float16_torchscript_archive_converts_through_the_cli(checkpoint, tmp_path):
    """OpenAI ships TorchScript archives of float16 weights with three scalar buffers beside them."""
    from miners.clip_scorer import load_clip
    from miners.convert_clip import main

    sd16 = {k: v.half() for k, v in checkpoint["sd"].items()}
    pt = tmp_path / "ViT-tiny.pt"
    meta = {"input_resolution": TINY["resolution"], "context_length": TINY["context"]}
    save_torchscript(sd16, pt, meta | {"vocab_size": 2 * 256 + TINY["merges"] + 2})
    out = tmp_path / "clip"
    argv = [str(pt), str(out), "--tokenizer", str(checkpoint["bpe"]), "--image-size", "256", "96"]
    assert main(argv) == 0
    model, processor = load_clip(out, "cpu")
    assert dict(processor.image_processor.size) == {"height": 256, "width": 96}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    pixels, ids = _inputs(out, TINY["resolution"])
    image, text = _embeddings(out, pixels, ids)
    sd32 = {k: v.float() for k, v in sd16.items()}
    assert torch.allclose(image, reference_image_features(sd32, pixels), atol=1e-4, rtol=0)
    assert torch.allclose(text, reference_text_features(sd32, ids), atol=1e-4, rtol=0)
    record = json.loads((out / "convert_clip.json").read_text())
    assert record["architecture"]["vision_layers"] == 2 and record["image_size_hw"] == [256, 96]
    # A folder that holds something is refused, not overwritten
    assert main(argv) == 2


def test_init_pt_converts_once_into_the_cache_then_reuses_it(checkpoint, tmp_path, monkeypatch, capsys):
    import hashlib

    from miners.model_folder import model_fingerprint, resolve_model_ref

    cache = tmp_path / "converted"
    monkeypatch.setenv("RSM_CONVERTED_CACHE", str(cache))
    folder, problem = resolve_model_ref(str(checkpoint["pt"]))  # the bpe file beside it is the tokenizer
    assert problem is None
    key = hashlib.sha256(checkpoint["pt"].read_bytes()).hexdigest()[:16]
    assert folder == cache / key and (folder / "config.json").is_file()
    assert "converted once into" in capsys.readouterr().out
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    again, problem = resolve_model_ref(str(checkpoint["pt"]))
    assert (again, problem) == (folder, None)
    assert "reusing" in capsys.readouterr().out
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime
    assert sorted(p.name for p in cache.iterdir()) == [key]  # no temporary folder left
    # The record of where it came from is not part of the model's identity
    fingerprint = model_fingerprint(folder)
    (folder / "convert_clip.json").write_text("{}")
    assert model_fingerprint(folder) == fingerprint
    # XDG_CACHE_HOME is the default's base; another image size is another folder
    monkeypatch.delenv("RSM_CONVERTED_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    other = converted_folder(checkpoint["pt"], image_size_hw=(256, 96), say=lambda _: None)
    assert other == tmp_path / "xdg" / "rsm-miners" / "converted" / f"{key}-256x96"


def test_train_rogle_init_pt_trains_from_the_converted_folder(
    checkpoint, tiny_dataset, tmp_path, monkeypatch
):
    from miners.training.rogle import main

    monkeypatch.setenv("RSM_CONVERTED_CACHE", str(tmp_path / "converted"))
    argv = ["--manifest", str(tiny_dataset / "manifest.parquet"), "--init", str(checkpoint["pt"])]
    argv += ["--epochs", "1", "--batch-size", "16", "--out", str(tmp_path / "run"), "--eval-every", "5"]
    assert main(argv) == 0
    run_args = json.loads((tmp_path / "run" / "run_args.json").read_text())
    assert Path(run_args["init_resolved"]).parent == tmp_path / "converted"


def test_unconvertible_checkpoints_are_refused_with_the_reason(checkpoint, tmp_path, monkeypatch):
    import sys

    from miners.model_folder import resolve_model_ref

    monkeypatch.setenv("RSM_CONVERTED_CACHE", str(tmp_path / "converted"))
    sd = checkpoint["sd"]

    def refusal(state: dict, name: str, bpe: bool = True) -> str:
        folder = tmp_path / name
        folder.mkdir()
        torch.save(state, folder / f"{name}.pt")
        if bpe:
            (folder / BPE_NAME).write_bytes(checkpoint["bpe"].read_bytes())
        path, problem = resolve_model_ref(str(folder / f"{name}.pt"))
        assert path == folder / f"{name}.pt" and problem is not None
        return problem

    resnet = {k: v for k, v in sd.items() if not k.startswith("visual.")}
    resnet |= {
        "visual.layer1.0.conv1.weight": torch.zeros(4, 4, 1, 1),
        "visual.attnpool.c_proj.weight": torch.zeros(4, 4),
    }
    assert "ModifiedResNet" in refusal(resnet, "resnet")
    # 20 more rows than the bpe file's tokens
    bigger = sd | {
        "token_embedding.weight": torch.zeros(2 * 256 + TINY["merges"] + 2 + 20, TINY["text_width"])
    }
    assert "vocabulary size mismatch" in refusal(bigger, "vocab")
    assert "1 checkpoint tensor(s) have no CLIPModel counterpart: visual.extra" in refusal(
        sd | {"visual.extra": torch.zeros(3)}, "extra"
    )
    monkeypatch.setitem(sys.modules, "clip", None)  # `import clip` fails
    no_tokenizer = refusal(sd, "notok", bpe=False)
    assert (
        "pass --tokenizer" in no_tokenizer and BPE_NAME in no_tokenizer and "`clip` package" in no_tokenizer
    )
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    _, problem = resolve_model_ref(str(tmp_path / "junk.pt"))
    assert "neither a state dict" in problem
    assert (
        resolve_model_ref(str(tmp_path / "absent.pt"))[1]
        == f"{tmp_path / 'absent.pt'}: no such checkpoint file"
    )
    assert not any((tmp_path / "converted").iterdir())  # nothing half-written in the cache
