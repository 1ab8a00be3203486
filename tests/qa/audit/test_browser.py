"""The labelling page in a real browser: headless Chromium (Debian's, driven by Playwright) against the real
server (`qa.audit.web.serve` in a subprocess), keyboard only, labels checked in the audit database.

Never skipped silently: without Playwright or Chromium these tests FAIL saying how to install them; only
RSM_SKIP_BROWSER_TESTS=1 turns them into a (loud) skip.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from qa.audit.db import AuditDB

REPO = Path(__file__).resolve().parents[3]
INSTALL = (
    "install them with `apt-get install -y chromium` and `.venv/bin/pip install playwright` (the tests use "
    "Debian's Chromium; no `playwright install` download is needed), or set RSM_SKIP_BROWSER_TESTS=1 to skip"
)
SERVE = "import sys; from qa.audit.web import serve; serve(sys.argv[1], port=0)"

pytestmark = pytest.mark.slow


def chromium_path() -> str | None:
    """RSM_CHROMIUM when set (it must exist), else Debian's `chromium` on PATH."""
    if named := os.environ.get("RSM_CHROMIUM"):
        return named if shutil.which(named) else None
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():
    if os.environ.get("RSM_SKIP_BROWSER_TESTS") == "1":
        pytest.skip("RSM_SKIP_BROWSER_TESTS=1: the real-browser tests of the audit page are NOT run")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(f"Playwright for Python is not installed; {INSTALL}", pytrace=False)
    exe = chromium_path()
    if exe is None:
        pytest.fail(f"no Chromium found on PATH (or in RSM_CHROMIUM); {INSTALL}", pytrace=False)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe)
        yield browser
        browser.close()


@pytest.fixture
def server(audit_db):
    """The base URL of `serve(audit_db, port=0)` running in its own process (what `qa.audit serve` runs)."""
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVE, str(audit_db)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    # Drain the output for the whole run, so a full pipe can never block the server.
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    seen = []
    try:
        while True:
            try:
                line = lines.get(timeout=60)
            except queue.Empty:
                pytest.fail(f"the audit server printed no URL within 60 s: {''.join(seen)}")
            seen.append(line)
            if match := re.search(r"http://127\.0\.0\.1:\d+/", line):
                break
            if proc.poll() is not None:
                pytest.fail(f"the audit server exited ({proc.returncode}): {''.join(seen)}")
        yield match.group(0)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class AuditPage:
    """One browser tab on the audit page; `press` waits until the page has rendered what the key asked for."""

    def __init__(self, page):
        self.page = page
        self.errors: list[str] = []
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        page.on("console", lambda msg: msg.type == "error" and self.errors.append(msg.text))

    def open(self, url: str) -> AuditPage:
        self.page.goto(url)
        self.wait_rendered(0)
        return self

    def rendered(self) -> dict | None:
        return self.page.evaluate("() => window.__auditRendered || null")

    def wait_rendered(self, after: int) -> dict:
        self.page.wait_for_function(
            "(n) => window.__auditRendered && window.__auditRendered.count > n", arg=after, timeout=20_000
        )
        return self.rendered()

    def press(self, key: str) -> dict:
        before = self.rendered()["count"]
        self.page.keyboard.press(key)
        return self.wait_rendered(before)

    @property
    def item_id(self) -> int | None:
        value = self.page.get_attribute("body", "data-item-id")
        return None if value == "done" else int(value)

    def text(self, selector: str) -> str:
        return self.page.inner_text(selector)


def _verdicts_of(db_path, annotator: str) -> dict[int, str]:
    with AuditDB(db_path) as db:
        return {i: by[annotator] for i, by in db.verdicts().items() if annotator in by}


