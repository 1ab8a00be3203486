"""The training settings, torch-free: `TrainConfig` (every field that decides a run's weights, plus the
run-only ones), and the names of the registered losses and augmentations, so that a command's `--help` and
its config checks answer without importing torch (miners.training.losses / augment check that their
registries carry exactly these names)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# miners.training.losses.GLOBAL_LOSSES and miners.training.augment.IMAGE_AUGMENTS have these keys
GLOBAL_LOSS_NAMES = ("identity-infonce", "sdm", "itc", "cmpm")
IMAGE_AUGMENT_NAMES = ("none", "irra")
# miners.training.methods.METHODS has these keys
METHOD_NAMES = ("rogle", "irra", "park", "scmm", "ivt")

# TrainConfig fields that change no weight (where the run goes, how often it evaluates and logs): a model's
# identity (the bootstrap's reuse check) and a resume's refusal leave them out, so a release adding one of
# them neither retrains a finished model nor refuses a resume
RUN_ONLY_FIELDS = ("device", "eval_every_epochs", "log_every_steps", "tensorboard")


def training_settings(cfg: TrainConfig) -> dict[str, Any]:
    """The TrainConfig fields that decide the weights."""
    return {k: v for k, v in asdict(cfg).items() if k not in RUN_ONLY_FIELDS}


@dataclass
class TrainConfig:
    """Every setting that decides a training run's weights (plus the run-only ones in RUN_ONLY_FIELDS).
    miners.training.recipes has the named presets (`tiny`, `irra-b16`) and reads config files."""

    epochs: int = 12
    batch_size: int = 64
    lr: float = 1e-3  # from scratch; use ~1e-5 when fine-tuning a real CLIP
    weight_decay: float = 0.05
    # True: no weight decay on biases, norms, token/position/class embeddings and the logit scale (the
    # field's practice); False: on every parameter, as the tiny CLIP's recipe always had it (the bootstrap
    # and the tiny preset keep it: measured on the demo, exempting them cost the bootstrap 17.7 -> 14.9 R1)
    weight_decay_exempt: bool = True
    optimizer: str = "adamw"  # or "adam" (IRRA: Adam, its weight decay an L2 term in the gradient)
    adam_eps: float = 1e-8
    bias_lr_factor: float = 1.0  # biases' lr = lr x this (IRRA: 2)
    head_lr_factor: float = 1.0  # training-only heads (MLM fusion, ID classifier): lr x this (IRRA: 5)
    warmup_fraction: float = 0.05  # of all steps, linear from warmup_start_factor x lr (unless warmup_epochs)
    warmup_epochs: float | None = None  # when set, the warm-up length in epochs (IRRA: 5)
    warmup_start_factor: float = 0.0
    schedule_per: str = "step"  # "step": lr changes every step; "epoch": once per epoch (IRRA)
    method: str = "rogle"  # miners.training.methods: rogle, irra, park, scmm, ivt
    method_options: dict[str, Any] = field(default_factory=dict)  # the method's own options (its dataclass)
    local: str = "none"  # "rsm": add ROGLE's reliability-weighted region–sentence branch (mined pairs)
    text_mode: str = "sentence-pool"  # or "truncate": how long captions become one global embedding
    global_loss: str = "identity-infonce"  # miners.training.losses.GLOBAL_LOSSES: or sdm, itc, cmpm
    sdm_temperature: float = 0.02  # SDM's fixed temperature (IRRA); the learned logit scale is not used
    id_loss_weight: float = 0.0  # > 0: one classifier over the train identities, shared by both modalities
    mlm_weight: float = 0.0  # > 0: IRRA's implicit relation reasoning (MLM through cross-modal fusion)
    augment: str = "none"  # or "irra": flip, pad-10 random crop, random erasing (boxes follow the image)
    text_augment: bool = False  # token mask / replace / delete (RDE's rates) on the global text
    local_weight: float = 0.5  # the local branch's weight, when local == "rsm"
    local_temperature: float = 0.05
    use_reliability: bool = True
    reliability_threshold: float = 0.5
    seed: int = 0
    eval_every_epochs: int = 1
    device: str = "auto"
    amp: bool = True  # bf16 autocast on CUDA only
    max_grad_norm: float = 5.0  # 0: no clipping (the norm is still logged)
    log_every_steps: int = 50  # one plain line + a steps.csv row every N optimizer steps (0: off)
    tensorboard: bool = False  # also write TensorBoard event files to RUN_DIR/tensorboard/
