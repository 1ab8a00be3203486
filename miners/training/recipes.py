"""Training recipes: named presets and config files that resolve to one `TrainConfig`.

Consumes a preset name (`tiny`, `irra-b16`), an optional YAML or JSON file of `TrainConfig` fields, and
the flags a user gave; produces the resolved `TrainConfig` (saved by the trainer as RUN_DIR/config.json)
and where each field's value came from. Precedence, lowest first: the TrainConfig defaults, the command's
own defaults, the method's defaults (its losses: miners.training.methods), the preset (the optimizer,
schedule, augmentation and text mode of a published recipe), the file, the flags.

`irra-b16` is IRRA's published recipe (anosorae/IRRA, options.py and solver/, read in ../shared/METHODS.md
section 1) where this harness has the option: Adam, lr 1e-5, eps 1e-3, weight decay 4e-5, biases at 2x lr
and no decay, new heads (IRRA's `cross*`, `classifier`, `mlm_head`: here the MLM fusion and the ID
classifier) at 5x lr, 60 epochs, 5 warm-up epochs linear from 0.1x then cosine to 0, stepped per epoch,
batch 64, IRRA's image augmentation, whole captions truncated at 77 tokens, no gradient clipping. IRRA's
losses (SDM + ID + MLM) are its method: `--method irra --preset irra-b16` is IRRA. Where it differs: IRRA casts the weights to fp16; this
harness trains in fp32 with bf16 autocast on CUDA. The 384x128 input is the processor's size, or this
project's default for a checkpoint whose processor has none (miners.encoders.input_size_hw).
`tiny` is the defaults `train_rogle` has always had, fitted to the tiny bootstrapped CLIP.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import fields
from pathlib import Path
from typing import Any

from miners.training.config import GLOBAL_LOSS_NAMES, IMAGE_AUGMENT_NAMES, METHOD_NAMES, TrainConfig

PRESETS: dict[str, dict[str, Any]] = {
    # train_rogle's defaults before presets existed (fine-tuning the tiny CLIP the demo bootstraps)
    "tiny": {"epochs": 10, "batch_size": 64, "lr": 1e-4, "weight_decay_exempt": False},
    "irra-b16": {
        "epochs": 60,
        "batch_size": 64,
        "optimizer": "adam",
        "lr": 1e-5,
        "adam_eps": 1e-3,
        "weight_decay": 4e-5,
        "bias_lr_factor": 2.0,
        "head_lr_factor": 5.0,
        "warmup_epochs": 5.0,
        "warmup_start_factor": 0.1,
        "schedule_per": "epoch",
        "augment": "irra",
        "text_mode": "truncate",
        "max_grad_norm": 0.0,
    },
}


class RecipeError(ValueError):
    """A config file or preset that cannot be used; the message names the file and the fields."""


def read_config_file(path: Path) -> dict[str, Any]:
    """The TrainConfig fields of a YAML (.yaml/.yml) or JSON file; unknown names are refused by name."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"--config {path}: no such file")
    text = path.read_text()
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text)
        else:
            values = json.loads(text)
    except Exception as exc:
        raise RecipeError(f"--config {path}: cannot parse it ({exc})") from exc
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise RecipeError(
            f"--config {path}: expected a mapping of TrainConfig fields, got {type(values).__name__}"
        )
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise RecipeError(
            f"--config {path}: unknown field(s) {', '.join(unknown)}; TrainConfig has {', '.join(sorted(known))}"
        )
    return values


def _typed(name: str, value: Any) -> Any:
    """A file's value in the field's type (YAML reads 1e-5 as a string; JSON has no tuples)."""
    default = getattr(TrainConfig(), name)
    if value is None or default is None or isinstance(default, dict | str):
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise RecipeError(f"{name}: expected true or false, got {value!r}")
        return value
    if isinstance(default, float):
        try:
            return float(value)
        except (TypeError, ValueError) as exc:
            raise RecipeError(f"{name}: expected a number, got {value!r}") from exc
    if isinstance(default, int):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if not isinstance(value, int):
            raise RecipeError(f"{name}: expected an integer, got {value!r}")
    return value


def resolve_config(
    preset: str | None,
    config_file: Path | None,
    flags: dict[str, Any],
    base: dict[str, Any] | None = None,
) -> tuple[TrainConfig, dict[str, str]]:
    """(the TrainConfig, {field: "command default" | "preset NAME" | "config FILE" | "flag"} for every
    field set by a layer). `base` holds a command's own defaults (train_rogle: the local branch on, weight
    0.5); `flags` only what the user gave on the command line (None values are ignored)."""
    if preset is not None and preset not in PRESETS:
        raise RecipeError(f"--preset {preset}: unknown; choose one of {', '.join(PRESETS)}")
    file_values = read_config_file(config_file) if config_file is not None else {}
    given = {k: v for k, v in flags.items() if v is not None}
    method = given.get("method") or file_values.get("method") or (base or {}).get("method") or "rogle"
    if method not in METHOD_NAMES:
        raise RecipeError(f"method {method!r}: unknown; choose one of {', '.join(METHOD_NAMES)}")
    from miners.training.methods import method_class  # the method's defaults (imports torch)

    values: dict[str, Any] = {}
    source: dict[str, str] = {}
    layers = [
        ("command default", base or {}),
        (f"method {method}", dict(method_class(method).defaults)),
        (f"preset {preset}", PRESETS[preset] if preset else {}),
        (f"config {config_file}", file_values),
        ("flag", given),
    ]
    for where, layer in layers:
        for name, value in layer.items():
            if name == "method_options" and name in values:  # options merge, later layers win per key
                value = {**values[name], **value}
            values[name] = _typed(name, value) if where != "flag" else value
            source[name] = where
    cfg = TrainConfig(**values)
    check_config(cfg)
    from miners.training.methods import method_options

    try:  # every option of the method, its defaults filled in: config.json says what the run used
        cfg.method_options = dataclasses.asdict(method_options(cfg.method, cfg.method_options))
    except (ValueError, TypeError) as exc:
        raise RecipeError(str(exc)) from exc
    return cfg, source


def check_config(cfg: TrainConfig) -> None:
    """Refuse values the trainer would only fail on later (after decoding a dataset)."""
    problems = []
    if cfg.local not in ("none", "rsm"):
        problems.append(f"local {cfg.local!r} (choose none or rsm)")
    if cfg.global_loss not in GLOBAL_LOSS_NAMES:
        problems.append(f"global_loss {cfg.global_loss!r} (choose {', '.join(GLOBAL_LOSS_NAMES)})")
    if cfg.augment not in IMAGE_AUGMENT_NAMES:
        problems.append(f"augment {cfg.augment!r} (choose {', '.join(IMAGE_AUGMENT_NAMES)})")
    if cfg.optimizer not in ("adamw", "adam"):
        problems.append(f"optimizer {cfg.optimizer!r} (choose adamw or adam)")
    if cfg.schedule_per not in ("step", "epoch"):
        problems.append(f"schedule_per {cfg.schedule_per!r} (choose step or epoch)")
    if cfg.text_mode not in ("sentence-pool", "truncate"):
        problems.append(f"text_mode {cfg.text_mode!r} (choose sentence-pool or truncate)")
    for name in ("epochs", "batch_size"):
        if getattr(cfg, name) < 1:
            problems.append(f"{name} {getattr(cfg, name)} (must be >= 1)")
    if cfg.lr <= 0:
        problems.append(f"lr {cfg.lr} (must be > 0)")
    if problems:
        raise RecipeError("invalid training settings: " + "; ".join(problems))