def test_keyboard_labelling_undo_and_reload_keep_every_label(browser, server, audit_db):
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    tab = AuditPage(context.new_page()).open(server + "?annotator=alice")
    assert tab.text("#annotator-name") == "alice"
    first = tab.item_id
    with AuditDB(audit_db) as db:
        item = db.item(first)
        reliabilities = {repr(it.reliability) for it in db.items()}
    # The pair is on screen: the sentence highlighted in its caption, the image decoded, the box drawn.
    assert tab.text("#cap-span") == item.caption[item.char_start : item.char_end]
    assert tab.page.evaluate("() => document.getElementById('caption').textContent") == item.caption
    assert tab.page.evaluate("() => document.getElementById('whole-img').naturalWidth") > 0
    box = tab.page.locator("#whole-svg rect.box").bounding_box()
    assert box["width"] > 4 and box["height"] > 4
    html = tab.page.content()
    assert "reliability" not in html and "kept" not in html and not [r for r in reliabilities if r in html]

    keys, expected = ["1", "2", "3", "y", "n"], ["correct", "wrong", "unsure", "correct", "wrong"]
    shown = []
    for key in keys:
        shown.append(tab.item_id)
        state = tab.press(key)
        assert state["itemId"] != shown[-1] and state["latencyMs"] is not None
    assert len(set(shown)) == 5
    assert _verdicts_of(audit_db, "alice") == dict(zip(shown, expected, strict=True))
    with AuditDB(audit_db) as db:
        events = db.events()
    assert [e["annotator"] for e in events] == ["alice"] * 5 and {e["source"] for e in events} == {"web"}
    assert all(e["seconds_spent"] is not None and e["seconds_spent"] >= 0 for e in events)
    assert tab.text("#progress-mine") == "5 of 40"

    # z: the last pair comes back and its verdict is retracted.
    tab.press("z")
    assert tab.item_id == shown[-1]
    assert _verdicts_of(audit_db, "alice") == dict(zip(shown[:4], expected[:4], strict=True))
    assert tab.text("#progress-mine") == "4 of 40"

    # A reload finds the labels where they were: same progress, the undone pair next.
    tab.page.reload()
    tab.wait_rendered(0)
    assert tab.text("#progress-mine") == "4 of 40" and tab.item_id == shown[-1]
    assert _verdicts_of(audit_db, "alice") == dict(zip(shown[:4], expected[:4], strict=True))

    # s skips (an event, no verdict); Backspace undoes too; a click on a button labels like its key.
    tab.press("s")
    assert tab.item_id != shown[-1]
    tab.press("Backspace")
    assert tab.item_id == shown[3] and shown[3] not in _verdicts_of(audit_db, "alice")
    count = tab.rendered()["count"]
    tab.page.click("button[data-action=unsure]")
    tab.wait_rendered(count)
    assert _verdicts_of(audit_db, "alice")[shown[3]] == "unsure"
    with AuditDB(audit_db) as db:
        assert [e["event"] for e in db.events()][-4:] == ["undo", "skip", "undo", "unsure"]
    assert tab.errors == []
    context.close()


def test_two_annotators_at_once_each_get_their_own_labels(browser, server, audit_db):
    contexts = [browser.new_context(viewport={"width": 1280, "height": 800}) for _ in range(2)]
    alice = AuditPage(contexts[0].new_page()).open(server + "?annotator=alice")
    bob = AuditPage(contexts[1].new_page()).open(server + "?annotator=bob")
    seen = {"alice": [], "bob": []}
    for k in range(6):  # interleaved: alice, bob, alice, ...
        for name, tab, keys in (("alice", alice, "1y"), ("bob", bob, "2n")):
            seen[name].append(tab.item_id)
            tab.press(keys[k % 2])
    assert _verdicts_of(audit_db, "alice") == dict.fromkeys(seen["alice"], "correct")
    assert _verdicts_of(audit_db, "bob") == dict.fromkeys(seen["bob"], "wrong")
    with AuditDB(audit_db) as db:
        events = db.events()
    assert len(events) == 12
    for e in events:
        assert e["item_id"] in seen[e["annotator"]]
        assert e["event"] == {"alice": "correct", "bob": "wrong"}[e["annotator"]]
    # Both tabs' progress counts their own labels and everyone's.
    bob.press("3")
    assert bob.text("#progress-mine") == "7 of 40" and alice.text("#progress-mine") == "6 of 40"
    assert alice.errors == [] and bob.errors == []
    for context in contexts:
        context.close()


