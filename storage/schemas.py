"""Arrow schemas shared by every stage: the manifest, the pairs shards and the status shards.

Consumes nothing; produces `pyarrow.Schema` objects plus the metadata keys that carry their
versions. Every Parquet file the project writes carries `rsm.schema` (which table) and
`rsm.schema_version` in its key-value metadata, so a reader can refuse a file it does not understand.
"""

from __future__ import annotations

from enum import StrEnum

import pyarrow as pa

SCHEMA_KEY = b"rsm.schema"
SCHEMA_VERSION_KEY = b"rsm.schema_version"

MANIFEST_VERSION = "1"
PAIRS_VERSION = "3"  # 3: garment_logit
STATUS_VERSION = "1"

# Body-part vocabulary shared by the synthetic benchmark, the region proposers and the lexicon.
BODY_PARTS: tuple[str, ...] = ("head", "upper", "lower", "feet", "bag")

# One row per (image, caption). `gt_regions` / `gt_links` are JSON strings, present only for
# formats with ground truth (pvlg): see README "The pvlg format".
MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),  # "{image_path}#{caption_index}"
        pa.field("image_id", pa.string(), nullable=False),  # == image_path (posix, relative to root)
        pa.field("person_id", pa.int64(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("image_path", pa.string(), nullable=False),
        pa.field("caption_index", pa.int32(), nullable=False),
        pa.field("caption", pa.string(), nullable=False),
        pa.field("gt_regions", pa.string()),  # JSON list of regions of the image, or null
        pa.field("gt_links", pa.string()),  # JSON list of sentence links of this caption, or null
    ]
)

# One row per scored (region, text unit) pair: the best region of every unit, plus whatever
# else the matcher keeps for auditing. Keys (sample_id, sentence_index, region_id) are unique.
PAIRS_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("person_id", pa.int64(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("caption_index", pa.int32(), nullable=False),
        pa.field("sentence_index", pa.int32(), nullable=False),  # index of the text unit in the caption
        pa.field("sentence", pa.string(), nullable=False),
        pa.field("char_start", pa.int32(), nullable=False),  # span of the unit in the caption, [start, end)
        pa.field("char_end", pa.int32(), nullable=False),
        pa.field("part_tags", pa.list_(pa.string()), nullable=False),  # lexical body-part tags of the unit
        pa.field("region_id", pa.int32(), nullable=False),  # index of the region within its image
        pa.field("region_source", pa.string(), nullable=False),  # prior | sam-prompted | sam-auto
        pa.field("region_label", pa.string()),  # body-part label of the region, if any
        pa.field("bbox_xyxy", pa.list_(pa.float32(), 4), nullable=False),  # pixels, after EXIF transpose
        pa.field("mask_rle", pa.string()),  # COCO RLE as JSON {"size": [h, w], "counts": str}, or null
        pa.field("region_quality", pa.float32(), nullable=False),
        pa.field("clip_cosine", pa.float32(), nullable=False),
        pa.field("softmax_prob", pa.float32(), nullable=False),  # over the image's regions, low temperature
        pa.field("margin", pa.float32(), nullable=False),  # cosine minus the runner-up region's cosine
        pa.field("mutual_best", pa.bool_(), nullable=False),
        pa.field("part_agreement", pa.float32(), nullable=False),  # 1 agree, 0 disagree, 0.5 unknown
        # Content against the model's reference bank (miners.bank), null when the model has no bank:
        # z-score of the pair's cosine among the text vs other people's same-part regions, and among
        # the region vs other people's same-part sentences.
        pa.field("bank_region_z", pa.float32()),
        pa.field("bank_sentence_z", pa.float32()),
        # Colour probe (miners.attribute_probe): log-ratio of the written colour against the other basic
        # colours for the region; 0 when the unit names no colour, null when the probe is off.
        pa.field("colour_logit", pa.float32()),
        # Garment probe (the same): each garment noun against the other garment kinds of its part.
        pa.field("garment_logit", pa.float32()),
        pa.field("reliability", pa.float32(), nullable=False),  # calibrated P(pair correct), in [0, 1]
        pa.field("kept", pa.bool_(), nullable=False),
        pa.field("clip_fingerprint", pa.string(), nullable=False),
        # the miner's fingerprint: RSMConfig hash + calibrator id (not the run plan's run_config_sha256)
        pa.field("config_fingerprint", pa.string(), nullable=False),
    ]
)

STATUS_OK = "ok"


class ErrorKind(StrEnum):
    """The status vocabulary: every status-shard row is "ok" (`STATUS_OK`) or one of these kinds."""

    MISSING = "missing_image"
    NOT_A_REGULAR_FILE = "not_a_regular_file"  # a directory, FIFO, socket or device where an image should be
    UNSAFE_PATH = "unsafe_path"  # resolves outside the dataset root (e.g. swapped for a symlink after import)
    UNREADABLE = "unreadable_image"  # not an image / unknown format / permission
    CORRUPT = "corrupt_image"  # header fine, pixel data broken or truncated
    BOMB = "decompression_bomb"
    TOO_SMALL = "image_too_small"
    NO_REGIONS = "no_regions"
    NO_SENTENCES = "no_sentences"
    INTERNAL = "internal_error"


# Exactly one row per manifest row. status is STATUS_OK or an ErrorKind value.
STATUS_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error_message", pa.string()),
        pa.field("n_regions", pa.int32(), nullable=False),
        pa.field("n_sentences", pa.int32(), nullable=False),
        pa.field("n_pairs", pa.int32(), nullable=False),
        pa.field("n_kept", pa.int32(), nullable=False),
    ]
)

_VERSIONS = {"manifest": MANIFEST_VERSION, "pairs": PAIRS_VERSION, "status": STATUS_VERSION}
_SCHEMAS = {"manifest": MANIFEST_SCHEMA, "pairs": PAIRS_SCHEMA, "status": STATUS_SCHEMA}


def with_version(name: str, extra: dict[str, str] | None = None) -> pa.Schema:
    """The schema `name` with its version (and any `extra` string metadata) attached."""
    meta = {SCHEMA_KEY: name.encode(), SCHEMA_VERSION_KEY: _VERSIONS[name].encode()}
    for key, value in (extra or {}).items():
        meta[key.encode()] = value.encode()
    return _SCHEMAS[name].with_metadata(meta)


def check_version(name: str, schema: pa.Schema, source: str) -> None:
    """Raise ValueError naming `source` if `schema` is not version-compatible with table `name`."""
    meta = schema.metadata or {}
    got_name = meta.get(SCHEMA_KEY, b"").decode()
    got_version = meta.get(SCHEMA_VERSION_KEY, b"").decode()
    if got_name != name or got_version != _VERSIONS[name]:
        raise ValueError(
            f"{source}: expected a '{name}' table of schema version {_VERSIONS[name]}, "
            f"found schema={got_name or 'none'!r} version={got_version or 'none'!r}"
        )
