"""Region proposers chosen by name: "prior", "sam-prompted", "sam-auto".

Consumes a proposer name, an optional SAM checkpoint path and config overrides; produces a ready
`RegionProposer` (models loaded once, here). Overrides name fields of the proposer's config dataclass
(`PriorConfig`, `SamPromptedConfig`, `SamAutoConfig`); anything else is refused with the valid names.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from miners.regions.base import RegionProposer
from miners.regions.prior import PriorConfig, PriorProposer

PROPOSER_NAMES: tuple[str, ...] = ("prior", "sam-prompted", "sam-auto")


def _config_classes() -> dict[str, type]:
    # sam.py imports torch lazily, so importing its config classes is cheap.
    from miners.regions.sam import SamAutoConfig, SamPromptedConfig

    return {"prior": PriorConfig, "sam-prompted": SamPromptedConfig, "sam-auto": SamAutoConfig}


def make_config(name: str, **values: Any):
    """The config dataclass of proposer `name` with `values` overriding its defaults."""
    config_cls = _config_classes()[name]
    valid = [f.name for f in dataclasses.fields(config_cls)]
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for region proposer {name!r}; valid: {', '.join(valid)}"
        )
    return config_cls(**values)


def build_proposer(
    name: str,
    *,
    sam_checkpoint: str | None = None,
    sam_model_type: str = "vit_b",
    device: str | None = None,
    max_regions: int = 8,
    **overrides: Any,
) -> RegionProposer:
    """Build the proposer `name`; SAM ones load `sam_checkpoint` (architecture `sam_model_type`, or "tiny").

    device: torch device for SAM (default: cuda when available, else cpu); ignored by "prior".
    max_regions: at most this many regions per image.
    """
    if name not in PROPOSER_NAMES:
        raise ValueError(f"unknown region proposer {name!r}; valid names: {', '.join(PROPOSER_NAMES)}")
    if max_regions < 1:
        raise ValueError(f"max_regions must be >= 1, got {max_regions}")
    config = make_config(name, max_regions=max_regions, **overrides)
    if name == "prior":
        if sam_checkpoint is not None:
            raise ValueError(
                f"the 'prior' proposer uses no SAM checkpoint (got {sam_checkpoint}); "
                "choose 'sam-prompted' or 'sam-auto' to use it"
            )
        return PriorProposer(config)

    from miners.regions.sam import SamAutoProposer, SamPromptedProposer, load_sam

    if sam_checkpoint is None:
        raise ValueError(f"region proposer {name!r} needs sam_checkpoint (a segment-anything .pth file)")
    model = load_sam(sam_checkpoint, sam_model_type, device)
    if name == "sam-prompted":
        return SamPromptedProposer(model, config)
    return SamAutoProposer(model, config)