def test_the_name_form_and_the_done_screen(browser, server, audit_db):
    with AuditDB(audit_db) as db:
        ids = [it.item_id for it in db.items()]
        pairs_dir = db.meta()["pairs_dir"]
        for item_id in ids[:-2]:
            db.add_event(item_id, "carol", "correct", source="test")
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.goto(server)
    assert page.locator("input[name=annotator]").is_visible()
    tab = AuditPage(page)
    page.fill("input[name=annotator]", "carol")
    page.press("input[name=annotator]", "Enter")
    tab.wait_rendered(0)
    assert tab.text("#annotator-name") == "carol" and tab.text("#progress-mine") == "38 of 40"
    last = None
    for key in ("1", "2"):
        last = tab.item_id
        tab.press(key)
    assert (
        tab.item_id is None and page.locator("#done").is_visible() and not page.locator("#pair").is_visible()
    )
    assert tab.text("#done-count") == "40"
    command = " ".join(tab.text("#done-command").replace("\\\n", " ").split())  # shown one option a line
    assert command.startswith("python -m qa.audit fit --db ") and f"--pairs {pairs_dir}" in command
    tab.press("z")  # back from the done screen to the last pair
    assert tab.item_id == last and page.locator("#pair").is_visible()
    assert tab.errors == []
    context.close()


def test_an_exif_rotated_image_is_boxed_in_its_displayed_orientation(browser, server, audit_db, tmp_path):
    """bbox_xyxy is in the pixels of the image as displayed (EXIF transpose applied). The page takes the
    size from the browser, which applies the EXIF orientation too, so a stored size in the file's own
    orientation (width and height swapped) does not move the box."""
    from PIL import Image, ImageOps

    with AuditDB(audit_db) as db:
        item = db.next_item("dora")
        source = Path(db.meta()["image_root"]) / item.image_path
        root = tmp_path / "root"
        shutil.copytree(Path(db.meta()["image_root"]) / "imgs", root / "imgs")  # the other pairs' images
        rotated = root / "rotated.jpg"
        with Image.open(source) as im:
            shown = im.convert("RGB")
        exif = Image.Exif()
        exif[0x0112] = 6  # "rotate 90° clockwise to display": the file holds the picture turned back
        shown.transpose(Image.Transpose.ROTATE_90).save(rotated, exif=exif, quality=95)
        with Image.open(rotated) as im:
            assert ImageOps.exif_transpose(im).size == shown.size != im.size
            stored = im.size
        db.conn.execute(
            "UPDATE items SET image_path = 'rotated.jpg', image_width = ?, image_height = ? WHERE item_id = ?",
            (*stored, item.item_id),
        )
        db.set_meta({"image_root": str(root)})
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    tab = AuditPage(context.new_page()).open(server + "?annotator=dora")
    assert tab.item_id == item.item_id
    natural = tab.page.evaluate(
        "() => [document.getElementById('whole-img').naturalWidth, document.getElementById('whole-img').naturalHeight]"
    )
    assert tuple(natural) == shown.size
    assert tab.page.get_attribute("#whole-svg", "viewBox") == f"0 0 {shown.size[0]} {shown.size[1]}"
    # The box sits over the same part of the picture as in the upright original: its share of the width.
    img = tab.page.locator("#whole-img").bounding_box()
    box = tab.page.locator("#whole-svg rect.box").bounding_box()
    x0 = item.bbox_xyxy[0] / shown.size[0]
    assert abs((box["x"] - img["x"]) / img["width"] - x0) < 0.03
    assert tab.errors == []
    context.close()
