"""The labelling web app: one pair at a time, a verdict per key press, every event into the audit database.

Consumes an audit database (qa.audit.db, made by `python -m qa.audit sample`) and the run's images under
its `image_root`; produces label events (`correct | wrong | unsure | skip | undo`, source `web`) with the
annotator and the seconds spent on the pair. `python -m qa.audit serve --db audit.sqlite` runs it
(`serve` below) on 127.0.0.1 by default: the app has no authentication.

Endpoints (errors are JSON `{"detail": message}`):

- `GET /` — the page (`?annotator=NAME`, else the server's `--annotator`, else a name form first).
- `GET /api/next?annotator=NAME` — the state: `item` (the pair to show), `peek` (the pair after it, for
  preloading its image), `progress` (db.progress) and `done` (pairs labelled and the next command) once
  every pair has this annotator's verdict.
- `POST /api/label` `{item_id, verdict, annotator, seconds_spent}` — one verdict event; returns the state.
  `verdict` is one of correct | wrong | unsure (422 naming them otherwise).
- `POST /api/skip` `{item_id, annotator}` — a skip event (the pair goes behind the others in this
  annotator's queue); returns the state.
- `POST /api/undo` `{annotator}` — retracts the annotator's latest verdict in force; returns the state
  with that pair as `item` and `undone` its id (null when there was nothing to undo).
- `GET /api/mask/{item_id}.png` — the region's mask as a transparent PNG: its outline and a light fill.
- `GET /images/{path}` — one image of the run: only a path that is some pair's `image_path`, only from
  inside the dataset root (lexical refusal first, then `miners.images.contained_path`); else 404.
- `GET /static/{file}` — the page's own JS and CSS; nothing is loaded from anywhere else (offline).

An unknown pair id is 404 naming it; a missing annotator 400; a bad field 422 saying what is allowed.

What the model thinks of a pair (reliability, keep flag, inclusion probability, stratum) never leaves
the server, so the reviewer is not anchored: the item JSON is built from a whitelist (`_item_json`).
Each request opens its own AuditDB (SQLite WAL, one connection per request, never shared) and each
event is one INSERT in its own transaction, so annotators labelling at once never lose a label.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import mimetypes
import shlex
import socket
import unicodedata
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
from fastapi import Body, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from PIL import Image

from miners.images import ImageLoadError, check_regular_file, contained_path
from qa.audit.db import VERDICTS, AuditDB, AuditError, Item, UnknownItemError
from storage.rle import decode_mask

HERE = Path(__file__).resolve().parent
TEMPLATES = HERE / "templates"
STATIC = HERE / "static"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
MAX_ANNOTATOR_CHARS = 100
# Images of a run do not change while it is audited; an hour of browser cache makes a second look free.
IMAGE_CACHE = "private, max-age=3600"
# Types mimetypes may not know on every platform; anything else falls back to mimetypes.
IMAGE_TYPES = {
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".webp": "image/webp",
    ".bmp": "image/bmp",
    ".gif": "image/gif",
    ".tif": "image/tiff",
    ".tiff": "image/tiff",
    ".avif": "image/avif",
}
# Page policy: only this server's own scripts, styles and images (no CDN, no fonts, works offline).
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
MASK_RGB = (0, 229, 255)  # cyan: apart from the box's red in every colour-vision type


class _JSON(JSONResponse):
    """ASCII JSON (a stray surrogate in a caption cannot break the encoding), never cached."""

    def __init__(self, content: Any, status_code: int = 200, **kwargs):
        super().__init__(content, status_code=status_code, **kwargs)
        self.headers.setdefault("Cache-Control", "no-store")

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


# -- what the page sees -----------------------------------------------------------------------------------
def _hidden_chars(text: str) -> int:
    """Format and control characters (zero-width, bidi overrides, C0/C1) other than line breaks and tabs:
    the page says how many a caption holds, since they can change how it reads without being seen."""
    return sum(1 for c in text if c not in "\n\t" and unicodedata.category(c) in ("Cf", "Cc"))


def image_url(image_path: str) -> str:
    return "/images/" + quote(image_path, safe="/")


def _item_json(item: Item) -> dict:
    """The pair as the page shows it: a whitelist, so nothing of the model's view can slip in."""
    caption = item.caption
    # The span is cut here, in code points: JS strings index UTF-16 units, so an emoji before the
    # sentence would shift the highlight if the browser cut it.
    start = max(0, min(int(item.char_start), len(caption)))
    end = max(start, min(int(item.char_end), len(caption)))
    span = caption[start:end]
    return {
        "item_id": item.item_id,
        "sample_id": item.sample_id,
        "sentence_index": item.sentence_index,
        "region_id": item.region_id,
        "region_label": item.region_label,
        "image_url": image_url(item.image_path),
        "image_width": item.image_width,
        "image_height": item.image_height,
        "bbox_xyxy": [float(v) for v in item.bbox_xyxy],
        "mask_url": f"/api/mask/{item.item_id}.png" if item.mask_rle else None,
        "caption_before": caption[:start],
        "caption_span": span,
        "caption_after": caption[end:],
        # Only when the span does not hold the mined sentence (a caption without its manifest row):
        # the reviewer then sees what was scored as well.
        "sentence": None if span == item.sentence else item.sentence,
        "hidden_chars": _hidden_chars(caption),
    }


