"""The labelling web app (qa/audit/web.py) through its HTTP API: what it sends, what it records, what it
refuses. In-process (FastAPI TestClient), plus a real uvicorn server in a thread where the test needs
real sockets (a raw `..` request line, annotators posting at once)."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from fastapi.testclient import TestClient
from PIL import Image

from qa.audit import web
from qa.audit.db import AuditDB, AuditError
from storage.rle import encode_mask
from tests import audit

HIDDEN_KEYS = ("reliability", "kept", "inclusion_prob", "inclusion")


@pytest.fixture
def client(audit_db) -> TestClient:
    return TestClient(web.create_app(audit_db))


def _db(path) -> AuditDB:
    return AuditDB(path)


def _embedded_state(html: str) -> dict:
    match = re.search(r'<script type="application/json" id="audit-state">(.*?)</script>', html, re.S)
    assert match, "the page embeds no state"
    return json.loads(match.group(1))


def _label(client: TestClient, item_id: int, verdict: str = "correct", who: str = "alice", **extra):
    body = {"item_id": item_id, "verdict": verdict, "annotator": who, "seconds_spent": 1.5, **extra}
    return client.post("/api/label", json=body)


@contextlib.contextmanager
def running_server(app):
    """The app under a real uvicorn server on a free localhost port, in a thread of this process."""
    sock = web._listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def _raw_get(port: int, target: str) -> tuple[int, bytes]:
    """GET with the request target sent as is (httpx would remove the dot segments first)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


# -- the model's view stays on the server ---------------------------------------------------------------
def test_page_api_and_static_files_never_carry_the_score_or_the_keep_flag(client, audit_db):
    with _db(audit_db) as db:
        items = db.items()
    secrets = set()
    for it in items:
        secrets |= {repr(it.reliability), repr(float(np.float32(it.reliability))), repr(it.inclusion_prob)}
    texts = [client.get("/static/audit.js").text, client.get("/static/audit.css").text]
    texts.append(client.get("/?annotator=alice").text)
    state = client.get("/api/next", params={"annotator": "alice"}).json()
    first = state["item"]["item_id"]
    r = client.post("/api/skip", json={"item_id": first, "annotator": "alice"})
    texts.append(r.text)
    state = r.json()
    seen = set()
    while state["item"] is not None:  # every pair of the sample passes through the API once
        seen.add(state["item"]["item_id"])
        r = _label(client, state["item"]["item_id"])
        texts.append(r.text)
        state = r.json()
    texts.append(client.post("/api/undo", json={"annotator": "alice"}).text)
    texts.append(client.get("/?annotator=alice").text)
    texts.append(client.get("/?annotator=bob").text)
    assert seen == {it.item_id for it in items}
    for text in texts:
        for key in HIDDEN_KEYS:
            assert key not in text
        assert not [s for s in secrets if s in text]
    item_keys = set(client.get("/api/next", params={"annotator": "carol"}).json()["item"])
    assert not item_keys & {"stratum", "reliability", "kept", "inclusion_prob"}


def test_the_page_loads_nothing_from_anywhere_else(client):
    page = client.get("/?annotator=alice")
    assert page.status_code == 200
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for text in (page.text, client.get("/static/audit.css").text, client.get("/static/audit.js").text):
        assert "http://" not in text and "https://" not in text and "//cdn" not in text
        assert "@import" not in text
    for src in re.findall(r'(?:src|href)="([^"]+)"', page.text):
        assert src.startswith(("/static/", "/?", "data:")), src
        if src.startswith("/static/"):
            assert client.get(src).status_code == 200


# -- the page ------------------------------------------------------------------------------------------------
def test_without_a_name_the_page_asks_for_one(audit_db):
    page = TestClient(web.create_app(audit_db)).get("/")
    assert page.status_code == 200
    assert 'name="annotator"' in page.text and "audit-state" not in page.text
    assert "audit-state" not in TestClient(web.create_app(audit_db)).get("/?annotator=%20%20").text


