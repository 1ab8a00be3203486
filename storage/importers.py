"""Format-specific readers: dataset annotation records → validated manifest rows plus rejects.

Consumes the parsed annotation list of one dataset (CUHK-PEDES `reid_raw.json`, ICFG-PEDES
`ICFG-PEDES.json`, RSTPReid `data_captions.json`, P-VLG `pvlg.json`) and the dataset root; produces
manifest rows (dicts with the `storage.schemas.MANIFEST_SCHEMA` columns) and `Reject`s, one per
(image, caption) that did not make it, so that rows in = rows written + rows rejected.

Only path safety, file existence and file type are checked here: whether an image actually decodes is
checked later, at mining time (miners' safe image loader), because opening 40k images here would make the
import slow and the loader must defend itself against bad files anyway. Path checks open no file and look
at nothing outside `DIR/imgs/`: a path is judged by its spelling first, then followed one component at a
time with `lstat`/`readlink`, and rejected as soon as a step would leave `imgs/` (so an annotation file
cannot make the importer probe the rest of the machine, and a FIFO is never opened, which would block).
"""

from __future__ import annotations

import json
import math
import os
import posixpath
import re
import stat
import unicodedata
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

INT64_MAX = 2**63 - 1
# Unicode category Cc minus the ASCII whitespace controls (\t \n \v \f \r), which are legitimate in captions.
_BAD_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x9f]")
_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:")
# Linux's NAME_MAX and PATH_MAX (4096 bytes counting the terminating NUL): longer names cannot be opened, so
# they are rejected by their spelling instead of failing later with ENAMETOOLONG as if the file were missing.
MAX_NAME_BYTES = 255
MAX_PATH_BYTES = 4095
# Linux's MAXSYMLINKS: a longer chain of symlinks is a loop (or one built to keep the importer busy).
MAX_SYMLINKS = 40
# What a non-regular file is, for messages (checked in this order on its stat mode).
_FILE_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


class ManifestError(Exception):
    """A structural failure of the whole import (missing/invalid annotation file, no usable rows)."""


class RejectReason(StrEnum):
    MISSING_IMAGE = "missing_image"
    NOT_A_REGULAR_FILE = "not_a_regular_file"  # a directory, FIFO, device or socket where an image should be
    UNSAFE_PATH = "unsafe_path"
    EMPTY_CAPTION = "empty_caption"
    BAD_CAPTION_TYPE = "bad_caption_type"  # a caption that is not a JSON string (number, list, object, null)
    BAD_TEXT = "bad_text"
    CAPTION_TOO_LONG = "caption_too_long"
    DUPLICATE = "duplicate"
    BAD_RECORD = "bad_record"
    BAD_GROUND_TRUTH = "bad_ground_truth"


@dataclass(frozen=True)
class DatasetFormat:
    """How one public dataset spells its annotation file."""

    name: str
    annotation_file: str
    path_field: str  # the record key holding the image path, relative to DIR/imgs/
    splits: tuple[str, ...]
    min_person_id: int  # CUHK-PEDES and P-VLG ids are 1-based
    has_ground_truth: bool = False


FORMATS: dict[str, DatasetFormat] = {
    "cuhk-pedes": DatasetFormat("cuhk-pedes", "reid_raw.json", "file_path", ("train", "val", "test"), 1),
    "icfg-pedes": DatasetFormat("icfg-pedes", "ICFG-PEDES.json", "file_path", ("train", "test"), 0),
    "rstpreid": DatasetFormat("rstpreid", "data_captions.json", "img_path", ("train", "val", "test"), 0),
    "pvlg": DatasetFormat(
        "pvlg", "pvlg.json", "file_path", ("train", "val", "test"), 1, has_ground_truth=True
    ),
}


