"""Dataset importer CLI: a dataset's own annotation file → `manifest.parquet` + rejects + a summary.

Consumes `DIR/<annotation file>` of CUHK-PEDES, ICFG-PEDES, RSTPReid or P-VLG (images under `DIR/imgs/`);
produces one manifest row per (image, caption) with `storage.schemas.MANIFEST_SCHEMA` (schema version,
absolute root, format and source file in the Parquet metadata), a rejects Parquet file with one row per
(image, caption) that was not imported and why, and a validation summary (stdout table, optional JSON).

    python -m storage.manifest --format cuhk-pedes --root DIR --out manifest.parquet \
        [--rejects PATH] [--max-caption-chars 4000] [--summary-json PATH]

Per-row problems never stop the import; structural ones (annotation file missing or not a JSON list,
nothing usable) exit with status 2 and a one-line message naming the file.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from storage.importers import (
    FORMATS,
    ManifestError,
    RecordImporter,
    Reject,
    format_hints,
    load_annotations,
    printable,
)
from storage.schemas import MANIFEST_SCHEMA, check_version, with_version

DEFAULT_MAX_CAPTION_CHARS = 4000
SHOWN_REJECTS = 10
_SPLIT_ORDER = ("train", "val", "test")

REJECTS_SCHEMA = pa.schema(
    [
        pa.field("record_index", pa.int64(), nullable=False),  # position in the annotation list
        pa.field("caption_index", pa.int32()),  # null when the whole record was unusable
        pa.field("image_path", pa.string()),  # "imgs/..." when the path was safe, else null
        pa.field("reason", pa.string(), nullable=False),  # a storage.importers.RejectReason
        pa.field("message", pa.string(), nullable=False),
    ]
)


@dataclass
class SplitCounts:
    ids: int
    images: int
    captions: int


@dataclass
class ImportSummary:
    """What an import produced: row counts per split and rejected rows per reason."""

    format: str
    root: str
    source: str
    out: str
    rejects_path: str
    rows: int
    per_split: dict[str, SplitCounts]
    rejected: dict[str, int]  # reason -> rejected (image, caption) rows
    first_rejects: list[Reject] = field(default_factory=list)
    hints: list[str] = field(default_factory=list)  # other formats this dataset may be (format_hints)

    @property
    def reject_fraction(self) -> float:
        n = sum(self.rejected.values())
        return n / (n + self.rows) if n + self.rows else 0.0

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["first_rejects"] = [{**asdict(r), "reason": str(r.reason)} for r in self.first_rejects]
        return data

    def format_table(self) -> str:
        lines = [f"{self.format}: {self.rows} manifest rows from {self.source} -> {self.out}", ""]
        lines.append(f"{'split':<8}{'ids':>8}{'images':>10}{'captions':>10}")
        for split, counts in self.per_split.items():
            lines.append(f"{split:<8}{counts.ids:>8}{counts.images:>10}{counts.captions:>10}")
        n_rejected = sum(self.rejected.values())
        lines += ["", f"rejected rows: {n_rejected}" + (f" (see {self.rejects_path})" if n_rejected else "")]
        for reason, count in sorted(self.rejected.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"  {reason:<18}{count:>8}")
        if self.first_rejects:
            lines.append(f"first {len(self.first_rejects)} rejects:")
            for r in self.first_rejects:
                # each reject once, with where it is: the record and (for one caption) the caption index
                where = f"record {r.record_index}" + (
                    f", caption {r.caption_index}" if r.caption_index is not None else ""
                )
                message = re.sub(r"^record \d+(, caption \d+)?:\s*", "", r.message)
                lines.append(f"  [{r.reason}] {where}: {message}")
        lines += [f"hint: {h}" for h in self.hints]
        return "\n".join(lines)


DEFAULT_MAX_REJECT_FRACTION = 0.1


def default_rejects_path(out: Path) -> Path:
    """`<out stem>.rejects.parquet` beside the manifest."""
    return out.with_name(f"{out.stem}.rejects.parquet")


def read_import_rejects(manifest_path: str | Path) -> dict[str, Any] | None:
    """The import's rejects of a manifest, from its rejects file when it is there (the default path beside
    the manifest): {"path", "rows", "by_reason": {reason: rows}, "examples": [first 5 rows]}; None when
    there is no such file (a manifest written elsewhere, or with --rejects PATH)."""
    path = default_rejects_path(Path(manifest_path))
    if not path.is_file():
        return None
    table = pq.read_table(path)
    reasons = table["reason"].to_pylist()
    by_reason: dict[str, int] = {}
    for r in reasons:
        by_reason[r] = by_reason.get(r, 0) + 1
    return {
        "path": str(path),
        "rows": table.num_rows,
        "by_reason": dict(sorted(by_reason.items(), key=lambda kv: (-kv[1], kv[0]))),
        "examples": table.slice(0, 5).to_pylist(),
    }


def import_dataset(
    fmt: str,
    root: str | Path,
    out: str | Path,
    *,
    rejects_path: str | Path | None = None,
    max_caption_chars: int = DEFAULT_MAX_CAPTION_CHARS,
) -> ImportSummary:
    """Import dataset `fmt` under `root` into the manifest `out`; raise ManifestError on structural failure."""
    if fmt not in FORMATS:
        raise ManifestError(f"unknown format {fmt!r} (expected one of {', '.join(FORMATS)})")
    if max_caption_chars < 1:
        raise ManifestError(f"max_caption_chars must be >= 1, got {max_caption_chars}")
    dataset = FORMATS[fmt]
    root = Path(root).resolve()
    if not root.is_dir():
        raise ManifestError(f"{root}: dataset root is not a directory")
    source = root / dataset.annotation_file
    out = Path(out)
    rejects_path = Path(rejects_path) if rejects_path is not None else default_rejects_path(out)

    try:
        records = load_annotations(source)
    except ManifestError as exc:
        hints = format_hints(root, fmt)
        raise ManifestError(str(exc) + "".join(f"; {h}" for h in hints)) from exc
    importer = RecordImporter(dataset, root, max_caption_chars)
    for index, record in enumerate(records):
        importer.add(index, record)

    rejected = dict(sorted(Counter(str(r.reason) for r in importer.rejects).items()))
    _write_parquet(_rejects_table(importer.rejects, fmt, source), rejects_path)
    if not importer.rows:
        reasons = ", ".join(f"{k} {v}" for k, v in rejected.items()) or "the list is empty"
        example = f"; e.g. {importer.rejects[0].message}" if importer.rejects else ""
        hints = "".join(f"; {h}" for h in format_hints(root, fmt, records))
        raise ManifestError(
            f"{source}: zero usable rows ({reasons}){example}; rejects in {rejects_path}{hints}"
        )

    schema = with_version("manifest", {"rsm.root": str(root), "rsm.format": fmt, "rsm.source": str(source)})
    _write_parquet(pa.Table.from_pylist(importer.rows, schema=schema), out)
    return ImportSummary(
        format=fmt,
        root=str(root),
        source=str(source),
        out=str(out),
        rejects_path=str(rejects_path),
        rows=len(importer.rows),
        per_split=_per_split(importer.rows),
        rejected=rejected,
        first_rejects=importer.rejects[:SHOWN_REJECTS],
        hints=format_hints(root, fmt, records) if importer.rejects else [],
    )


def read_manifest(path: str | Path) -> tuple[pa.Table, dict[str, str]]:
    """Read a manifest; return it with its metadata (root, format, source, schema_version).

    Raises ValueError naming `path` when it is not a manifest of the supported schema version.
    """
    table = pq.read_table(path)
    check_version("manifest", table.schema, str(path))
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    missing = [c for c in MANIFEST_SCHEMA.names if c not in table.column_names]
    if missing or "rsm.root" not in meta:
        raise ValueError(f"{path}: not a complete manifest (missing columns {missing} or rsm.root metadata)")
    return table, {
        "root": meta["rsm.root"],
        "format": meta.get("rsm.format", ""),
        "source": meta.get("rsm.source", ""),
        "schema_version": meta["rsm.schema_version"],
    }


def _per_split(rows: list[dict[str, Any]]) -> dict[str, SplitCounts]:
    ids: dict[str, set[int]] = {}
    images: dict[str, set[str]] = {}
    captions: Counter[str] = Counter()
    for row in rows:
        ids.setdefault(row["split"], set()).add(row["person_id"])
        images.setdefault(row["split"], set()).add(row["image_path"])
        captions[row["split"]] += 1
    order = sorted(captions, key=lambda s: (_SPLIT_ORDER.index(s) if s in _SPLIT_ORDER else 99, s))
    return {s: SplitCounts(len(ids[s]), len(images[s]), captions[s]) for s in order}


def _rejects_table(rejects: list[Reject], fmt: str, source: Path) -> pa.Table:
    rows = [
        {
            "record_index": r.record_index,
            "caption_index": r.caption_index,
            "image_path": r.image_path,
            "reason": str(r.reason),
            "message": printable(r.message, limit=1000),  # messages may quote undecodable input
        }
        for r in rejects
    ]
    schema = REJECTS_SCHEMA.with_metadata({"rsm.format": fmt, "rsm.source": str(source)})
    return pa.Table.from_pylist(rows, schema=schema)


def _write_parquet(table: pa.Table, path: Path) -> None:
    """Write via a temporary sibling and rename, so a reader never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ManifestError(f"{path}: cannot write: {exc}") from exc


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m storage.manifest", description=__doc__.split("\n\n")[0])
    parser.add_argument("--format", required=True, choices=sorted(FORMATS), help="dataset annotation format")
    parser.add_argument("--root", required=True, type=Path, help="dataset root (annotation file + imgs/)")
    parser.add_argument("--out", required=True, type=Path, help="manifest Parquet file to write")
    parser.add_argument(
        "--rejects", type=Path, help="rejects Parquet file (default: <out stem>.rejects.parquet)"
    )
    parser.add_argument("--max-caption-chars", type=int, default=DEFAULT_MAX_CAPTION_CHARS)
    parser.add_argument("--summary-json", type=Path, help="also write the validation summary as JSON")
    parser.add_argument(
        "--max-reject-fraction",
        type=float,
        default=DEFAULT_MAX_REJECT_FRACTION,
        help="exit 1 when more than this fraction of (image, caption) rows is rejected (default %(default)s)",
    )
    parser.add_argument("--allow-rejects", action="store_true", help="exit 0 whatever fraction is rejected")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = import_dataset(
            args.format,
            args.root,
            args.out,
            rejects_path=args.rejects,
            max_caption_chars=args.max_caption_chars,
        )
        if args.summary_json is not None:
            args.summary_json.parent.mkdir(parents=True, exist_ok=True)
            args.summary_json.write_text(json.dumps(summary.to_json(), indent=2) + "\n", encoding="utf-8")
    except ManifestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    print(summary.format_table())
    if summary.reject_fraction > args.max_reject_fraction and not args.allow_rejects:
        print(
            f"error: {summary.reject_fraction:.0%} of the rows were rejected (more than "
            f"--max-reject-fraction {args.max_reject_fraction:g}); the manifest holds the {summary.rows} accepted "
            "rows. Fix the data or the --format (see the reasons above), or pass --allow-rejects to accept them",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