def test_the_servers_annotator_is_the_default_and_can_be_changed(audit_db):
    client = TestClient(web.create_app(audit_db, annotator="srv"))
    page = client.get("/")
    assert _embedded_state(page.text)["annotator"] == "srv"
    assert 'name="annotator"' in client.get("/?change=1").text
    assert _embedded_state(client.get("/?annotator=ann").text)["annotator"] == "ann"
    item_id = client.get("/api/next").json()["item"]["item_id"]
    assert client.post("/api/label", json={"item_id": item_id, "verdict": "wrong"}).status_code == 200
    with _db(audit_db) as db:
        assert db.verdicts() == {item_id: {"srv": "wrong"}}


def test_the_page_embeds_the_first_pair_and_escapes_names_and_captions(client, audit_db):
    with _db(audit_db) as db:
        item = db.next_item("alice")
        sentence = item.sentence
        before = '<script>alert("x")</script> 👩\u200d👩\u200d👧 \u202eevil\u202c '
        caption = before + sentence + " </mark><b>bold</b> &amp; ✓"
        start = len(before)
        db.conn.execute(
            "UPDATE items SET caption = ?, char_start = ?, char_end = ? WHERE item_id = ?",
            (caption, start, start + len(sentence), item.item_id),
        )
    name = '<img src=x onerror="alert(1)">'
    page = client.get("/", params={"annotator": name})
    assert "<script>alert" not in page.text and "<img src=x" not in page.text and "<b>bold" not in page.text
    assert "&lt;img src=x" in page.text  # the name, shown escaped
    state = _embedded_state(page.text)
    assert state["annotator"] == name
    shown = state["item"]
    assert shown["item_id"] == item.item_id
    # Code-point offsets cut on the server: the emoji before the sentence cannot shift the highlight.
    assert shown["caption_span"] == sentence and shown["sentence"] is None
    assert shown["caption_before"] + shown["caption_span"] + shown["caption_after"] == caption
    assert shown["hidden_chars"] == 4  # two zero-width joiners, one override, one pop
    assert client.get("/api/next", params={"annotator": name}).json()["item"] == shown


def test_a_span_that_does_not_hold_the_sentence_shows_the_sentence_too(client, audit_db):
    with _db(audit_db) as db:
        item = db.next_item("alice")
        db.conn.execute("UPDATE items SET char_start = 0, char_end = 3 WHERE item_id = ?", (item.item_id,))
    shown = client.get("/api/next", params={"annotator": "alice"}).json()["item"]
    assert shown["caption_span"] == item.caption[:3] and shown["sentence"] == item.sentence


# -- labelling, undo, skip -----------------------------------------------------------------------------
def test_a_verdict_appends_one_event_and_returns_the_next_pair(client, audit_db):
    state = client.get("/api/next", params={"annotator": "alice"}).json()
    first, peek = state["item"]["item_id"], state["peek"]["item_id"]
    assert state["progress"]["items"] == 40 and state["progress"]["mine"] == 0
    r = _label(client, first, "wrong")
    assert r.status_code == 200, r.text
    after = r.json()
    assert after["item"]["item_id"] == peek != first  # the preload hint was the pair that came next
    assert after["progress"]["mine"] == 1 and after["progress"]["done"] == 1
    assert sum(s["mine"] for s in after["progress"]["strata"]) == 1
    with _db(audit_db) as db:
        (event,) = db.events()
        assert db.verdicts() == {first: {"alice": "wrong"}}
    assert event["item_id"] == first and event["annotator"] == "alice" and event["event"] == "wrong"
    assert event["seconds_spent"] == 1.5 and event["source"] == "web"