def format_hints(root: Path, fmt: str, records: list[Any] | None = None) -> list[str]:
    """Why `root` may be another supported format: other formats' annotation files lying under `root`,
    and, given records, a format whose image-path field and split names the records use where `fmt`'s
    do not. Each hint ends in the flag to try."""
    hints = []
    for other in FORMATS.values():
        if other.name != fmt and (root / other.annotation_file).is_file():
            hints.append(
                f"{other.annotation_file} is here: this looks like {other.name}, try --format {other.name}"
            )
    dicts = [r for r in (records or [])[:200] if isinstance(r, dict)]
    if dicts:
        current = FORMATS[fmt]

        def fit(f: DatasetFormat) -> float:
            has_path = sum(f.path_field in r for r in dicts) / len(dicts)
            splits = [r.get("split") for r in dicts if "split" in r]
            split_ok = sum(s in f.splits for s in splits) / len(splits) if splits else 1.0
            return has_path * split_ok

        best = max((f for f in FORMATS.values() if f.name != fmt), key=fit)
        if fit(best) > fit(current) and fit(best) > 0.5:
            keys = sorted({k for r in dicts for k in r})[:8]
            shape = (
                f"the records look like {best.name} (fields {', '.join(keys)}; {fmt} reads the image path "
                f"from {current.path_field!r} and splits {'/'.join(current.splits)})"
            )
            if (root / best.annotation_file).is_file():
                hints.append(f"{shape}: try --format {best.name}")
            else:  # --format best would only ask for its own file name: say both ways out
                hints.append(
                    f"{shape}: if they are {fmt} records, rename their fields to {fmt}'s; if the file is "
                    f"{best.name}'s, rename it to {best.annotation_file} and try --format {best.name}"
                )
    return hints


@dataclass(frozen=True)
class Reject:
    """One (image, caption) row that was not imported; caption_index is None for whole-record rejects."""

    record_index: int
    caption_index: int | None
    image_path: str | None
    reason: RejectReason
    message: str


def printable(value: object, limit: int = 120) -> str:
    """A UTF-8-safe, single-line rendering of untrusted text for messages (escapes surrogates/controls)."""
    text = value if isinstance(value, str) else repr(value)
    text = text[: limit + 1].encode("utf-8", "backslashreplace").decode("utf-8")
    text = "".join(
        ch if ch == " " or unicodedata.category(ch)[0] not in "CZ" else repr(ch)[1:-1] for ch in text
    )
    return text if len(text) <= limit else text[: limit - 1] + "…"


def quoted(value: object) -> str:
    """`printable` with strings in quotes, so '10' (a string) reads differently from 10 (a number)."""
    return f"'{printable(value)}'" if isinstance(value, str) else printable(value)


def load_annotations(path: Path) -> list[Any]:
    """Parse an annotation file; raise ManifestError naming it when it is missing, unreadable or not a list."""
    if not path.is_file():
        raise ManifestError(f"{path}: annotation file not found")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: cannot read annotation file: {exc}") from exc
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise ManifestError(f"{path}: invalid JSON: {exc}") from exc
    if not isinstance(data, list):
        raise ManifestError(
            f"{path}: expected a JSON list of records at the top level, got {type(data).__name__}"
        )
    return data


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)) and math.isfinite(value)


def _json_type(value: object) -> str:
    """The JSON name of a parsed value's type, as the dataset's author wrote it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return {list: "list", dict: "object"}.get(type(value), type(value).__name__)


def _file_kind(mode: int) -> str:
    """'a directory', 'a FIFO (named pipe)', ... for the stat mode of a file that is not a regular one."""
    return next(
        (kind for is_kind, kind in _FILE_KINDS if is_kind(mode)), f"of unknown type {stat.filemode(mode)}"
    )


def _text_problem(text: str) -> str | None:
    """Why `text` cannot be stored as a caption (lone surrogate, control character), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"undecodable text (lone surrogate U+{ord(text[exc.start]):04X} at char {exc.start})"
    bad = _BAD_CONTROL.search(text)
    if bad:
        return f"control character U+{ord(bad.group()):04X} at char {bad.start()}"
    return None


