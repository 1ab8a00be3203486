"""Latency benchmark of the labelling page: key press → next pair fully rendered, in a real browser.

Consumes an audit database (`--db`; when it does not exist, `--pairs RUN` samples one into it with
`qa.audit.sample.sample_pairs`); produces a JSON report on stdout (and in `--json-out FILE`) and, with
`--screenshot FILE`, a 1280x800 screenshot of the page showing its first pair.

    python bench/audit_ui.py --db audit.sqlite [--pairs RUN] [--n 60] [--json-out FILE]
                             [--screenshot docs/audit-page.png]

The labels go to a copy of the database in a temporary folder, never into `--db`: the benchmark's
verdicts are not a reviewer's. The server is the real one (`qa.audit.web.serve` in its own process, on a
free localhost port); the browser is headless Debian Chromium driven by Playwright (`pip install
playwright`, no `playwright install`). Per pair it presses one verdict key (1, 2, 3, y, n in turn) and
reads the page's own `window.__auditRendered`, set once the next pair's image is decoded, its sentence
shown and a frame painted; `render_ms` is that moment minus the key event's timestamp (both
`performance.now()` in the page), `answer_ms` the part spent waiting for the server's answer. Keystrokes
per pair counts the keys pressed over the pairs that came up (1.0 when no key is lost or needs repeating).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from urllib.parse import quote

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qa.audit.db import AuditDB  # noqa: E402

KEYS = ("1", "2", "3", "y", "n")
SERVE = "import sys; from qa.audit.web import serve; serve(sys.argv[1], port=0)"


def _stats(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    a = np.asarray(values, dtype=np.float64)
    return {
        "n": int(a.size),
        "median": round(float(np.median(a)), 2),
        "p95": round(float(np.percentile(a, 95)), 2),
        "max": round(float(a.max()), 2),
        "min": round(float(a.min()), 2),
    }


def _copy_db(src: Path, dst: Path) -> None:
    # The SQLite backup API: a consistent copy even while someone labels in the original (WAL).
    with sqlite3.connect(src) as a, sqlite3.connect(dst) as b:
        a.backup(b)


class Server:
    """`serve(db, port=0)` in a subprocess; `url` is what it printed."""

    def __init__(self, db: Path):
        env = os.environ | {"PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVE, str(db)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(x) for x in self.proc.stdout], daemon=True).start()
        seen = []
        deadline = time.monotonic() + 60
        while True:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                self.close()
                raise SystemExit(f"the audit server printed no URL within 60 s: {''.join(seen)}") from None
            seen.append(line)
            if match := re.search(r"http://\S+/", line):
                self.url = match.group(0)
                return

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def run(db: Path, n: int, screenshot: Path | None, annotator: str) -> dict:
    from playwright.sync_api import sync_playwright

    exe = os.environ.get("RSM_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not exe:
        raise SystemExit("no Chromium on PATH: `apt-get install -y chromium` (or set RSM_CHROMIUM)")
    server = Server(db)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=exe)
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(f"{server.url}?annotator={quote(annotator)}")
            page.wait_for_function("() => window.__auditRendered", timeout=30_000)
            first = page.evaluate("() => window.__auditRendered")
            if screenshot is not None:
                page.wait_for_load_state("networkidle")  # the mask outline too, when the pair has one
                screenshot.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(screenshot))
            render, answer, presses, advanced = [], [], 0, 0
            state = first
            while advanced < n and state["itemId"] is not None:
                page.keyboard.press(KEYS[presses % len(KEYS)])
                presses += 1
                page.wait_for_function(
                    "(n) => window.__auditRendered.count > n", arg=state["count"], timeout=30_000
                )
                new = page.evaluate("() => window.__auditRendered")
                if new["itemId"] is None:  # the done screen: the sample is used up, not a pair to time
                    presses -= 1
                    break
                if new["itemId"] != state["itemId"]:
                    advanced += 1
                    render.append(new["latencyMs"])
                    answer.append(new["answerAt"] - new["keyAt"])
                state = new
            version = browser.version
            browser.close()
    finally:
        server.close()
    return {
        "pairs_timed": len(render),
        "pairs_asked": n,
        "ran_out_of_pairs": len(render) < n,
        "render_ms": _stats(render),
        "answer_ms": _stats(answer),
        "first_pair_ms_from_navigation": round(first["renderedAt"], 1),
        "keystrokes_per_pair": round(presses / advanced, 3) if advanced else None,
        "page_errors": errors,
        "chromium": version,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--db", required=True, type=Path, help="audit database (sampled into when missing)")
    ap.add_argument("--pairs", type=Path, help="run folder to sample from when --db does not exist")
    ap.add_argument("--sample-n", type=int, default=200, help="pairs to sample when --db is made here")
    ap.add_argument("--n", type=int, default=60, help="pairs to label (timed)")
    ap.add_argument("--json-out", type=Path)
    ap.add_argument("--screenshot", type=Path, help="PNG of the page with its first pair (1280x800)")
    ap.add_argument("--annotator", default="bench")
    ap.add_argument("--results", type=Path, help="append a dated section to this Markdown file")
    ap.add_argument(
        "--prelabel", type=int, default=0, help="label this many events into the copy first (a busy database)"
    )
    args = ap.parse_args(argv)
    cmd = "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])])

    if not args.db.is_file():
        if args.pairs is None:
            ap.error(f"{args.db} does not exist; pass --pairs RUN to sample one")
        from qa.audit.sample import sample_pairs

        sample_pairs(args.pairs, args.db, n=max(args.sample_n, args.n))
    with AuditDB(args.db) as db:
        items = db.n_items()
    with tempfile.TemporaryDirectory(prefix="audit-bench-") as tmp:
        copy = Path(tmp) / "audit.sqlite"
        _copy_db(args.db, copy)
        if args.prelabel:
            _prelabel(copy, args.prelabel)
        report = {
            "date": datetime.now().isoformat(timespec="seconds"),
            "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.system()} {platform.release()}",
            "db": str(args.db),
            "items": items,
            **run(copy, args.n, args.screenshot, args.annotator),
            "screenshot": str(args.screenshot) if args.screenshot else None,
        }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(text + "\n")
    if args.results:
        _append_results(args.results, report, cmd, args.prelabel)
    return 0 if report["pairs_timed"] and not report["page_errors"] else 1


def _prelabel(db_path: Path, n_events: int) -> None:
    """`n_events` verdicts by other annotators (10 of them, round robin over the items), so the page is
    measured on a database that has been worked on, not an empty one."""
    with AuditDB(db_path) as db:
        ids = [it.item_id for it in db.items()]
        for k in range(n_events):
            db.add_event(ids[k % len(ids)], f"earlier-{k % 10}", ("correct", "wrong")[k % 2], 1.0, "bench")


def _append_results(path: Path, r: dict, cmd: str, prelabel: int) -> None:
    rm, am = r["render_ms"], r["answer_ms"]
    row = (
        f"| {r['date'][:10]} | {r['machine']} | `{cmd}` | {r['items']} items, {prelabel} earlier labels "
        f"| {r['pairs_timed']} | {rm['median']} / {rm['p95']} / {rm['max']} | {am['median']} "
        f"| {r['keystrokes_per_pair']} | {len(r['page_errors'])} |"
    )
    header = [
        "",
        "## Audit page: key press → next pair rendered (headless Chromium)",
        "",
        "| date | machine | command | database | pairs timed | render ms median / p95 / max | server answer ms median "
        "| keys per pair | page errors |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    with path.open("a") as fh:
        fh.write("\n".join([*header, row]) + "\n")


if __name__ == "__main__":
    sys.exit(main())