def test_the_preload_hint_is_always_the_pair_that_comes_next(client, audit_db):
    state = client.get("/api/next", params={"annotator": "alice"}).json()
    for k in range(12):
        action = ("label", "skip", "undo")[k % 3]
        if action == "label":
            r = _label(client, state["item"]["item_id"])
        elif action == "skip":
            r = client.post("/api/skip", json={"item_id": state["item"]["item_id"], "annotator": "alice"})
        else:
            r = client.post("/api/undo", json={"annotator": "alice"})
        peek = r.json()["peek"]
        state = r.json()
        if action != "undo":
            with _db(audit_db) as db:
                upcoming = web._upcoming(db, "alice", 2)
                assert upcoming[0][0] == db.next_item("alice").item_id == state["item"]["item_id"]
                assert peek["item_id"] == upcoming[1][0]
        _label(client, state["item"]["item_id"], who="bob")  # another annotator reorders the queue


def test_undo_returns_the_last_pair_and_retracts_its_verdict(client, audit_db):
    a = client.get("/api/next", params={"annotator": "alice"}).json()["item"]["item_id"]
    b = _label(client, a, "correct").json()["item"]["item_id"]
    c = _label(client, b, "unsure").json()["item"]["item_id"]
    undone = client.post("/api/undo", json={"annotator": "alice"}).json()
    assert undone["undone"] == b and undone["item"]["item_id"] == b
    assert undone["peek"]["item_id"] == c  # the pair on screen before the undo comes after it again
    assert undone["progress"]["mine"] == 1
    with _db(audit_db) as db:
        assert db.verdicts() == {a: {"alice": "correct"}}
    assert client.post("/api/undo", json={"annotator": "alice"}).json()["undone"] == a
    nothing = client.post("/api/undo", json={"annotator": "alice"}).json()
    assert nothing["undone"] is None and nothing["item"] is not None
    with _db(audit_db) as db:
        assert db.verdicts() == {}
        assert [e["event"] for e in db.events()] == ["correct", "unsure", "undo", "undo"]
    # Labelled again after the undo: the new verdict is the one in force.
    _label(client, b, "wrong")
    with _db(audit_db) as db:
        assert db.verdicts() == {b: {"alice": "wrong"}}


def test_skip_moves_the_pair_behind_all_the_others(client, audit_db):
    skipped = client.get("/api/next", params={"annotator": "alice"}).json()["item"]["item_id"]
    state = client.post(
        "/api/skip", json={"item_id": skipped, "annotator": "alice", "seconds_spent": 0.2}
    ).json()
    order = []
    while state["item"] is not None:
        order.append(state["item"]["item_id"])
        state = _label(client, order[-1]).json()
    assert len(order) == 40 and order[-1] == skipped and len(set(order)) == 40
    with _db(audit_db) as db:
        assert db.events()[0]["event"] == "skip" and db.events()[0]["seconds_spent"] == 0.2


def test_the_done_state_counts_the_pairs_and_names_the_next_command(client, audit_db):
    with _db(audit_db) as db:
        ids = [it.item_id for it in db.items()]
        pairs_dir = db.meta()["pairs_dir"]
    for item_id in ids[:-1]:
        assert _label(client, item_id, who="bob").status_code == 200
    last = _label(client, ids[-1], who="bob").json()
    assert last["item"] is None and last["peek"] is None
    assert last["done"]["labelled"] == 40 == last["done"]["items"]
    command = last["done"]["command"]
    assert last["done"]["command_lines"].replace(" \\\n    ", " ") == command
    assert command.startswith(
        f"python -m qa.audit fit --db {Path(audit_db).resolve()} --pairs {pairs_dir} --out "
    )
    page = client.get("/?annotator=bob")
    assert _embedded_state(page.text)["done"]["command"] == command
    # Someone else still has every pair to do.
    assert client.get("/api/next", params={"annotator": "alice"}).json()["done"] is None