class _RowProblem(Exception):
    """Raised inside the importer to turn one record or caption into a reject."""

    def __init__(self, reason: RejectReason, message: str, image_path: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.image_path = image_path  # set once the path is known to be safe


class _PathEscape(Exception):
    """Following an image path would leave imgs/ (or loops through symlinks); the message says where."""


class RecordImporter:
    """Validates records one at a time, accumulating manifest rows and rejects in annotation order."""

    def __init__(self, fmt: DatasetFormat, root: Path, max_caption_chars: int) -> None:
        self.fmt = fmt
        self.root = root
        self.imgs_root = (root / "imgs").resolve()
        self._imgs_text = str(self.imgs_root)
        self._imgs_prefix = self._imgs_text.rstrip("/") + "/"  # what every path inside imgs/ starts with
        self.max_caption_chars = max_caption_chars
        self.rows: list[dict[str, Any]] = []
        self.rejects: list[Reject] = []
        self._seen_images: dict[str, int] = {}  # image_path -> record index that imported it
        self._seen_captions: set[tuple[str, str]] = set()
        self._real_dirs: dict[str, str] = {}  # directory relative to imgs/ -> its real path inside imgs/

    # Whole records
    def add(self, index: int, record: Any) -> None:
        """Import one annotation record: every caption of it becomes a row or a reject."""
        captions = record.get("captions") if isinstance(record, dict) else None
        try:
            image_path, gt_regions = self._check_record(index, record)
        except _RowProblem as problem:
            # A record-level problem rejects each caption row it would have produced, so none vanish.
            n_captions = len(captions) if isinstance(captions, list) else 0
            for caption_index in range(n_captions) if n_captions else [None]:
                self.rejects.append(
                    Reject(index, caption_index, problem.image_path, problem.reason, problem.message)
                )
            return
        for caption_index, raw_caption in enumerate(captions):
            try:
                row = self._caption_row(record, image_path, caption_index, raw_caption, gt_regions)
            except _RowProblem as problem:
                self.rejects.append(Reject(index, caption_index, image_path, problem.reason, problem.message))
                continue
            self.rows.append(row)
            # Only an accepted caption takes the image: a record whose captions were all rejected must not
            # turn a later, valid record of the same image into a "duplicate" (and leave zero rows).
            self._seen_images.setdefault(image_path, index)

    def _check_record(self, index: int, record: Any) -> tuple[str, str | None]:
        """(image_path, gt_regions JSON or None) of a usable record; raises _RowProblem otherwise."""
        if not isinstance(record, dict):
            raise _RowProblem(
                RejectReason.BAD_RECORD, f"record {index}: expected an object, got {type(record).__name__}"
            )
        # Name the image in messages even when it sits under the other format's field name.
        shown = next((record[k] for k in (self.fmt.path_field, "file_path", "img_path") if k in record), None)
        label = f"record {index} ({printable(shown)})" if shown is not None else f"record {index}"
        problem = self._record_problem(record)
        if problem:
            raise _RowProblem(RejectReason.BAD_RECORD, f"{label}: {problem}")
        problem = self._path_problem(record[self.fmt.path_field])
        if problem:
            raise _RowProblem(RejectReason.UNSAFE_PATH, f"{label}: {problem}")
        rel = posixpath.normpath(record[self.fmt.path_field])
        image_path = f"imgs/{rel}"
        full = self.root / image_path  # for messages only: every file access goes through _locate
        try:
            mode = self._locate(rel)
        except _PathEscape as exc:
            raise _RowProblem(RejectReason.UNSAFE_PATH, f"{label}: {exc}") from None
        except (FileNotFoundError, NotADirectoryError):  # NotADirectory: a file used as a folder on the way
            raise _RowProblem(
                RejectReason.MISSING_IMAGE, f"{image_path}: image file does not exist ({full})", image_path
            ) from None
        except OSError as exc:  # permission denied on a folder, say: the image cannot be reached either
            why = f"cannot look up image file ({full}): {exc.strerror or exc}"
            raise _RowProblem(RejectReason.MISSING_IMAGE, f"{image_path}: {why}", image_path) from None
        if not stat.S_ISREG(mode):
            why = f"is {_file_kind(mode)}, not a regular image file ({full})"
            raise _RowProblem(RejectReason.NOT_A_REGULAR_FILE, f"{image_path}: {why}", image_path)
        if image_path in self._seen_images:
            first = self._seen_images[image_path]
            raise _RowProblem(
                RejectReason.DUPLICATE, f"{image_path}: image already imported by record {first}", image_path
            )
        if not self.fmt.has_ground_truth:
            return image_path, None
        problem = _regions_problem(record)
        if problem:
            raise _RowProblem(RejectReason.BAD_GROUND_TRUTH, f"{image_path}: {problem}", image_path)
        return image_path, _to_json(record["regions"], f"{image_path}: regions", image_path)

    def _record_problem(self, record: dict) -> str | None:
        missing = [key for key in ("id", self.fmt.path_field, "captions", "split") if key not in record]
        if missing:
            hint = ""
            if self.fmt.path_field == "img_path" and "file_path" in record:
                hint = " (RSTPReid names the image field 'img_path', not 'file_path')"
            return f"missing field(s) {', '.join(missing)}{hint}"
        person_id, split = record["id"], record["split"]
        if not _is_int(person_id) or not self.fmt.min_person_id <= person_id <= INT64_MAX:
            return f"person id {quoted(person_id)} is not an integer >= {self.fmt.min_person_id}"
        if not isinstance(record["captions"], list):
            return f"'captions' must be a list, got {type(record['captions']).__name__}"
        if not record["captions"]:
            return "'captions' is empty"
        if split not in self.fmt.splits:
            return f"unknown split {quoted(split)} (expected one of {', '.join(self.fmt.splits)})"
        return None

    # Paths
    def _path_problem(self, raw_path: Any) -> str | None:
        """Why `raw_path` (relative to imgs/) is unsafe by its spelling alone, or None; touches no file."""
        if not isinstance(raw_path, str):
            return f"image path must be a string, got {type(raw_path).__name__}"
        if not raw_path:
            return "image path is empty"
        text_problem = _text_problem(raw_path)  # NUL bytes included: the OS cannot open such a path
        if text_problem:
            return f"image path contains {text_problem.removeprefix('undecodable text ')}"
        if raw_path.startswith(("/", "\\")):
            return "absolute image path (must be relative to imgs/)"
        if _WINDOWS_DRIVE.match(raw_path):
            return (
                f"image path starts with the Windows drive {quoted(raw_path[:2])} (must be relative to imgs/)"
            )
        backslash_at = raw_path.find("\\")
        if backslash_at >= 0:
            # On POSIX a backslash is part of a file name, so a Windows-style path would name another file.
            return f"image path contains a backslash at char {backslash_at} (the separator is '/')"
        rel = posixpath.normpath(raw_path)
        if rel == ".":
            return f"image path {quoted(raw_path)} names the folder itself, not a file"
        if rel == ".." or rel.startswith("../"):
            return f"image path escapes {self.root / 'imgs'} via '..'"
        for part in rel.split("/"):
            n_bytes = len(part.encode("utf-8"))
            if n_bytes > MAX_NAME_BYTES:
                return f"image path component {quoted(part)} is {n_bytes} bytes long (limit {MAX_NAME_BYTES})"
        n_bytes = len(posixpath.join(self._imgs_text, rel).encode("utf-8"))
        if n_bytes > MAX_PATH_BYTES:
            return f"image path is {n_bytes} bytes long under {self.imgs_root} (limit {MAX_PATH_BYTES})"
        return None

    def _locate(self, rel: str) -> int:
        """The stat mode of the file that imgs/<rel> (a normalised, safely spelt path) names.

        Raises _PathEscape when reaching it leaves imgs/, OSError (FileNotFoundError, ...) when it is not there.
        """
        # Parents are followed once per directory and remembered, which keeps this to ~1 lstat per image.
        parent, name = posixpath.split(rel)
        base = self._real_dirs.get(parent)
        if base is None:
            base = self._walk(self._imgs_text, parent.split("/"))[0]
            if not self._is_inside(base) and base != self._imgs_text:
                # A parent folder that is a symlink up out of imgs/: walk the whole path so the message
                # names that symlink (the file may still lead back inside, e.g. via 'up/imgs/a.png').
                return self._final_mode(*self._walk(self._imgs_text, rel.split("/")))
            self._real_dirs[parent] = base
        return self._final_mode(*self._walk(base, [name]))

    def _final_mode(self, real: str, mode: int | None) -> int:
        """The mode `_walk` found, or S_IFDIR for imgs/ itself; an ancestor of imgs/ is outside it."""
        if mode is not None:
            return mode
        if real == self._imgs_text:  # e.g. a symlink to '.': imgs/ itself, a directory
            return stat.S_IFDIR
        raise _PathEscape(f"image path resolves to {real}, outside {self.imgs_root}")

    def _walk(self, real: str, parts: list[str]) -> tuple[str, int | None]:
        """Follow `parts` from the real folder `real` as the OS would: (real path reached, its stat mode).

        The mode is None for imgs/ itself and its ancestors, which are directories by construction and
        never looked at. Every lstat/readlink is of a path inside imgs/: a step to anywhere else raises
        _PathEscape before it is taken, naming the symlink that led there.
        """
        # A stack of (component, the symlink whose target it came from): targets go in front of the rest.
        todo: list[tuple[str, tuple[str, str] | None]] = [(part, None) for part in reversed(parts)]
        mode: int | None = None
        n_links = 0
        above: tuple[str, str] | None = None  # the symlink that last took `real` up above imgs/
        while todo:
            part, origin = todo.pop()
            if part in ("", "."):
                continue
            # `real` never holds a symlink, so its '..' is its lexical parent, a folder already walked through.
            candidate = posixpath.dirname(real) if part == ".." else posixpath.join(real, part)
            if candidate == self._imgs_text or self._imgs_text.startswith(candidate.rstrip("/") + "/"):
                real, mode = candidate, None
                above = (origin or above) if candidate != self._imgs_text else None
                continue
            if not self._is_inside(candidate):
                # Blame the symlink this step came from, or the one that took us above imgs/ (so that
                # 'up/x' with up -> '..' names 'up', not the record's own 'x').
                blamed = origin or above
                via = f" through symlink {self._shown(blamed[0])} -> {quoted(blamed[1])}" if blamed else ""
                raise _PathEscape(f"image path resolves outside {self.imgs_root}{via}")
            st = os.lstat(candidate)
            if not stat.S_ISLNK(st.st_mode):
                real, mode = candidate, st.st_mode
                continue
            target = os.readlink(candidate)
            n_links += 1
            if n_links > MAX_SYMLINKS:
                raise _PathEscape(
                    f"image path follows more than {MAX_SYMLINKS} symlinks (a loop?), last "
                    f"{self._shown(candidate)} -> {quoted(target)}"
                )
            if target.startswith("/"):  # an absolute target starts again from '/', above imgs/
                real, mode, above = "/", None, (candidate, target)
            todo.extend((step, (candidate, target)) for step in reversed(target.split("/")))
        return real, mode

    def _is_inside(self, real: str) -> bool:
        return real.startswith(self._imgs_prefix)

    def _shown(self, real: str) -> str:
        """A real path inside imgs/ as 'imgs/...', the way records and messages spell paths."""
        return f"imgs/{real.removeprefix(self._imgs_prefix)}"

    # Captions
    def _caption_row(
        self, record: dict, image_path: str, caption_index: int, raw: Any, gt_regions: str | None
    ) -> dict[str, Any]:
        """The manifest row of one caption; raises _RowProblem when the caption is unusable."""
        where = f"{image_path} caption {caption_index}"
        if not isinstance(raw, str):
            shown = "" if raw is None else f" {printable(json.dumps(raw), limit=60)}"
            raise _RowProblem(
                RejectReason.BAD_CAPTION_TYPE,
                f"{where}: caption must be a string, got {_json_type(raw)}{shown}",
            )
        text_problem = _text_problem(raw)
        if text_problem:
            raise _RowProblem(RejectReason.BAD_TEXT, f"{where}: {text_problem}")
        caption = raw.strip()
        if not caption:
            raise _RowProblem(RejectReason.EMPTY_CAPTION, f"{where}: caption is empty or whitespace")
        if len(caption) > self.max_caption_chars:
            why = f"caption has {len(caption)} chars (limit {self.max_caption_chars})"
            raise _RowProblem(RejectReason.CAPTION_TOO_LONG, f"{where}: {why}")
        if (image_path, caption) in self._seen_captions:
            raise _RowProblem(
                RejectReason.DUPLICATE, f"{where}: same caption already imported for this image"
            )
        gt_links: str | None = None
        if self.fmt.has_ground_truth:
            links = record["links"][caption_index]
            problem = _links_problem(links, {region["id"] for region in record["regions"]}, len(raw))
            if problem:
                raise _RowProblem(RejectReason.BAD_GROUND_TRUTH, f"{where}: {problem}")
            lead = len(raw) - len(raw.lstrip())
            if lead:  # the stored caption is stripped, so spans move left with it
                links = _shift_spans(links, lead, len(caption))
            gt_links = _to_json(links, f"{where}: links", image_path)
        self._seen_captions.add((image_path, caption))
        return {
            "sample_id": f"{image_path}#{caption_index}",
            "image_id": image_path,
            "person_id": record["id"],
            "split": record["split"],
            "image_path": image_path,
            "caption_index": caption_index,
            "caption": caption,
            "gt_regions": gt_regions,
            "gt_links": gt_links,
        }


# P-VLG ground truth (see README "The pvlg format")
def _regions_problem(record: dict) -> str | None:
    regions, links = record.get("regions"), record.get("links")
    if not isinstance(regions, list) or not isinstance(links, list):
        return "pvlg record needs 'regions' and 'links' lists"
    if len(links) != len(record["captions"]):
        return f"{len(links)} link lists for {len(record['captions'])} captions"
    seen_ids: set[int] = set()
    for pos, region in enumerate(regions):
        if (
            not isinstance(region, dict)
            or not _is_int(region.get("id"))
            or not isinstance(region.get("label"), str)
        ):
            return f"region {pos}: needs an integer 'id' and a string 'label'"
        if region["id"] in seen_ids:
            return f"region {pos}: duplicate region id {region['id']}"
        seen_ids.add(region["id"])
        bbox = region.get("bbox")
        ok = isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)
        if not ok or not (0 <= bbox[0] < bbox[2] and 0 <= bbox[1] < bbox[3]):
            return f"region {pos}: malformed bbox {printable(bbox)} (want XYXY pixels, x1<x2, y1<y2)"
        mask = region.get("mask")
        size = mask.get("size") if isinstance(mask, dict) else None
        if mask is not None and not (
            isinstance(mask, dict)
            and isinstance(mask.get("counts"), str)
            and isinstance(size, list)
            and len(size) == 2
            and all(_is_int(v) and v > 0 for v in size)
        ):
            return f"region {pos}: malformed mask (want COCO RLE {{'size': [h, w], 'counts': str}})"
    return None


