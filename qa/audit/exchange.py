"""Audit labels out of and into the database: JSON lines, CSV, and Label Studio tasks.

Consumes an audit database; produces one row per sampled pair (`jsonl`, `csv`: the pair, its stratum,
inclusion probability, mined reliability, each annotator's verdict in force and the combined verdict), or
Label Studio tasks (`label-studio`): `data` holds the image URL, the caption and the sentence (and the
pair's key and run id, for the way back); `predictions` the region as a rectangle in percent of the image
and the sentence as a span of the caption; `annotations` the verdicts as a `verdict` choice
(correct / wrong / unsure). Beside the tasks file a labelling config (`<FILE>.label-config.xml`) sets up the
same view with keys 1/2/3. The mined reliability is not put into Label Studio tasks (no anchoring).

`import_label_studio` reads a Label Studio JSON export back: every annotation's verdict becomes a label
event (source `label-studio`) of its annotator unless that annotator's verdict in force is already the
same, so a round trip adds nothing. Tasks of another run are refused (naming both ids); a task whose pair
is not in the database is an error naming it.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from qa.audit.db import VERDICTS, AuditDB, AuditError, Item, UnknownItemError
from qa.audit.estimate import combine_annotators
from qa.audit.sample import image_size

FORMATS = ("jsonl", "csv", "label-studio")
LS_IMAGE_PREFIX = "/data/local-files/?d="  # Label Studio's local-files route (LOCAL_FILES_DOCUMENT_ROOT)

LABEL_CONFIG = """<View>
  <Header value="Does the box show what the highlighted sentence says?"/>
  <Image name="image" value="$image" zoom="true"/>
  <RectangleLabels name="region" toName="image"><Label value="region" background="#e4572e"/></RectangleLabels>
  <Text name="caption" value="$caption"/>
  <Labels name="sentence_span" toName="caption"><Label value="sentence" background="#ffd23f"/></Labels>
  <Choices name="verdict" toName="caption" choice="single-radio" showInline="true" required="true">
    <Choice value="correct" hotkey="1"/>
    <Choice value="wrong" hotkey="2"/>
    <Choice value="unsure" hotkey="3"/>
  </Choices>
