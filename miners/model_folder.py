"""What a CLIP model folder is, without loading it: its content fingerprint, why a path is not one, and
the crop modes a scorer knows. Torch-free on purpose: the flow's driver (preflight, run identity) needs
these, and importing torch and transformers there cost seconds of start-up on every command."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

CROP_MODES = ("box", "mask", "blur")


# What this project writes beside a model: not part of the model's identity
_OURS = {"bootstrap.json", "rsm-calibrator.json", "rsm-bank.json", "refine.json", "convert_clip.json"}
# fingerprint by (folder, each hashed file's name, size, mtime): the driver needs it twice at start-up
# (preflight, run identity), and a real checkpoint is hundreds of MB to read
_FINGERPRINTS: dict[tuple, str] = {}


def model_fingerprint(model_dir: str | Path) -> str:
    """Short content hash of a from_pretrained folder's config, weights, tokenizer and processor — not
    of what this project writes beside them (the calibrator, the bootstrap report)."""
    folder = Path(model_dir)
    names = sorted(
        p.name
        for p in folder.iterdir()
        if p.name.endswith((".json", ".safetensors", ".bin", ".txt")) and p.name not in _OURS
    )
    stats = [(folder / n).stat() for n in names]
    key = (
        str(folder.resolve()),
        *((n, st.st_size, st.st_mtime_ns) for n, st in zip(names, stats, strict=True)),
    )
    if key not in _FINGERPRINTS:
        h = hashlib.sha256()
        for name in names:
            h.update(name.encode())
            h.update((folder / name).read_bytes())
        _FINGERPRINTS[key] = h.hexdigest()[:16]
    return _FINGERPRINTS[key]


def clip_folder_problem(model_dir: str | Path) -> str | None:
    """Why `model_dir` is not a loadable CLIP folder, or None: the one wording every command uses
    (the caller adds the flag or parameter that fixes it)."""
    model_dir = Path(model_dir)
    if not model_dir.exists():
        return f"CLIP model folder {model_dir} does not exist"
    if not (model_dir / "config.json").is_file():
        return f"{model_dir}: not a CLIP model folder (no config.json)"
    return None


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def resolve_model_ref(ref: str | Path) -> tuple[Path, str | None]:
    """A model given as a folder, as a Hugging Face model id ("openai/clip-vit-base-patch16") resolved
    offline from the local Hugging Face cache (HF_HUB_CACHE; nothing is downloaded here), or as an OpenAI
    CLIP `.pt` checkpoint, converted once to a from_pretrained folder (miners.convert_clip.converted_folder,
    which says whether it converted or reused). Returns (folder, None), or (the ref as a path, why it is
    none of them: the cache folder it looked in, or why the checkpoint does not convert)."""
    path = Path(ref)
    if str(ref).endswith(".pt") and not path.is_dir():
        if not path.is_file():
            return path, f"{ref}: no such checkpoint file"
        # Imported here: the flow's driver imports this module and must not pay for torch
        from miners.convert_clip import converted_folder

        try:
            return converted_folder(path), None
        except Exception as exc:  # a ConversionError, or a file neither torch.load nor torch.jit.load reads
            return path, f"{ref}: cannot convert this OpenAI CLIP checkpoint: {exc}"
    if path.exists() or not _HUB_ID.fullmatch(str(ref)):
        return path, None
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE

    try:
        return Path(snapshot_download(str(ref), local_files_only=True)), None
    except Exception:  # not cached (LocalEntryNotFoundError), or an id the hub would refuse
        return path, (
            f"{ref}: no such folder, and no copy of the Hugging Face model {ref} in the local cache "
            f"{HF_HUB_CACHE} (models--{str(ref).replace('/', '--')}; nothing is downloaded here: copy a "
            "from_pretrained folder there, or pass its path)"
        )


__all__ = ["CROP_MODES", "clip_folder_problem", "model_fingerprint", "resolve_model_ref"]
