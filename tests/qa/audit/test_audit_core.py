"""qa.audit sample / label / fit / export / import on the tiny mined run (no web page here: test_web.py)."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest

from miners.calibration import Calibrator
from qa.audit.__main__ import main as audit_main
from qa.audit.db import AuditDB, AuditError, UnknownItemError
from qa.audit.estimate import combine_annotators, stratified_rate
from qa.audit.exchange import export, import_label_studio
from qa.audit.fit import fit_audit
from qa.audit.oracle import label_with_oracle, oracle_verdicts
from qa.audit.sample import allocate, assign_strata, pair_keys, sample_pairs
from storage.reader import read_pairs
from storage.shards import load_run_plan


def _keys(db_path):
    with AuditDB(db_path) as db:
        return [it.pair_key for it in db.items()]


def test_sample_is_stratified_deterministic_and_stores_inclusion_probabilities(tiny_run, tmp_path):
    a, b = tmp_path / "a.sqlite", tmp_path / "b.sqlite"
    sample_pairs(tiny_run, a, n=40, n_strata=3, seed=5)
    sample_pairs(tiny_run, b, n=40, n_strata=3, seed=5)
    assert _keys(a) == _keys(b)
    pairs = read_pairs(tiny_run, columns=["sample_id", "sentence_index", "region_id", "reliability", "kept"])
    kept = dict(zip(pair_keys(pairs), pairs["kept"].to_pylist(), strict=True))
    rel = dict(zip(pair_keys(pairs), pairs["reliability"].to_pylist(), strict=True))
    with AuditDB(a) as db:
        strata = {s["stratum"]: s for s in db.strata()}
        items = db.items()
        assert db.run_id == load_run_plan(tiny_run).run_id
    assert len(items) == 40
    assert sum(s["n_population"] for s in strata.values()) == pairs.num_rows
    for it in items:
        s = strata[it.stratum]
        # a stratum is wholly kept or wholly dropped, and its reliability range holds the item's
        assert kept[it.pair_key] == s["kept"] == it.kept
        assert s["rel_low"] <= rel[it.pair_key] <= s["rel_high"]
        assert it.inclusion_prob == pytest.approx(s["n_sampled"] / s["n_population"])
    # both kept and dropped pairs are sampled, in proportion to their numbers
    n_kept = sum(it.kept for it in items)
    assert 0 < n_kept < 40
    assert abs(n_kept / 40 - sum(kept.values()) / len(kept)) < 0.1


def test_sampling_again_adds_new_pairs_only_and_updates_probabilities(tiny_run, tmp_path):
    db_path = tmp_path / "audit.sqlite"
    sample_pairs(tiny_run, db_path, n=30, seed=1)
    first = set(_keys(db_path))
    summary = sample_pairs(tiny_run, db_path, n=30, seed=1)
    keys = _keys(db_path)
    assert summary["added"] == 30 and len(keys) == len(set(keys)) == 60
    assert first <= set(keys)
    with AuditDB(db_path) as db:
        counts = Counter(it.stratum for it in db.items())
        for s in db.strata():
            assert s["n_sampled"] == counts[s["stratum"]]
        for it in db.items():
            s = next(x for x in db.strata() if x["stratum"] == it.stratum)
            assert it.inclusion_prob == pytest.approx(s["n_sampled"] / s["n_population"])


def test_a_database_refuses_another_run_naming_both_ids(tiny_run, tmp_path):
    db_path = tmp_path / "audit.sqlite"
    sample_pairs(tiny_run, db_path, n=10)
    other = tmp_path / "other"
    shutil.copytree(tiny_run, other)
    stored = json.loads((other / "_run.json").read_text())
    mine = stored["plan"]["run_id"]
    stored["plan"]["run_id"] = "run-of-another-day"
    (other / "_run.json").write_text(json.dumps(stored))
    with pytest.raises(AuditError) as err:
        sample_pairs(other, db_path, n=10)
    assert mine in str(err.value) and "run-of-another-day" in str(err.value)
    with pytest.raises(AuditError, match="run-of-another-day"):
        fit_audit(db_path, other, tmp_path / "fit")
    assert audit_main(["sample", "--pairs", str(other), "--db", str(db_path), "--n", "5"]) == 2


def test_allocation_is_proportional_and_respects_what_is_left():
    assert allocate(10, {0: 50, 1: 50}, {0: 50, 1: 50}) == {0: 5, 1: 5}
    assert allocate(10, {0: 90, 1: 10}, {0: 90, 1: 10}) == {0: 9, 1: 1}
    assert allocate(10, {0: 2, 1: 100}, {0: 50, 1: 100}) == {0: 2, 1: 8}  # a stratum running out
    assert sum(allocate(3, dict.fromkeys(range(5), 4), dict.fromkeys(range(5), 4)).values()) == 3
    assert allocate(500, {0: 3, 1: 4}, {0: 3, 1: 4}) == {0: 3, 1: 4}


def test_strata_split_kept_and_dropped_by_reliability_rank():
    rel = np.array([0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9])
    kept = rel >= 0.5
    s = assign_strata(rel, kept, [("a", i, 0) for i in range(8)], 2)
    assert s.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


def test_stratified_interval_covers_the_true_rate(tmp_path):
    """Repeated stratified samples of a synthetic population: the 95% interval holds the true rate in
    about 95% of them (≥ 90% of 400 here; the bench measures it on the demo run)."""
    rng = np.random.default_rng(3)
    sizes = {0: 4000, 1: 3000, 2: 2000, 3: 1000}
    rates = {0: 0.02, 1: 0.05, 2: 0.12, 3: 0.30}
    truth = {h: rng.random(n) < rates[h] for h, n in sizes.items()}
    true_rate = sum(t.sum() for t in truth.values()) / sum(sizes.values())
    hits = 0
    for _ in range(400):
        alloc = allocate(200, dict(sizes), dict(sizes))
        wrong = {h: int(rng.choice(truth[h], alloc[h], replace=False).sum()) for h in sizes}
        fig = stratified_rate(wrong, alloc, sizes)
        hits += fig["ci_low"] <= true_rate <= fig["ci_high"]
    assert hits / 400 >= 0.90


def test_interval_with_a_stratum_nobody_labelled_spans_its_share():
    fig = stratified_rate({0: 0}, {0: 50}, {0: 500, 1: 500})
    assert fig["estimate"] is None and fig["unlabelled_share"] == 0.5
    assert fig["ci_high"] >= 0.5 and fig["ci_low"] == pytest.approx(0.0, abs=1e-9)


def test_annotators_combine_by_majority_and_ties_are_unsure():
    assert combine_annotators({"a": "wrong", "b": "wrong", "c": "correct"}) == "wrong"
    assert combine_annotators({"a": "wrong", "b": "correct"}) == "unsure"


def test_oracle_labels_from_ground_truth_and_flips_at_the_error_rate(tiny_run, tiny_dataset, tmp_path):
    db_path = tmp_path / "audit.sqlite"
    sample_pairs(tiny_run, db_path, n=60)
    manifest = tiny_dataset / "manifest.parquet"
    summary = label_with_oracle(db_path, manifest)
    assert summary["labelled"] == 60 and summary["flipped"] == 0
    with AuditDB(db_path) as db:
        truth = oracle_verdicts(db.items(), manifest)
        got = {i: by["oracle"] for i, by in db.verdicts().items()}
    assert got == {i: "correct" if c else "wrong" for i, c in truth.items()}
    # a second oracle with mistakes
    flipped = label_with_oracle(db_path, manifest, error_rate=0.3, seed=2, annotator="sloppy")
    with AuditDB(db_path) as db:
        sloppy = {i: by["sloppy"] for i, by in db.verdicts().items()}
    disagree = sum(sloppy[i] != got[i] for i in got)
    assert disagree == flipped["flipped"] > 0
    # labelling again adds nothing for an annotator who is done
    assert label_with_oracle(db_path, manifest)["labelled"] == 0


def test_fit_writes_audit_json_a_loadable_calibrator_and_a_diagram(tiny_run, tiny_dataset, tmp_path):
    db_path = tmp_path / "audit.sqlite"
    sample_pairs(tiny_run, db_path, n=150)
    label_with_oracle(db_path, tiny_dataset / "manifest.parquet")
    out = tmp_path / "fit"
    assert audit_main(["fit", "--db", str(db_path), "--pairs", str(tiny_run), "--out", str(out)]) == 0
    audit = json.loads((out / "audit.json").read_text())
    for key in ("noise_rate_kept", "noise_rate_all"):
        fig = audit[key]
        assert set(fig) >= {"estimate", "ci_low", "ci_high", "n_labels", "method"}
        assert 0.0 <= fig["ci_low"] <= fig["estimate"] <= fig["ci_high"] <= 1.0
    assert audit["noise_rate_all"]["n_labels"] == 150
    for key in ("ece_before", "ece_after", "calibrator"):
        assert key in audit
    # the estimate agrees with the sample's own wrong share weighted by 1/π
    with AuditDB(db_path) as db:
        items = {it.item_id: it for it in db.items()}
        v = {i: by["oracle"] for i, by in db.verdicts().items()}
    w = np.array([1 / items[i].inclusion_prob for i in v])
    x = np.array([v[i] == "wrong" for i in v])
    assert audit["noise_rate_all"]["estimate"] == pytest.approx(float((w * x).sum() / w.sum()), abs=1e-6)
    cal = Calibrator.load(out / "rsm-calibrator.json")
    assert cal.calibrated and cal.fit_info["kind"] == "audit"
    plan_fp = load_run_plan(tiny_run).config["fingerprints"]["clip_model"]
    assert cal.model_fingerprint == plan_fp
    assert (out / "reliability.png").stat().st_size > 10_000


def test_fit_without_labels_says_how_to_get_them(audit_db, tiny_run, tmp_path):
    with pytest.raises(AuditError, match="qa.audit serve"):
        fit_audit(audit_db, tiny_run, tmp_path / "fit")


def test_labels_are_append_only_and_undo_retracts_the_latest(audit_db):
    with AuditDB(audit_db) as db:
        a, b = (it.item_id for it in db.items()[:2])
        db.add_event(a, "ann", "correct", 1.2)
        db.add_event(b, "ann", "wrong", 0.8)
        assert db.undo_last("ann") == b
        assert db.verdicts() == {a: {"ann": "correct"}}
        assert db.undo_last("ann") == a
        assert db.undo_last("ann") is None
        assert [e["event"] for e in db.events()] == ["correct", "wrong", "undo", "undo"]
        with pytest.raises(UnknownItemError, match="99999"):
            db.add_event(99999, "ann", "correct")
        with pytest.raises(AuditError, match="unknown verdict"):
            db.add_event(a, "ann", "maybe")


def test_export_jsonl_csv_and_label_studio_round_trip(audit_db, tmp_path):
    with AuditDB(audit_db) as db:
        items = db.items()
        db.add_event(items[0].item_id, "ann", "wrong")
        db.add_event(items[1].item_id, "bob", "unsure")
    rows = [json.loads(line) for line in export(audit_db, "jsonl").splitlines()]
    assert len(rows) == 40 and rows[0]["verdicts"] == {"ann": "wrong"} and rows[0]["verdict"] == "wrong"
    assert export(audit_db, "csv").splitlines()[0].startswith("item_id,sample_id")

    ls_file = tmp_path / "tasks.json"
    export(audit_db, "label-studio", ls_file)
    tasks = json.loads(ls_file.read_text())
    assert (tmp_path / "tasks.json.label-config.xml").read_text().startswith("<View>")
    t0 = tasks[0]
    rect = t0["predictions"][0]["result"][0]
    x0, y0, x1, y1 = items[0].bbox_xyxy
    w = rect["original_width"]
    assert rect["value"]["x"] == pytest.approx(100 * x0 / w) and 0 < rect["value"]["width"] <= 100
    span = t0["predictions"][0]["result"][1]["value"]
    assert span["text"] == items[0].sentence or span["text"] in items[0].caption
    assert "reliability" not in json.dumps(tasks)
    # back: the exported verdicts are already in force (nothing added); a new one from Label Studio is
    assert import_label_studio(audit_db, ls_file) == {"added": 0, "unchanged": 2, "no_verdict": 0}
    tasks[2]["annotations"] = [
        {
            "completed_by": 7,
            "result": [{"from_name": "verdict", "type": "choices", "value": {"choices": ["correct"]}}],
        }
    ]
    ls_file.write_text(json.dumps(tasks))
    assert import_label_studio(audit_db, ls_file)["added"] == 1
    with AuditDB(audit_db) as db:
        assert db.verdicts()[items[2].item_id] == {"label-studio-user-7": "correct"}
    # a task whose pair is not in the database is named
    tasks[3]["data"]["rsm_pair"]["sentence_index"] = 999
    ls_file.write_text(json.dumps(tasks))
    with pytest.raises(UnknownItemError, match="sentence 999"):
        import_label_studio(audit_db, ls_file)


def test_fit_names_a_labelled_pair_that_no_longer_exists(tiny_run, tiny_dataset, tmp_path):
    db_path = tmp_path / "audit.sqlite"
    sample_pairs(tiny_run, db_path, n=60)
    label_with_oracle(db_path, tiny_dataset / "manifest.parquet")
    with AuditDB(db_path) as db:
        db.conn.execute("UPDATE items SET region_id = 777 WHERE item_id = 1")
    with pytest.raises(UnknownItemError, match="no longer exist"):
        fit_audit(db_path, tiny_run, tmp_path / "fit")


def test_a_file_that_is_no_audit_database_is_refused(tmp_path):
    path = tmp_path / "other.sqlite"
    import sqlite3

    sqlite3.connect(path).execute("CREATE TABLE x (a)").connection.commit()
    with pytest.raises(AuditError, match="not an audit database"):
        AuditDB(path, create=True)
    with pytest.raises(AuditError, match="does not exist"):
        AuditDB(tmp_path / "missing.sqlite")


def test_manifest_captions_are_shown_with_their_sentence_span(audit_db, tiny_dataset):
    table = pq.read_table(tiny_dataset / "manifest.parquet", columns=["sample_id", "caption"])
    captions = dict(zip(table["sample_id"].to_pylist(), table["caption"].to_pylist(), strict=True))
    with AuditDB(audit_db) as db:
        for it in db.items():
            assert it.caption == captions[it.sample_id]
            assert (
                it.sentence.strip() in it.caption[it.char_start : it.char_end]
                or it.caption[it.char_start : it.char_end].strip() in it.sentence
            )


def test_report_puts_the_audit_beside_the_label_free_figures(tiny_run, tiny_dataset, tmp_path):
    from qa.report import build_report

    db_path = tmp_path / "audit.sqlite"
    sample_pairs(tiny_run, db_path, n=80)
    label_with_oracle(db_path, tiny_dataset / "manifest.parquet")
    audit = fit_audit(db_path, tiny_run, tmp_path / "fit")
    qa = build_report(tiny_run, tmp_path / "qa", sheet_samples=0, audit=str(tmp_path / "fit"))
    assert qa["audit"]["noise_rate_kept"] == audit["noise_rate_kept"]
    assert (tmp_path / "qa" / "audit_reliability.png").is_file()
    md = (tmp_path / "qa" / "report.md").read_text()
    assert "Audit: a labelled sample" in md and f"{audit['noise_rate_kept']['ci_high']:.4f}" in md
    # an audit of another run is refused
    other = json.loads((tmp_path / "fit" / "audit.json").read_text()) | {"run_id": "someone-else"}
    (tmp_path / "fit" / "audit.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="someone-else"):
        build_report(tiny_run, tmp_path / "qa2", sheet_samples=0, audit=str(tmp_path / "fit"))
