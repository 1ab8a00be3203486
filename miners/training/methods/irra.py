"""`--method irra`: IRRA (Jiang & Ye, CVPR 2023) — SDM (similarity distribution matching, fixed
temperature 0.02) + IRR (implicit relation reasoning: MLM through a cross-attention + 4-layer fusion over
the image tokens) + ID (one classifier shared by both modalities), all weighted 1, as IRRA's released code
(../shared/METHODS.md section 1, verified from anosorae/IRRA). With `--preset irra-b16`, IRRA's optimizer,
schedule, augmentation and truncated queries too; `--local rsm` adds ROGLE's local branch.

The losses are the shared pure functions (miners.training.losses) and heads (miners.training.heads); the
computation is ROGLE's global part with IRRA's settings, so this module only names those settings.
"""

from __future__ import annotations

from miners.training.methods.rogle import RogleMethod


class IrraMethod(RogleMethod):
    name = "irra"
    defaults = {
        "local": "none",
        "global_loss": "sdm",
        "sdm_temperature": 0.02,
        "id_loss_weight": 1.0,
        "mlm_weight": 1.0,
    }