# -- bad input ---------------------------------------------------------------------------------------------
def test_an_unknown_pair_id_is_404_naming_it(client, audit_db):
    for r in (
        _label(client, 987654),
        client.post("/api/skip", json={"item_id": 987654, "annotator": "alice"}),
        client.get("/api/mask/987654.png"),
    ):
        assert r.status_code == 404 and "987654" in r.json()["detail"]
    with _db(audit_db) as db:
        assert db.events() == []


def test_bad_requests_say_what_is_allowed_and_record_nothing(client, audit_db):
    item_id = client.get("/api/next", params={"annotator": "alice"}).json()["item"]["item_id"]
    r = _label(client, item_id, "maybe")
    assert (
        r.status_code == 422
        and "correct, wrong, unsure" in r.json()["detail"]
        and "maybe" in r.json()["detail"]
    )
    assert _label(client, item_id, "skip").status_code == 422  # skip and undo have their own endpoints
    for who in (None, "", "   "):
        r = client.post("/api/label", json={"item_id": item_id, "verdict": "correct", "annotator": who})
        assert r.status_code == 400 and "annotator" in r.json()["detail"]
    assert client.get("/api/next").status_code == 400
    assert client.post("/api/undo", json={}).status_code == 400
    assert _label(client, item_id, who="x" * 101).status_code == 400
    for bad in ("3", 3.0, True, None):
        r = _label(client, bad)
        assert r.status_code == 422 and "item_id" in r.json()["detail"]
    for seconds in (-1, "abc", True):
        r = _label(client, item_id, seconds_spent=seconds)
        assert r.status_code == 422 and "seconds_spent" in r.json()["detail"]
    assert (
        client.post(
            "/api/label", content=b"{not json", headers={"content-type": "application/json"}
        ).status_code
        == 422
    )
    assert client.post("/api/label", json=[1, 2]).status_code == 422
    with _db(audit_db) as db:
        assert db.events() == []


def test_a_missing_database_fails_at_start_saying_how_to_make_one(tmp_path):
    with pytest.raises(AuditError, match="qa.audit sample"):
        web.create_app(tmp_path / "none.sqlite")


def test_a_taken_port_is_one_clear_error():
    sock = web._listen("127.0.0.1", 0)
    try:
        with pytest.raises(AuditError, match="another --port"):
            web._listen("127.0.0.1", sock.getsockname()[1])
    finally:
        sock.close()


# -- masks -------------------------------------------------------------------------------------------------
def test_the_mask_is_served_as_an_outline_png(client, audit_db):
    with _db(audit_db) as db:
        item = db.next_item("alice")
        mask = np.zeros((256, 128), dtype=bool)
        mask[100:180, 20:90] = True
        db.conn.execute(
            "UPDATE items SET mask_rle = ? WHERE item_id = ?", (json.dumps(encode_mask(mask)), item.item_id)
        )
    shown = client.get("/api/next", params={"annotator": "alice"}).json()["item"]
    assert shown["mask_url"] == f"/api/mask/{item.item_id}.png"
    r = client.get(shown["mask_url"])
    assert (
        r.status_code == 200
        and r.headers["content-type"] == "image/png"
        and "max-age" in r.headers["cache-control"]
    )
    alpha = np.asarray(Image.open(BytesIO(r.content)).convert("RGBA"))[..., 3]
    assert alpha.shape == (256, 128)
    assert alpha[100, 50] == 255 and alpha[179, 50] == 255 and alpha[140, 20] == 255  # the boundary
    assert 0 < alpha[140, 50] < 255  # the inside: a light tint
    assert alpha[50, 50] == 0 and alpha[140, 100] == 0  # outside: clear
    with _db(audit_db) as db:
        other = next(it for it in db.items() if not it.mask_rle)
    r = client.get(f"/api/mask/{other.item_id}.png")
    assert r.status_code == 404 and "no mask" in r.json()["detail"]