def _upcoming(db: AuditDB, annotator: str, limit: int) -> list[tuple[int, str, bool]]:
    """(item id, image path, has mask) of the annotator's next `limit` items (AuditDB.next_items): only
    the preload hint comes from here."""
    return [(it.item_id, it.image_path, bool(it.mask_rle)) for it in db.next_items(annotator, limit)]


def fit_command(db_path: Path, meta: dict[str, str], sep: str = " ") -> str:
    """The command to run once the sample is labelled (absolute paths: it may run from anywhere);
    the done screen shows it with `sep` a backslash-newline, one option a line."""
    db_path = Path(db_path).resolve()
    pairs = meta.get("pairs_dir") or "SHARDS"
    out = db_path.with_name(f"{db_path.stem}-fit")
    parts = [
        "python -m qa.audit fit",
        f"--db {shlex.quote(str(db_path))}",
        f"--pairs {shlex.quote(pairs)}",
        f"--out {shlex.quote(str(out))}",
    ]
    return sep.join(parts)


def _state(db: AuditDB, annotator: str, show: Item | None = None) -> dict:
    """What the page needs after any action: the pair to show (`show`, else the annotator's next),
    the pair after it for preloading, progress, and the done screen's figures when nothing is left."""
    item = show if show is not None else db.next_item(annotator)
    peek = None
    if item is not None:
        for item_id, path, has_mask in _upcoming(db, annotator, 2):
            if item_id != item.item_id:
                peek = {
                    "item_id": item_id,
                    "image_url": image_url(path),
                    "mask_url": f"/api/mask/{item_id}.png" if has_mask else None,
                }
                break
    progress = db.progress(annotator)
    done = None
    if item is None:
        meta = db.meta()
        done = {
            "labelled": progress["mine"],
            "items": progress["items"],
            "command": fit_command(db.path, meta),
            "command_lines": fit_command(db.path, meta, sep=" \\\n    "),
        }
    return {
        "annotator": annotator,
        "item": _item_json(item) if item is not None else None,
        "peek": peek,
        "progress": progress,
        "done": done,
    }


# -- request checks ---------------------------------------------------------------------------------------
def _annotator(value: Any, default: str | None) -> str:
    name = default if value is None or value == "" else value
    if not isinstance(name, str) or not name.strip():
        raise HTTPException(400, 'an annotator name is required: ?annotator=NAME or "annotator" in the body')
    name = name.strip()
    if len(name) > MAX_ANNOTATOR_CHARS:
        raise HTTPException(400, f"an annotator name is at most {MAX_ANNOTATOR_CHARS} characters")
    return name


def _item_id(body: dict) -> int:
    value = body.get("item_id")
    if not isinstance(value, int) or isinstance(value, bool):
        raise HTTPException(422, f"item_id must be an integer pair id, got {value!r}")
    return value


def _seconds(body: dict) -> float | None:
    value = body.get("seconds_spent")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise HTTPException(422, f"seconds_spent must be a number of seconds >= 0, got {value!r}")
    return float(value)


