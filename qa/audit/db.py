"""The audit database: one SQLite file per audit, holding the sample, its strata and every label event.

Consumes sampled pairs (qa.audit.sample) and verdict events (the web app, the oracle, a Label Studio
import); produces the current verdicts per item and annotator and each annotator's queue. Tables:

- `meta`: key/value: `run_id` (the run the sample was drawn from; every later command checks it),
  `pairs_dir`, `image_root`, `manifest_path`, `keep_threshold`, `n_strata`, `schema_version`.
- `strata`: one row per reliability stratum: whether it holds kept pairs, its reliability range, its
  population size N_h and how many of its pairs are sampled n_h (inclusion probability n_h / N_h).
- `items`: the sampled pairs, keyed by (sample_id, sentence_index, region_id), with what the page shows
  (image path, box, mask, caption, span), the stratum, the inclusion probability, and — never sent to
  the page — the reliability and kept flag.
- `labels`: append-only events `correct | wrong | unsure | skip | undo` with annotator, UTC time and
  seconds spent; an `undo` names the event it retracts. Nothing is ever updated or deleted.

Every connection uses WAL and a busy timeout, and each event is one INSERT in its own transaction, so
several annotators (several server threads or processes) never lose a label.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

SCHEMA_VERSION = "1"
VERDICTS = ("correct", "wrong", "unsure")
EVENTS = (*VERDICTS, "skip", "undo")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS strata (
    stratum INTEGER PRIMARY KEY,
    kept INTEGER NOT NULL,
    rel_low REAL NOT NULL,
    rel_high REAL NOT NULL,
    n_population INTEGER NOT NULL,
    n_sampled INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS items (
    item_id INTEGER PRIMARY KEY,
    sample_id TEXT NOT NULL,
    sentence_index INTEGER NOT NULL,
    region_id INTEGER NOT NULL,
    image_path TEXT NOT NULL,
    person_id INTEGER NOT NULL,
    caption TEXT NOT NULL,
    sentence TEXT NOT NULL,
    char_start INTEGER NOT NULL,
    char_end INTEGER NOT NULL,
    bbox_xyxy TEXT NOT NULL,
    mask_rle TEXT,
    region_label TEXT,
    image_width INTEGER,
    image_height INTEGER,
    stratum INTEGER NOT NULL REFERENCES strata(stratum),
    inclusion_prob REAL NOT NULL,
    reliability REAL NOT NULL,
    kept INTEGER NOT NULL,
    queue_order REAL NOT NULL,
    sampling_round INTEGER NOT NULL,
    UNIQUE (sample_id, sentence_index, region_id)
);
CREATE TABLE IF NOT EXISTS labels (
    label_id INTEGER PRIMARY KEY AUTOINCREMENT,
    item_id INTEGER NOT NULL REFERENCES items(item_id),
    annotator TEXT NOT NULL,
    event TEXT NOT NULL CHECK (event IN ('correct', 'wrong', 'unsure', 'skip', 'undo')),
    undoes INTEGER REFERENCES labels(label_id),
    created_at TEXT NOT NULL,
    seconds_spent REAL,
    source TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS labels_by_annotator ON labels (annotator, label_id);
CREATE INDEX IF NOT EXISTS labels_by_item ON labels (item_id);
-- "is this verdict retracted?" is asked for every label on every page: without this index each question
-- scans the table and a page costs O(labels²) (1.3 s per pair at 2,000 labels)
CREATE INDEX IF NOT EXISTS labels_by_undoes ON labels (undoes);
"""


class AuditError(ValueError):
    """An audit command cannot go on; the message says why and what to do."""


class UnknownItemError(AuditError):
    """An item (pair) id that the audit database does not hold."""


@dataclass(frozen=True)
class Item:
    item_id: int
    sample_id: str
    sentence_index: int
    region_id: int
    image_path: str
    person_id: int
    caption: str
    sentence: str
    char_start: int
    char_end: int
    bbox_xyxy: tuple[float, float, float, float]
    mask_rle: str | None
    region_label: str | None
    image_width: int | None
    image_height: int | None
    stratum: int
    inclusion_prob: float
    reliability: float
    kept: bool

    @property
    def pair_key(self) -> tuple[str, int, int]:
        return (self.sample_id, self.sentence_index, self.region_id)


# A verdict event (alias `l`) that no undo has retracted: the one rule every reader of labels applies.
_IN_FORCE = (
    "l.event IN ('correct', 'wrong', 'unsure') "
    "AND NOT EXISTS (SELECT 1 FROM labels u WHERE u.undoes = l.label_id)"
)

