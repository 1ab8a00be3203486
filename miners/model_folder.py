"""What a CLIP model folder is, without loading it: its content fingerprint, why a path is not one, and
the crop modes a scorer knows. Torch-free on purpose: the flow's driver (preflight, run identity) needs
these, and importing torch and transformers there cost seconds of start-up on every command."""

from __future__ import annotations

import hashlib
from pathlib import Path

CROP_MODES = ("box", "mask", "blur")


def model_fingerprint(model_dir: str | Path) -> str:
    """Short content hash of a from_pretrained folder's config, weights, tokenizer and processor — not
    of what this project writes beside them (the calibrator, the bootstrap report)."""
    ours = {"bootstrap.json", "rsm-calibrator.json", "rsm-bank.json", "refine.json"}
    h = hashlib.sha256()
    for name in sorted(p.name for p in Path(model_dir).iterdir()):
        if name.endswith((".json", ".safetensors", ".bin", ".txt")) and name not in ours:
            h.update(name.encode())
            h.update((Path(model_dir) / name).read_bytes())
    return h.hexdigest()[:16]


def clip_folder_problem(model_dir: str | Path) -> str | None:
    """Why `model_dir` is not a loadable CLIP folder, or None: the one wording every command uses
    (the caller adds the flag or parameter that fixes it)."""
    model_dir = Path(model_dir)
    if not model_dir.exists():
        return f"CLIP model folder {model_dir} does not exist"
    if not (model_dir / "config.json").is_file():
        return f"{model_dir}: not a CLIP model folder (no config.json)"
    return None


__all__ = ["CROP_MODES", "clip_folder_problem", "model_fingerprint"]