def _safe_relative(path: str) -> bool:
    """A plain relative path: no leading '/', no '.', '..' or empty segment, no backslash, no NUL or
    other control character. Checked on the decoded path (Starlette has already turned %2e%2e and %2f
    into '..' and '/'), before any system call."""
    if not path or path.startswith("/") or "\\" in path or any(ord(c) < 32 or ord(c) == 127 for c in path):
        return False
    return all(part not in ("", ".", "..") for part in path.split("/"))


# -- mask outline -------------------------------------------------------------------------------------------
def _erode(mask: np.ndarray) -> np.ndarray:
    """4-neighbour erosion; pixels beyond the image count as outside the mask."""
    out = mask.copy()
    out[1:, :] &= mask[:-1, :]
    out[:-1, :] &= mask[1:, :]
    out[:, 1:] &= mask[:, :-1]
    out[:, :-1] &= mask[:, 1:]
    out[0, :] = out[-1, :] = False
    out[:, 0] = out[:, -1] = False
    return out


def outline_png(mask_rle: str) -> bytes:
    """RGBA PNG the size of the mask: the boundary opaque, the inside a light tint, the rest clear. The
    line is thicker on big images so that it stays visible once the page scales the image down."""
    mask = decode_mask(mask_rle)
    h, w = mask.shape
    inner = mask
    for _ in range(max(1, round(max(h, w) / 300))):
        inner = _erode(inner)
    rgba = np.zeros((h, w, 4), dtype=np.uint8)
    rgba[..., :3] = MASK_RGB
    rgba[..., 3] = np.where(mask & ~inner, 255, np.where(mask, 48, 0))
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


# -- the app ------------------------------------------------------------------------------------------------
def _static_versions() -> dict[str, str]:
    # Content hashes in the static URLs: a changed script is fetched again, an unchanged one is cached.
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()[:12] for p in STATIC.iterdir() if p.is_file()}


