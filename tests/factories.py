"""Shared test factories: pairs rows, status rows and run configs in the shapes the project writes.

Every PAIRS_SCHEMA column gets a neutral default here, once; a test passes only the values it is about.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from miners.rsm import RSMConfig
from miners.run_config import RunConfig

SAMPLE_KEYS = ("sample_id", "image_id", "person_id", "split", "caption_index")

PAIR_DEFAULTS: dict[str, Any] = {
    "sentence_index": 0,
    "sentence": "a unit",
    "char_start": 0,
    "char_end": 6,
    "part_tags": [],
    "region_id": 0,
    "region_source": "prior",
    "region_label": "head",
    "bbox_xyxy": [0.0, 0.0, 10.0, 10.0],
    "mask_rle": None,
    "region_quality": 1.0,
    "clip_cosine": 0.2,
    "softmax_prob": 0.5,
    "margin": 0.0,
    "mutual_best": True,
    "part_agreement": 0.5,
    "bank_region_z": None,
    "bank_sentence_z": None,
    "colour_logit": None,
    "garment_logit": None,
    "reliability": 0.5,
    "kept": True,
    "clip_fingerprint": "clip-0",
    "config_fingerprint": "cfg-0",
}


def pair_row(sample: Mapping[str, Any], **values: Any) -> dict[str, Any]:
    """A PAIRS_SCHEMA row for manifest row `sample` (its keys are copied); `values` override defaults."""
    unknown = set(values) - set(PAIR_DEFAULTS) - set(SAMPLE_KEYS)
    if unknown:
        raise KeyError(f"not pairs columns: {sorted(unknown)}")
    return {**{k: sample[k] for k in SAMPLE_KEYS}, **PAIR_DEFAULTS, **values}


def status_row(
    sample: Mapping[str, Any], status: str = "ok", message: str | None = None, **counts: int
) -> dict:
    """A STATUS_SCHEMA row for manifest row `sample`; counts: n_regions, n_sentences, n_pairs, n_kept."""
    row = {"sample_id": sample["sample_id"], "image_id": sample["image_id"], "status": status}
    row["error_message"] = message
    return row | {k: counts.get(k, 0) for k in ("n_regions", "n_sentences", "n_pairs", "n_kept")}


def run_config(clip_model: str = "models/none", **rsm: Any) -> dict[str, Any]:
    """A run config in the stored `_run.json` shape (miners.run_config), without real fingerprints."""
    return RunConfig(rsm=RSMConfig(clip_model=clip_model, **rsm), fingerprints={}).to_dict()


# Parameters whose gradient is identically zero in exact arithmetic: an attention key's bias adds the same
# value to every key score of a query, which the softmax ignores. Their gradients are float noise (~1e-12),
# which Adam normalises into updates of about +-lr whose sign is that noise; two runs whose arithmetic differs
# in any last bit (a resumed process, another process count, MKL's alignment-dependent kernels) move them
# differently. Exact-resume and equivalence tests compare every other parameter.
NOISE_ONLY_PARAMETERS = ("k_proj.bias",)


def noise_only(name: str) -> bool:
    return name.endswith(NOISE_ONLY_PARAMETERS)