# -- images ------------------------------------------------------------------------------------------------
@pytest.fixture
def own_root(audit_db, tmp_path) -> Path:
    """A private copy of the dataset as the audit's image root (the session's dataset is shared), with one
    pair's image moved to a path that needs URL quoting."""
    with _db(audit_db) as db:
        src = Path(db.meta()["image_root"])
        root = (tmp_path / "root").resolve()
        shutil.copytree(src / "imgs", root / "imgs")
        item = db.items()[0]
        odd = "imgs/with space/ü #1?.png"
        (root / odd).parent.mkdir(parents=True)
        shutil.copy(root / item.image_path, root / odd)
        db.conn.execute("UPDATE items SET image_path = ? WHERE item_id = ?", (odd, item.item_id))
        db.set_meta({"image_root": str(root)})
    return root


def test_images_are_served_from_the_root_with_their_type_and_a_cache_header(client, audit_db, own_root):
    with _db(audit_db) as db:
        items = db.items()[:3]
    for item in items:
        url = web._item_json(item)["image_url"]
        r = client.get(url)
        assert r.status_code == 200, (url, r.text)
        assert r.content == (own_root / item.image_path).read_bytes()
        assert r.headers["content-type"] == "image/png"
        assert "max-age" in r.headers["cache-control"]
    assert "%20" in web._item_json(items[0])["image_url"] and "%3F" in web._item_json(items[0])["image_url"]


def test_only_images_of_the_sample_are_served(client, audit_db, own_root):
    with _db(audit_db) as db:
        used = {it.image_path for it in db.items()}
    unused = next(p for p in sorted(own_root.rglob("*.png")) if str(p.relative_to(own_root)) not in used)
    r = client.get(f"/images/{unused.relative_to(own_root)}")
    assert r.status_code == 404 and "no pair" in r.json()["detail"]
    assert client.get("/images/imgs").status_code == 404  # a folder
    assert client.get("/images/").status_code == 404


