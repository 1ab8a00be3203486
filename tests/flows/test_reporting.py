"""flows.reporting: the summary markdown, the failure message and the QA headline say what a run did."""

from __future__ import annotations

from flows.reporting import failure_message, qa_headline, summary_markdown


def _summary(**overrides) -> dict:
    summary = {
        "run_id": "r-1",
        "out": "/data/out",
        "finalized": True,
        "n_shards": 4,
        "shards_committed": 4,
        "shards_mined_now": 3,
        "shards_failed": {},
        "manifest_rows": 37,
        "ok_rows": 35,
        "mining_error_rows": 2,
        "status_counts": {"corrupt_image": 2, "ok": 35},
        "pairs": 140,
        "kept_pairs": 99,
        "images_per_s": 12.5,
        "wall_s": 9.0,
        "ray_start_s": 1.0,
        "workers_start_s": 2.0,
        "fanout_s": 5.0,
        "pool": "2 worker(s)",
    }
    return summary | overrides


def test_summary_markdown_holds_the_figures():
    md = summary_markdown(_summary())
    assert "run `r-1`: complete" in md
    assert "| manifest rows | 37 |" in md and "| ok rows / rows with mining errors | 35 / 2 |" in md
    assert "| pairs / kept | 140 / 99 |" in md and "| corrupt_image | 2 |" in md
    assert "Failed shards" not in md


def test_summary_markdown_shows_where_the_time_went():
    stage_s = {"load": 1.0, "regions": 1.0, "sentences": 0.5, "scoring": 6.0, "matching": 0.5, "tables": 0.5}
    md = summary_markdown(_summary(stage_s=stage_s | {"write": 0.5}, images_mined_now=100))
    assert "## Where the time went" in md
    assert "| scoring | 6.00 | 60% | 60.00 |" in md and "| write | 0.50 | 5% | 5.00 |" in md
    # A resumed run that mined nothing has no profile to show
    assert "Where the time went" not in summary_markdown(_summary(stage_s={}, images_mined_now=0))


def test_a_failed_run_names_its_shards_and_how_to_resume():
    summary = _summary(finalized=False, shards_committed=3, shards_failed={"2": "OSError: disk full"})
    md = summary_markdown(summary)
    assert "INCOMPLETE" in md and "- shard 2: `OSError: disk full`" in md and "Rerun" in md
    msg = failure_message(summary)
    assert msg.startswith("1 of 4 shards failed") and "shard 2: OSError: disk full" in msg
    assert "3 shards are committed in /data/out" in msg


def test_qa_headline_keeps_only_the_headline_keys():
    qa = {"pairs_total": 10, "pairs_kept": 7, "ece": 0.02, "histograms": {"x": []}}
    head = qa_headline(qa)
    assert head["pairs_total"] == 10 and head["ece"] == 0.02 and head["noise_rate_true"] is None
    assert "histograms" not in head


def test_a_run_that_mined_nothing_says_so_in_the_artifact_and_the_flow_log():
    """A deployment run on a finished `out` logged "None images/s" (docs/walkthrough.md, finding 11)."""
    import logging

    from flows.reporting import LogReporter

    done = _summary(images_per_s=None, shards_mined_now=0)
    md = summary_markdown(done)
    assert "| images/s (this run) | nothing left to mine (already committed) |" in md and "None" not in md
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    log = logging.getLogger("test-reporting-summary")
    log.addHandler(Collect())
    log.setLevel(logging.INFO)
    LogReporter(log).on_summary(done)
    assert any("nothing left to mine" in r for r in records) and not any(
        "None images/s" in r for r in records
    )
    records.clear()
    LogReporter(log).on_summary(_summary())
    assert any("12.5 images/s" in r for r in records)


def test_the_run_summary_names_the_caption_words_the_clip_does_not_know(
    tiny_dataset, tiny_clip_dir, tmp_path
):
    """The user's run: 5 of 45 distinct caption words became [UNK] in the tiny CLIP with no word said."""
    import json
    import shutil

    import pyarrow.parquet as pq

    from flows.reporting import run_vocabulary, vocabulary_line
    from storage.plan import plan_shards

    manifest = tiny_dataset / "manifest.parquet"
    plan = plan_shards(manifest, 8, {"any": "config"})
    captions = pq.read_table(manifest, columns=["caption"])["caption"].to_pylist()
    words = {w for c in captions for w in c.lower().replace(".", " ").replace(",", " ").split()}
    clip = tmp_path / "clip"
    shutil.copytree(tiny_clip_dir, clip)
    tok = json.loads((clip / "tokenizer.json").read_text())
    dropped = sorted(w for w in tok["model"]["vocab"] if w in words)[:2]
    for w in dropped:  # two of the captions' words the CLIP no longer knows
        del tok["model"]["vocab"][w]
    (clip / "tokenizer.json").write_text(json.dumps(tok))
    vocab = run_vocabulary(plan, str(clip))
    assert vocab["unknown_distinct"] >= 2 and set(dropped) <= set(vocab["unknown_words"])
    assert vocab["captions_read"] == vocab["captions"] == len(captions)
    line = vocabulary_line({"vocabulary": vocab})
    assert all(w in line for w in dropped) and "distinct caption words are in the CLIP's vocabulary" in line
    assert "caption vocabulary" in summary_markdown(_summary(vocabulary=vocab)) and dropped[
        0
    ] in summary_markdown(_summary(vocabulary=vocab))
    capped = run_vocabulary(plan, str(clip), max_captions=3)
    assert capped["captions_read"] == 3 and "of the first 3 of" in vocabulary_line({"vocabulary": capped})