def create_app(db_path: str | Path, annotator: str | None = None) -> FastAPI:
    """The app for one audit database; `annotator` is the name used when a request names none."""
    db_path = Path(db_path)
    AuditDB(db_path).close()  # fail now, with the message saying how to make one, not on the first page
    default = annotator.strip() if annotator and annotator.strip() else None
    versions = _static_versions()
    templates = Jinja2Templates(directory=str(TEMPLATES))
    templates.env.globals["static"] = lambda name: f"/static/{name}?v={versions.get(name, '0')}"

    app = FastAPI(
        title="pair audit", default_response_class=_JSON, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")

    @app.exception_handler(UnknownItemError)
    def _unknown_item(request: Request, exc: UnknownItemError) -> _JSON:
        return _JSON({"detail": str(exc)}, status_code=404)

    @app.exception_handler(AuditError)
    def _audit_error(request: Request, exc: AuditError) -> _JSON:
        return _JSON({"detail": str(exc)}, status_code=400)

    @app.get("/", response_class=HTMLResponse)
    def page(request: Request, annotator: str | None = None, change: int = 0) -> HTMLResponse:
        name = (annotator or "").strip() or ("" if change else default or "")
        if not name or len(name) > MAX_ANNOTATOR_CHARS:
            # `?change=1` is the page's "not you?" link: the form even when the server has a default name.
            error = f"a name is at most {MAX_ANNOTATOR_CHARS} characters" if name else None
            context = {"error": error, "name": name[:MAX_ANNOTATOR_CHARS] or default or ""}
            response = templates.TemplateResponse(request, "name.html", context)
        else:
            with AuditDB(db_path) as db:
                state = _state(db, name)
            context = {"annotator": name, "state": state, "db_name": db_path.name}
            response = templates.TemplateResponse(request, "label.html", context)
        response.headers["Content-Security-Policy"] = CSP
        response.headers["Cache-Control"] = "no-store"
        response.headers["Referrer-Policy"] = "no-referrer"
        return response

    @app.get("/api/next")
    def next_pair(annotator: str | None = None) -> dict:
        name = _annotator(annotator, default)
        with AuditDB(db_path) as db:
            return _state(db, name)

    @app.post("/api/label")
    def label(body: dict[str, Any] = Body(...)) -> dict:
        name = _annotator(body.get("annotator"), default)
        verdict = body.get("verdict")
        if verdict not in VERDICTS:
            raise HTTPException(422, f"verdict must be one of {', '.join(VERDICTS)}; got {verdict!r}")
        item_id, seconds = _item_id(body), _seconds(body)
        with AuditDB(db_path) as db:
            db.add_event(item_id, name, verdict, seconds_spent=seconds, source="web")
            return _state(db, name)

    @app.post("/api/skip")
    def skip(body: dict[str, Any] = Body(...)) -> dict:
        name = _annotator(body.get("annotator"), default)
        item_id, seconds = _item_id(body), _seconds(body)
        with AuditDB(db_path) as db:
            db.add_event(item_id, name, "skip", seconds_spent=seconds, source="web")
            return _state(db, name)

    @app.post("/api/undo")
    def undo(body: dict[str, Any] = Body(...)) -> dict:
        name = _annotator(body.get("annotator"), default)
        with AuditDB(db_path) as db:
            item_id = db.undo_last(name)
            state = _state(db, name, show=db.item(item_id) if item_id is not None else None)
            return state | {"undone": item_id}

    @app.get("/api/mask/{item_id:int}.png")
    def mask(item_id: int) -> Response:
        with AuditDB(db_path) as db:
            item = db.item(item_id)
        if not item.mask_rle:
            raise HTTPException(404, f"pair {item_id} has no mask")
        try:
            png = outline_png(item.mask_rle)
        except (ValueError, KeyError, TypeError) as exc:
            raise HTTPException(500, f"pair {item_id}: its mask RLE cannot be decoded ({exc})") from exc
        return Response(png, media_type="image/png", headers={"Cache-Control": IMAGE_CACHE})

    @app.get("/images/{image_path:path}")
    def image(image_path: str) -> FileResponse:
        # Lexical refusal first: a hostile path costs no system call at all.
        if not _safe_relative(image_path):
            raise HTTPException(
                404, "no such image: image paths are relative to the dataset root, without '..'"
            )
        with AuditDB(db_path) as db:
            root = db.meta().get("image_root") or ""
            known = db.conn.execute(
                "SELECT 1 FROM items WHERE image_path = ? LIMIT 1", (image_path,)
            ).fetchone()
        if not root:
            raise HTTPException(404, f"{db_path.name} names no image root, so no image can be shown")
        if known is None:
            raise HTTPException(404, f"no pair of this audit shows the image {image_path!r}")
        try:
            # The one containment rule of the project (the miner's): resolves inside the root, then a
            # regular file (stat only: a FIFO is never opened).
            path = contained_path(root, image_path)
            check_regular_file(path)
            target = path.resolve(strict=True)
        except (ImageLoadError, OSError, RuntimeError) as exc:
            raise HTTPException(404, f"image {image_path!r} cannot be served: {exc}") from exc
        media = IMAGE_TYPES.get(target.suffix.lower()) or mimetypes.guess_type(target.name)[0]
        return FileResponse(
            target,
            media_type=media or "application/octet-stream",
            headers={"Cache-Control": IMAGE_CACHE, "X-Content-Type-Options": "nosniff"},
        )

    return app


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket, so port 0 works (the URL printed is the port really bound) and a taken port
    is one clear line instead of a uvicorn traceback."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise AuditError(f"cannot listen on {host}:{port} ({exc.strerror}); pass another --port") from exc
    sock.listen(128)
    return sock


def serve(
    db_path: str | Path, host: str = "127.0.0.1", port: int = 8765, annotator: str | None = None
) -> None:
    """Run the app until Ctrl-C; prints the URL to open (port 0: any free port)."""
    import uvicorn

    app = create_app(db_path, annotator)
    sock = _listen(host, port)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{bound}/" + (f"?annotator={quote(annotator.strip())}" if annotator else "")
    print(f"audit: labelling {db_path} at {url}  (Ctrl-C to stop)", flush=True)
    if host not in LOCAL_HOSTS:
        print(
            f"audit: warning: listening on {host}; anyone who can reach it can label (no login)", flush=True
        )
    config = uvicorn.Config(app, log_level="warning", access_log=False)
    uvicorn.Server(config).run(sockets=[sock])