</View>
"""


EXPORT_FIELDS = (
    "item_id",
    "sample_id",
    "sentence_index",
    "region_id",
    "image_path",
    "person_id",
    "sentence",
    "char_start",
    "char_end",
    "bbox_xyxy",
    "region_label",
    "stratum",
    "inclusion_prob",
    "reliability",
    "kept",
    "verdicts",
    "verdict",
)


def _row(item: Item, verdicts: dict[str, str]) -> dict:
    return {
        "item_id": item.item_id,
        "sample_id": item.sample_id,
        "sentence_index": item.sentence_index,
        "region_id": item.region_id,
        "image_path": item.image_path,
        "person_id": item.person_id,
        "sentence": item.sentence,
        "char_start": item.char_start,
        "char_end": item.char_end,
        "bbox_xyxy": list(item.bbox_xyxy),
        "region_label": item.region_label,
        "stratum": item.stratum,
        "inclusion_prob": item.inclusion_prob,
        "reliability": item.reliability,
        "kept": item.kept,
        "verdicts": dict(sorted(verdicts.items())),
        "verdict": combine_annotators(verdicts) if verdicts else None,
    }


def _size(root: str, item: Item) -> tuple[int, int]:
    if item.image_width and item.image_height:
        return item.image_width, item.image_height
    width, height = image_size(root, item.image_path)
    if width is None or height is None:
        raise AuditError(f"cannot read the size of {item.image_path} under {root} for the rectangle")
    return width, height


def _task(item: Item, verdicts: dict[str, str], run_id: str, root: str, prefix: str) -> dict:
    w, h = _size(root, item)
    x0, y0, x1, y1 = item.bbox_xyxy
    rect = {
        "x": 100.0 * max(0.0, x0) / w,
        "y": 100.0 * max(0.0, y0) / h,
        "width": 100.0 * (min(float(w), x1) - max(0.0, x0)) / w,
        "height": 100.0 * (min(float(h), y1) - max(0.0, y0)) / h,
        "rotation": 0,
        "rectanglelabels": ["region"],
    }
    span = {
        "start": item.char_start,
        "end": item.char_end,
        "text": item.caption[item.char_start : item.char_end],
        "labels": ["sentence"],
    }
    return {
        "data": {
            "image": prefix + item.image_path,
            "caption": item.caption,
            "sentence": item.sentence,
            "rsm_run_id": run_id,
            "rsm_pair": {
                "item_id": item.item_id,
                "sample_id": item.sample_id,
                "sentence_index": item.sentence_index,
                "region_id": item.region_id,
            },
        },
        "predictions": [
            {
                "model_version": f"rsm-{run_id}",
                "result": [
                    {
                        "id": f"r{item.item_id}",
                        "from_name": "region",
                        "to_name": "image",
                        "type": "rectanglelabels",
                        "original_width": w,
                        "original_height": h,
                        "value": rect,
                    },
                    {
                        "id": f"s{item.item_id}",
                        "from_name": "sentence_span",
                        "to_name": "caption",
                        "type": "labels",
                        "value": span,
                    },
                ],
            }
        ],
        "annotations": [
            {
                "completed_by": {"email": name},
                "result": [
                    {
                        "from_name": "verdict",
                        "to_name": "caption",
                        "type": "choices",
                        "value": {"choices": [verdict]},
                    }
                ],
            }
            for name, verdict in sorted(verdicts.items())
        ],
    }


def export(
    db_path: str | Path, fmt: str, out: str | Path | None = None, image_prefix: str = LS_IMAGE_PREFIX
) -> str:
    """The database in `fmt`; written to `out` when given (label-studio also writes its config beside
    it), returned as text either way."""
    if fmt not in FORMATS:
        raise AuditError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    with AuditDB(db_path) as db:
        items = db.items()
        verdicts = db.verdicts()
        meta = db.meta()
    if fmt == "label-studio":
        text = json.dumps(
            [
                _task(it, verdicts.get(it.item_id, {}), meta["run_id"], meta["image_root"], image_prefix)
                for it in items
            ],
            indent=1,
            ensure_ascii=False,
        )
    else:
        rows = [_row(it, verdicts.get(it.item_id, {})) for it in items]
        if fmt == "jsonl":
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        else:
            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=EXPORT_FIELDS, lineterminator="\n")
            writer.writeheader()
            for r in rows:
                writer.writerow(
                    {
                        k: json.dumps(v, ensure_ascii=False) if isinstance(v, list | dict) else v
                        for k, v in r.items()
                    }
                )
            text = buf.getvalue()
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
        if fmt == "label-studio":
            out.with_name(out.name + ".label-config.xml").write_text(LABEL_CONFIG)
    return text


def _annotator(annotation: dict) -> str:
    who = annotation.get("completed_by")
    if isinstance(who, dict):
        who = who.get("email") or who.get("username") or who.get("id")
    return f"label-studio-user-{who}" if isinstance(who, int) else str(who or "label-studio")


def _choice(annotation: dict) -> str | None:
    for result in annotation.get("result") or []:
        if result.get("from_name") == "verdict" and result.get("type") == "choices":
            choices = (result.get("value") or {}).get("choices") or []
            if len(choices) == 1:
                return choices[0]
    return None


def import_label_studio(db_path: str | Path, path: str | Path) -> dict:
    """Append the verdicts of a Label Studio JSON export; returns {added, unchanged, no_verdict}."""
    try:
        tasks = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise AuditError(f"{path}: not a readable Label Studio JSON export ({exc})") from exc
    if not isinstance(tasks, list):
        raise AuditError(f"{path}: a Label Studio JSON export is a list of tasks")
    added = unchanged = no_verdict = 0
    with AuditDB(db_path) as db:
        run_id = db.run_id
        in_force = db.verdicts()
        for n, task in enumerate(tasks):
            data = task.get("data") or {}
            pair = data.get("rsm_pair")
            if not isinstance(pair, dict):
                raise AuditError(f"{path}: task {n} has no data.rsm_pair (was it exported by qa.audit?)")
            if data.get("rsm_run_id") != run_id:
                raise AuditError(
                    f"{path}: task {n} belongs to run {data.get('rsm_run_id')}, but {db_path} was sampled "
                    f"from run {run_id}"
                )
            try:
                key = (str(pair["sample_id"]), int(pair["sentence_index"]), int(pair["region_id"]))
            except (KeyError, TypeError, ValueError) as exc:
                raise UnknownItemError(f"{path}: task {n}: bad rsm_pair {pair!r}") from exc
            try:
                item_id = db.item_id_of(*key)
            except UnknownItemError as exc:
                raise UnknownItemError(f"{path}: task {n}: {exc}") from exc
            for annotation in task.get("annotations") or []:
                if annotation.get("was_cancelled"):
                    continue
                verdict = _choice(annotation)
                if verdict not in VERDICTS:
                    no_verdict += 1
                    continue
                who = _annotator(annotation)
                if in_force.get(item_id, {}).get(who) == verdict:
                    unchanged += 1
                    continue
                db.add_event(item_id, who, verdict, source="label-studio")
                in_force.setdefault(item_id, {})[who] = verdict
                added += 1
    return {"added": added, "unchanged": unchanged, "no_verdict": no_verdict}