_ITEM_COLUMNS = (
    "item_id, sample_id, sentence_index, region_id, image_path, person_id, caption, sentence, char_start, "
    "char_end, bbox_xyxy, mask_rle, region_label, image_width, image_height, stratum, inclusion_prob, "
    "reliability, kept"
)


def _item(row: tuple) -> Item:
    values = list(row)
    values[10] = tuple(json.loads(values[10]))
    values[18] = bool(values[18])
    return Item(*values)


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class AuditDB:
    """One audit database file. Cheap to open: the web app opens one per request."""

    def __init__(self, path: str | Path, create: bool = False):
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise AuditError(
                f"audit database {self.path} does not exist; make it with "
                f"`python -m qa.audit sample --pairs SHARDS --db {self.path}`"
            )
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        # check_same_thread=False: FastAPI runs sync endpoints in a thread pool; each request has its own
        # AuditDB, so a connection is never used by two threads at once.
        self.conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA busy_timeout=30000")
        self.conn.execute("PRAGMA foreign_keys=ON")
        version = self.meta().get("schema_version")
        fresh = not self.conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchone()
        if create and fresh:
            self.conn.executescript(_SCHEMA)
            self.set_meta({"schema_version": SCHEMA_VERSION, "created_at": utc_now()})
        elif version != SCHEMA_VERSION:
            self.conn.close()
            raise AuditError(
                f"{self.path}: not an audit database of schema version {SCHEMA_VERSION} (found {version!r})"
            )

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> AuditDB:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE … COMMIT: takes the write lock up front, so two writers queue instead of
        failing on a lock upgrade."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    # -- meta -------------------------------------------------------------------------------------------
    def meta(self) -> dict[str, str]:
        try:
            return dict(self.conn.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.OperationalError:  # no meta table: not an audit database
            return {}

    def set_meta(self, values: dict[str, str]) -> None:
        with self.transaction() as c:
            c.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", list(values.items()))

    @property
    def run_id(self) -> str | None:
        return self.meta().get("run_id")

    def check_run(self, run_id: str, pairs_dir: str | Path) -> None:
        """AuditError naming both ids when this database was sampled from another run."""
        mine = self.run_id
        if mine is not None and mine != run_id:
            raise AuditError(
                f"{self.path} was sampled from run {mine}, but {pairs_dir} is run {run_id}; use the run it "
                f"was made from ({self.meta().get('pairs_dir')}) or a new --db for this run"
            )

    # -- strata and items -------------------------------------------------------------------------------
    def strata(self) -> list[dict]:
        rows = self.conn.execute(
            "SELECT stratum, kept, rel_low, rel_high, n_population, n_sampled FROM strata ORDER BY stratum"
        ).fetchall()
        keys = ("stratum", "kept", "rel_low", "rel_high", "n_population", "n_sampled")
        return [dict(zip(keys, r, strict=True)) | {"kept": bool(r[1])} for r in rows]

    def items(self, queue_order: bool = False) -> list[Item]:
        """Every sampled item, by id (or in the order the page shows them)."""
        order = "queue_order" if queue_order else "item_id"
        rows = self.conn.execute(f"SELECT {_ITEM_COLUMNS} FROM items ORDER BY {order}").fetchall()
        return [_item(r) for r in rows]

    def item(self, item_id: int) -> Item:
        row = self.conn.execute(f"SELECT {_ITEM_COLUMNS} FROM items WHERE item_id = ?", (item_id,)).fetchone()
        if row is None:
            raise UnknownItemError(f"{self.path} holds no pair with id {item_id}")
        return _item(row)

    def item_id_of(self, sample_id: str, sentence_index: int, region_id: int) -> int:
        row = self.conn.execute(
            "SELECT item_id FROM items WHERE sample_id = ? AND sentence_index = ? AND region_id = ?",
            (sample_id, sentence_index, region_id),
        ).fetchone()
        if row is None:
            raise UnknownItemError(
                f"{self.path} holds no pair ({sample_id!r}, sentence {sentence_index}, region {region_id})"
            )
        return int(row[0])

    def sampled_keys(self) -> set[tuple[str, int, int]]:
        rows = self.conn.execute("SELECT sample_id, sentence_index, region_id FROM items").fetchall()
        return {(s, int(u), int(r)) for s, u, r in rows}

    def n_items(self) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM items").fetchone()[0])

    # -- label events -----------------------------------------------------------------------------------
    def add_event(
        self,
        item_id: int,
        annotator: str,
        event: str,
        seconds_spent: float | None = None,
        source: str = "web",
        undoes: int | None = None,
    ) -> int:
        """Append one event; returns its label id."""
        if event not in EVENTS:
            raise AuditError(f"unknown verdict {event!r}; one of {', '.join(EVENTS)}")
        if not annotator or not annotator.strip():
            raise AuditError("an annotator name is required")
        self.item(item_id)  # UnknownItemError, not a foreign-key failure
        with self.transaction() as c:
            cur = c.execute(
                "INSERT INTO labels (item_id, annotator, event, undoes, created_at, seconds_spent, source) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (item_id, annotator.strip(), event, undoes, utc_now(), seconds_spent, source),
            )
            return int(cur.lastrowid)

    def undo_last(self, annotator: str) -> int | None:
        """Retract the annotator's latest verdict that is still in force; returns its item id (None when
        there is nothing to undo). The retraction is a new `undo` event, checked and written under one
        write lock so that two undo presses never retract the same verdict twice."""
        annotator = annotator.strip()
        with self.transaction() as c:
            row = c.execute(
                f"SELECT label_id, item_id FROM labels l WHERE annotator = ? AND {_IN_FORCE} "
                "ORDER BY label_id DESC LIMIT 1",
                (annotator,),
            ).fetchone()
            if row is None:
                return None
            label_id, item_id = row
            c.execute(
                "INSERT INTO labels (item_id, annotator, event, undoes, created_at, seconds_spent, source) "
                "VALUES (?, ?, 'undo', ?, ?, NULL, 'web')",
                (item_id, annotator, label_id, utc_now()),
            )
            return int(item_id)

    def events(self) -> list[dict]:
        rows = self.conn.execute(
            "SELECT label_id, item_id, annotator, event, undoes, created_at, seconds_spent, source "
            "FROM labels ORDER BY label_id"
        ).fetchall()
        keys = (
            "label_id",
            "item_id",
            "annotator",
            "event",
            "undoes",
            "created_at",
            "seconds_spent",
            "source",
        )
        return [dict(zip(keys, r, strict=True)) for r in rows]

    def verdicts(self) -> dict[int, dict[str, str]]:
        """item id -> {annotator: verdict in force}: each annotator's latest correct/wrong/unsure on the
        item that no undo retracts."""
        rows = self.conn.execute(
            f"SELECT item_id, annotator, event FROM labels l WHERE {_IN_FORCE} ORDER BY label_id"
        ).fetchall()
        out: dict[int, dict[str, str]] = {}
        for item_id, annotator, event in rows:
            out.setdefault(int(item_id), {})[annotator] = event
        return out

    def next_item(self, annotator: str) -> Item | None:
        """The annotator's next item (see `next_items`); None when they have labelled every item."""
        items = self.next_items(annotator, 1)
        return items[0] if items else None

    def next_items(self, annotator: str, limit: int) -> list[Item]:
        """The annotator's next `limit` items: ones they have no verdict on, preferring items nobody has
        labelled yet (annotators working at once share the sample instead of repeating it), then items
        they have not skipped, then the sample's shuffled order."""
        annotator = annotator.strip()
        rows = self.conn.execute(
            f"""
            WITH active AS (SELECT item_id, annotator FROM labels l WHERE {_IN_FORCE})
            SELECT {_ITEM_COLUMNS} FROM items i
            WHERE NOT EXISTS (SELECT 1 FROM active a WHERE a.item_id = i.item_id AND a.annotator = :who)
            ORDER BY
                EXISTS (SELECT 1 FROM active a WHERE a.item_id = i.item_id),
                (SELECT COUNT(*) FROM labels s WHERE s.item_id = i.item_id AND s.annotator = :who
                    AND s.event = 'skip'),
                queue_order
            LIMIT :n
            """,
            {"who": annotator, "n": limit},
        ).fetchall()
        return [_item(r) for r in rows]

    def progress(self, annotator: str | None = None) -> dict:
        """Items with a verdict (by anyone, and by `annotator`), overall and per stratum."""
        annotator = annotator.strip() if annotator else annotator
        verdicts = self.verdicts()
        per_stratum: dict[int, dict[str, int]] = {}
        for s in self.strata():
            per_stratum[s["stratum"]] = {"items": 0, "done": 0, "mine": 0}
        for item_id, stratum in self.conn.execute("SELECT item_id, stratum FROM items").fetchall():
            row = per_stratum.setdefault(int(stratum), {"items": 0, "done": 0, "mine": 0})
            row["items"] += 1
            by = verdicts.get(int(item_id), {})
            row["done"] += bool(by)
            row["mine"] += annotator in by
        total = {k: sum(r[k] for r in per_stratum.values()) for k in ("items", "done", "mine")}
        return {
            **total,
            "strata": [{"stratum": k, **v} for k, v in sorted(per_stratum.items()) if v["items"]],
        }
