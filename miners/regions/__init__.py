"""Region proposers behind one interface, chosen by name (see `build_proposer`).

Consumes H x W x 3 uint8 RGB images; produces `Regions` (row-aligned boxes, optional masks, body-part
labels, qualities). "prior" needs no weights; "sam-prompted" and "sam-auto" load a segment-anything
checkpoint (torch and segment_anything are imported only when one is built).
"""

from miners.regions.base import REGION_SOURCES, RegionProposer, Regions, top_k_by_quality
from miners.regions.prior import (
    DEFAULT_ZONES,
    PersonExtent,
    PriorConfig,
    PriorProposer,
    ZoneSpec,
    estimate_person_extent,
    label_masks_by_zones,
    person_extent_xyxy,
    prior_zones,
)
from miners.regions.registry import PROPOSER_NAMES, build_proposer, make_config
from miners.regions.sam import (
    SamAutoConfig,
    SamAutoProposer,
    SamPromptedConfig,
    SamPromptedProposer,
    build_tiny_sam,
    load_sam,
)

__all__ = [
    "DEFAULT_ZONES",
    "PROPOSER_NAMES",
    "REGION_SOURCES",
    "PersonExtent",
    "PriorConfig",
    "PriorProposer",
    "RegionProposer",
    "Regions",
    "SamAutoConfig",
    "SamAutoProposer",
    "SamPromptedConfig",
    "SamPromptedProposer",
    "ZoneSpec",
    "build_proposer",
    "build_tiny_sam",
    "estimate_person_extent",
    "label_masks_by_zones",
    "load_sam",
    "make_config",
    "person_extent_xyxy",
    "prior_zones",
    "top_k_by_quality",
]
