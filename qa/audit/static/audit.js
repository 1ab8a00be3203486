// The labelling page (qa/audit/web.py serves it): shows one pair, sends one event per key press, and
// swaps in the next pair from the JSON answer without reloading the page.
//
// Consumes the state the server embeds in #audit-state and returns from /api/*: {annotator, item, peek,
// progress, done[, undone]}. Produces label / skip / undo events with the seconds from the pair being
// shown to the key press. Text goes in with textContent only (captions may hold any markup).
//
// window.__auditRendered is set each time a pair (or the done screen) is fully on screen: its image
// decoded and its sentence shown. bench/audit_ui.py reads it to time key press -> next pair rendered.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const initial = JSON.parse($("audit-state").textContent);
  const annotator = initial.annotator;

  const KEYS = {
    1: "correct", y: "correct",
    2: "wrong", n: "wrong",
    3: "unsure", u: "unsure",
    z: "undo", backspace: "undo",
    s: "skip",
  };
  const VERDICTS = new Set(["correct", "wrong", "unsure"]);
  const CROP_MARGIN = 0.12; // share of the box added around it in the enlarged view, for context

  const state = {
    item: null,
    shownAt: 0, // performance.now() when the current pair was fully on screen
    busy: true, // no key counts before the first pair is shown, nor while an answer is pending
    token: 0, // the latest render; an older one that finishes late is dropped
    renders: 0,
    preloaded: [], // keep the preload Image objects alive until they are used
  };

  const els = {
    pair: $("pair"), done: $("done"), notice: $("notice"),
    wholeFrame: $("whole-frame"), wholeStage: $("whole-stage"), wholeImg: $("whole-img"), wholeSvg: $("whole-svg"),
    cropFrame: $("crop-frame"), cropStage: $("crop-stage"), cropImg: $("crop-img"), cropSvg: $("crop-svg"),
    before: $("cap-before"), span: $("cap-span"), after: $("cap-after"),
    sentenceNote: $("sentence-note"), hiddenNote: $("hidden-note"),
    regionLabel: $("region-label"), pairKey: $("pair-key"),
    mine: $("progress-mine"), all: $("progress-all"), bar: $("progress-bar"), strata: $("strata-rows"),
    doneCount: $("done-count"), doneItems: $("done-items"), doneCommand: $("done-command"),
  };

  let noticeTimer = 0;
  function notice(text, isError = false) {
    els.notice.textContent = text;
    els.notice.classList.toggle("error", isError);
    els.notice.hidden = false;
    clearTimeout(noticeTimer);
    noticeTimer = setTimeout(() => { els.notice.hidden = true; }, isError ? 8000 : 2500);
  }

  function showProgress(p) {
    els.mine.textContent = `${p.mine} of ${p.items}`;
    els.all.textContent = `${p.done}`;
    els.bar.style.width = p.items ? `${(100 * p.mine) / p.items}%` : "0";
    const rows = p.strata.map((s) => {
      const tr = document.createElement("tr");
      for (const v of [s.stratum, s.mine, s.done, s.items]) {
        const td = document.createElement("td");
        td.textContent = String(v);
        tr.append(td);
      }
      return tr;
    });
    els.strata.replaceChildren(...rows);
  }

  // Place the W x H image (and its SVG, same coordinates) in `frame` so that the view window
  // [x0, y0, x1, y1] (image pixels) fills it, centred, at the aspect ratio of the image.
  function place(frame, stage, svg, w, h, view) {
    const fw = frame.clientWidth;
    const fh = frame.clientHeight;
    const vw = Math.max(1, view[2] - view[0]);
    const vh = Math.max(1, view[3] - view[1]);
    const s = Math.min(fw / vw, fh / vh);
    stage.style.width = `${w * s}px`;
    stage.style.height = `${h * s}px`;
    stage.style.left = `${(fw - vw * s) / 2 - view[0] * s}px`;
    stage.style.top = `${(fh - vh * s) / 2 - view[1] * s}px`;
    svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  }

  function drawOverlay(svg, item, w, h) {
    const [x0, y0, x1, y1] = item.bbox_xyxy;
    const rect = svg.querySelector("rect.box");
    rect.setAttribute("x", x0);
    rect.setAttribute("y", y0);
    rect.setAttribute("width", Math.max(0, x1 - x0));
    rect.setAttribute("height", Math.max(0, y1 - y0));
    const mask = svg.querySelector("image.mask");
    if (item.mask_url) {
      mask.setAttribute("href", item.mask_url);
      mask.setAttribute("width", w);
      mask.setAttribute("height", h);
      mask.style.display = "";
    } else {
      mask.removeAttribute("href");
      mask.style.display = "none";
    }
  }

  function showText(item) {
    els.before.textContent = item.caption_before;
    els.span.textContent = item.caption_span;
    els.after.textContent = item.caption_after;
    els.sentenceNote.hidden = item.sentence === null;
    if (item.sentence !== null) els.sentenceNote.textContent = `the mined sentence reads: ${item.sentence}`;
    els.hiddenNote.hidden = !item.hidden_chars;
    if (item.hidden_chars) {
      els.hiddenNote.textContent =
        `this caption holds ${item.hidden_chars} invisible or control character(s) (zero-width, bidi)`;
    }
    els.regionLabel.textContent = item.region_label ? `region: ${item.region_label}` : "";
    els.pairKey.textContent = `${item.sample_id} · sentence ${item.sentence_index} · region ${item.region_id}`;
  }

  async function decoded(img, url) {
    if (img.getAttribute("src") !== url) img.src = url;
    try {
      await img.decode();
      return true;
    } catch {
      return false;
    }
  }

  // Everything of the new pair goes on screen at once, after its image is decoded, so the old image is
  // never seen with the new box or sentence.
  async function showItem(item) {
    const token = ++state.token;
    const [ok] = await Promise.all([decoded(els.wholeImg, item.image_url), decoded(els.cropImg, item.image_url)]);
    if (token !== state.token) return false;
    // The browser's size is the displayed one (EXIF orientation applied), as bbox_xyxy is.
    const w = els.wholeImg.naturalWidth || item.image_width || 1;
    const h = els.wholeImg.naturalHeight || item.image_height || 1;
    showText(item);
    els.done.hidden = true;
    els.pair.hidden = false;
    place(els.wholeFrame, els.wholeStage, els.wholeSvg, w, h, [0, 0, w, h]);
    const [x0, y0, x1, y1] = item.bbox_xyxy;
    const mx = CROP_MARGIN * (x1 - x0);
    const my = CROP_MARGIN * (y1 - y0);
    place(els.cropFrame, els.cropStage, els.cropSvg, w, h, [x0 - mx, y0 - my, x1 + mx, y1 + my]);
    drawOverlay(els.wholeSvg, item, w, h);
    drawOverlay(els.cropSvg, item, w, h);
    if (!ok) notice(`the image ${item.image_url} did not load; label it unsure or skip it`, true);
    return true;
  }

  function showDone(done) {
    state.token++;
    els.pair.hidden = true;
    els.done.hidden = false;
    els.doneCount.textContent = String(done.labelled);
    els.doneItems.textContent = String(done.items);
    els.doneCommand.textContent = done.command_lines;
  }

  function preload(peek) {
    state.preloaded = [];
    if (!peek) return;
    for (const url of [peek.image_url, peek.mask_url]) {
      if (!url) continue;
      const img = new Image();
      img.src = url;
      img.decode().catch(() => {});
      state.preloaded.push(img);
    }
  }

  function afterPaint() {
    return new Promise((resolve) => requestAnimationFrame(() => setTimeout(resolve, 0)));
  }

  async function render(data, timing) {
    showProgress(data.progress);
    let itemId = null;
    if (data.item) {
      if (!(await showItem(data.item))) return;
      itemId = data.item.item_id;
    } else {
      showDone(data.done);
    }
    state.item = data.item;
    preload(data.peek);
    await afterPaint();
    state.shownAt = performance.now();
    document.body.dataset.itemId = itemId === null ? "done" : String(itemId);
    state.renders += 1;
    window.__auditRendered = {
      itemId,
      count: state.renders,
      keyAt: timing.keyAt,
      answerAt: timing.answerAt,
      renderedAt: state.shownAt,
      latencyMs: timing.keyAt === null ? null : state.shownAt - timing.keyAt,
    };
  }

  async function post(url, body) {
    let res;
    try {
      res = await fetch(url, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body),
      });
    } catch {
      throw new Error("the audit server does not answer; is `python -m qa.audit serve` still running?");
    }
    const data = await res.json().catch(() => ({ detail: `${res.status} ${res.statusText}` }));
    if (!res.ok) throw new Error(typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail));
    return data;
  }

  async function act(action, keyAt) {
    if (state.busy) return;
    if (action !== "undo" && !state.item) return; // the done screen: only undo does anything
    state.busy = true;
    document.body.classList.add("busy");
    try {
      const seconds = Math.max(0, Math.round(keyAt - state.shownAt) / 1000);
      let data;
      if (VERDICTS.has(action)) {
        data = await post("/api/label", {
          item_id: state.item.item_id, verdict: action, annotator, seconds_spent: seconds,
        });
      } else if (action === "skip") {
        data = await post("/api/skip", { item_id: state.item.item_id, annotator, seconds_spent: seconds });
      } else {
        data = await post("/api/undo", { annotator });
        if (data.undone === null) {
          notice("nothing to undo");
          return;
        }
        notice("verdict taken back");
      }
      await render(data, { keyAt, answerAt: performance.now() });
    } catch (err) {
      notice(err.message || String(err), true);
    } finally {
      state.busy = false;
      document.body.classList.remove("busy");
    }
  }

  document.addEventListener("keydown", (e) => {
    if (e.ctrlKey || e.metaKey || e.altKey || e.isComposing) return;
    if (e.target instanceof Element && e.target.closest("input, textarea, select, [contenteditable]")) return;
    const action = KEYS[e.key.toLowerCase()];
    if (!action) return;
    e.preventDefault();
    if (e.repeat) return; // a held key is one verdict, not a run of them
    act(action, e.timeStamp);
  });

  for (const button of document.querySelectorAll("button[data-action]")) {
    button.addEventListener("click", (e) => {
      button.blur(); // keys go to the page, not to a focused button
      act(button.dataset.action, e.timeStamp);
    });
  }

  // A resize changes the frames: lay the current pair out again (no event, no timer reset).
  let resizeTimer = 0;
  window.addEventListener("resize", () => {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(() => { if (state.item && !state.busy) showItem(state.item); }, 100);
  });

  render(initial, { keyAt: null, answerAt: null })
    .catch((err) => notice(err.message || String(err), true))
    .finally(() => { state.busy = false; });
})();