def test_paths_out_of_the_root_are_404_and_open_nothing_outside_it(
    client, audit_db, own_root, tmp_path, monkeypatch
):
    outside = (tmp_path / "outside").resolve()
    outside.mkdir()
    secret = outside / "secret.png"
    secret.write_bytes(b"SECRET-BYTES")
    with _db(audit_db) as db:
        items = db.items()
    # One pair's image swapped for a symlink out of the root after sampling; another pair's folder
    # swapped for a symlink to an outside folder holding a file of the same name; a link that no pair uses.
    swapped = items[1]
    (own_root / swapped.image_path).unlink()
    (own_root / swapped.image_path).symlink_to(secret)
    by_folder = next(it for it in items[2:] if Path(it.image_path).parent != Path(swapped.image_path).parent)
    folder = own_root / Path(by_folder.image_path).parent
    shutil.copytree(folder, outside / "folder")
    shutil.rmtree(folder)
    folder.symlink_to(outside / "folder")
    (outside / "folder" / Path(by_folder.image_path).name).write_bytes(b"SECRET-BYTES")
    (own_root / "imgs" / "evil.png").symlink_to(secret)
    relative_secret = "%2e%2e/outside/secret.png"
    lexical = [
        "/images/%2e%2e/%2e%2e/etc/passwd",
        "/images/%2E%2E/%2E%2E/etc/passwd",
        "/images/..%2f..%2fetc%2fpasswd",
        "/images/imgs/%2e%2e/%2e%2e/etc/passwd",
        f"/images/{relative_secret}",
        "/images//etc/passwd",
        "/images/%2Fetc%2Fpasswd",
        f"/images/{secret}",
        "/images/imgs%5c..%5c..%5cetc%5cpasswd",
        "/images/imgs/%00/secret.png",
        "/images/secret.png%00.png",
        "/images/%2e/imgs/evil.png",
        "/images/imgs//evil.png",
    ]
    linked = [
        web._item_json(swapped)["image_url"],
        web._item_json(by_folder)["image_url"],
        "/images/imgs/evil.png",
        "/images/%252e%252e/%252e%252e/etc/passwd",  # decoded once only: a literal name, no pair's
    ]
    fine = next(
        it
        for it in items[2:]
        if Path(it.image_path).parent != Path(by_folder.image_path).parent
        and it.image_path != swapped.image_path
    )
    ok = web._item_json(fine)["image_url"]
    assert client.get(ok).status_code == 200  # warm: imports and first-request work happen outside the record
    assert client.get(linked[0]).status_code == 404
    access = audit.install(monkeypatch)
    with access.recording():
        lexical_answers = [client.get(url) for url in lexical]
    for url, r in zip(lexical, lexical_answers, strict=True):
        assert r.status_code == 404, url
        assert b"SECRET" not in r.content and b"root:" not in r.content
    # Refused on the path alone: not one system call on any file, inside the root or out.
    assert access.events == []
    with access.recording():
        linked_answers = [client.get(url) for url in linked]
        assert client.get(ok).status_code == 200  # the record does see what the app opens
    for url, r in zip(linked, linked_answers, strict=True):
        assert r.status_code == 404, url
        assert b"SECRET" not in r.content
    opened = [p for e, p in access.events if e == "open"]
    assert str(own_root / fine.image_path) in opened
    assert [p for p in opened if not p.startswith(str(own_root) + "/")] == []
    # Outside the root only lstat / stat / readlink of the links' targets (how an escape is seen).
    assert {e for e, _ in access.outside(own_root, Path(audit_db).parent)} <= {
        "os.lstat",
        "os.stat",
        "os.readlink",
    }

    # Raw `..` and `.` in the request line (httpx removes dot segments before sending) through a real server.
    with running_server(client.app) as port, access.recording():
        for target in (
            "/images/../../etc/passwd",
            "/images/imgs/../../outside/secret.png",
            "/images/./imgs/evil.png",
            f"/images/{secret}",
        ):
            status, body = _raw_get(port, target)
            assert status == 404 and b"SECRET" not in body and b"root:" not in body
    assert [(e, p) for e, p in access.events if "passwd" in p or (e == "open" and str(outside) in p)] == []


# -- several annotators at once --------------------------------------------------------------------------------
def test_annotators_labelling_at_once_lose_no_label(audit_db):
    """8 annotators, each 30 verdicts as fast as they can, through a real server: all 240 are stored."""
    app = web.create_app(audit_db)
    n_threads, n_labels = 8, 30
    start = threading.Barrier(n_threads)

    def annotate(k: int) -> list[int]:
        who = f"annotator-{k}"
        labelled = []
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
            state = http.get("/api/next", params={"annotator": who}).json()
            start.wait()
            for j in range(n_labels):
                item_id = state["item"]["item_id"]
                body = {
                    "item_id": item_id,
                    "verdict": ("correct", "wrong", "unsure")[j % 3],
                    "annotator": who,
                }
                r = http.post("/api/label", json=body | {"seconds_spent": 0.01})
                assert r.status_code == 200, r.text
                labelled.append(item_id)
                state = r.json()
        return labelled

    with running_server(app) as port, ThreadPoolExecutor(n_threads) as pool:
        results = list(pool.map(annotate, range(n_threads)))
    with _db(audit_db) as db:
        events = db.events()
        verdicts = db.verdicts()
    assert len(events) == n_threads * n_labels
    for k, labelled in enumerate(results):
        who = f"annotator-{k}"
        assert len(set(labelled)) == n_labels  # never shown a pair they had already labelled
        mine = [e for e in events if e["annotator"] == who]
        assert sorted(e["item_id"] for e in mine) == sorted(labelled)
        assert [e["event"] for e in sorted(mine, key=lambda e: e["label_id"])] == [
            ("correct", "wrong", "unsure")[j % 3] for j in range(n_labels)
        ]
        assert sum(who in by for by in verdicts.values()) == n_labels