def _links_problem(links: Any, region_ids: set[int], caption_chars: int) -> str | None:
    if not isinstance(links, list):
        return f"links must be a list, got {type(links).__name__}"

    def span_ok(span: Any) -> bool:
        return (
            isinstance(span, list)
            and len(span) == 2
            and all(_is_int(v) for v in span)
            and 0 <= span[0] <= span[1] <= caption_chars
        )

    for pos, link in enumerate(links):
        if not isinstance(link, dict) or not span_ok(link.get("span")):
            return f"link {pos}: needs a 'span' [start, end) inside the caption"
        ids, phrases = link.get("region_ids", []), link.get("phrases", [])
        if not isinstance(ids, list) or not isinstance(phrases, list):
            return f"link {pos}: 'region_ids' and 'phrases' must be lists"
        for phrase in phrases:
            if not isinstance(phrase, dict) or not span_ok(phrase.get("span")):
                return f"link {pos}: phrase needs a 'span' [start, end) inside the caption"
            ids = [*ids, phrase.get("region_id")]
        unknown = [rid for rid in ids if not _is_int(rid) or rid not in region_ids]
        if unknown:
            return f"link {pos}: region id(s) {printable(unknown)} not among the image's regions"
    return None


def _to_json(value: Any, what: str, image_path: str) -> str:
    try:
        return json.dumps(value, allow_nan=False)
    except (ValueError, TypeError) as exc:  # NaN/inf or non-JSON values somewhere inside
        raise _RowProblem(
            RejectReason.BAD_GROUND_TRUTH, f"{what} are not serialisable as strict JSON: {exc}", image_path
        ) from exc


def _shift_spans(links: list[dict], shift: int, length: int) -> list[dict]:
    def move(span: list[int]) -> list[int]:
        return [min(max(v - shift, 0), length) for v in span]

    out = []
    for link in links:
        link = {**link, "span": move(link["span"])}
        if "phrases" in link:
            link["phrases"] = [{**p, "span": move(p["span"])} for p in link["phrases"]]
        out.append(link)
    return out
