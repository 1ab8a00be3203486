"""qa.audit fit answers with the labels it has: the noise rates always, the refit only when the labels can
support it (else the reason and how many more labels of which kind), no overflow warnings, and a refit
calibrator that records what it was fitted on (so a report on the same run says its figures are in-sample)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from qa.audit.__main__ import main as audit_main
from qa.audit.db import AuditDB
from qa.audit.sample import sample_pairs
from qa.verdict import calibrator_provenance, verdict


def _label(db_path, n_wrong: int) -> dict[int, str]:
    """Label every sampled item by hand: the first n_wrong (by item id) wrong, the rest correct."""
    with AuditDB(db_path) as db:
        ids = sorted(it.item_id for it in db.items())
        for k, item in enumerate(ids):
            db.add_event(item, "me", "wrong" if k < n_wrong else "correct", 1.0)
    return {i: ("wrong" if k < n_wrong else "correct") for k, i in enumerate(ids)}


def _fit(db_path, run, out, capsys) -> tuple[int, str]:
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # "overflow encountered in exp" fails the test
        rc = audit_main(["fit", "--db", str(db_path), "--pairs", str(run), "--out", str(out)])
    return rc, capsys.readouterr().out


def test_thirty_labels_two_wrong_give_the_noise_rate_and_say_what_a_refit_needs(tiny_run, tmp_path, capsys):
    db_path = tmp_path / "audit.sqlite"
    sample_pairs(tiny_run, db_path, n=30, n_strata=5, seed=0)
    verdicts = _label(db_path, n_wrong=2)
    rc, out = _fit(db_path, tiny_run, tmp_path / "fit", capsys)
    assert rc == 0, out
    audit = json.loads((tmp_path / "fit" / "audit.json").read_text())
    with AuditDB(db_path) as db:
        w = {it.item_id: 1 / it.inclusion_prob for it in db.items()}
    by_hand = sum(w[i] for i, v in verdicts.items() if v == "wrong") / sum(w.values())
    assert audit["noise_rate_all"]["estimate"] == pytest.approx(by_hand, abs=1e-6)
    assert audit["noise_rate_all"]["n_labels"] == 30
    fig = audit["noise_rate_kept"]
    assert 0.0 <= fig["ci_low"] <= fig["estimate"] <= fig["ci_high"] <= 1.0
    assert audit["calibrator"] is None and not (tmp_path / "fit" / "rsm-calibrator.json").exists()
    assert audit["refit_skipped"]["needs_more"] == {"correct": 0, "wrong": 3}
    assert "label 3 more wrong pairs" in out and "noise rate, kept pairs" in out
    assert (tmp_path / "fit" / "reliability.png").is_file()


def test_a_refit_records_its_run_and_labels_and_a_report_on_that_run_says_in_sample(
    tiny_run, tmp_path, capsys
):
    db_path = tmp_path / "audit.sqlite"
    sample_pairs(tiny_run, db_path, n=30, n_strata=5, seed=0)
    _label(db_path, n_wrong=5)
    rc, out = _fit(db_path, tiny_run, tmp_path / "fit", capsys)
    assert rc == 0, out
    audit = json.loads((tmp_path / "fit" / "audit.json").read_text())
    assert audit["refit_skipped"] is None and audit["calibrator"]["fitted_on"]["labels"] == 30
    provenance = calibrator_provenance(None, audit["calibrator"]["path"])
    assert provenance["fitted_on_run"] == audit["run_id"] and provenance["labels"] == 30
    assert provenance["pairs"] == 30 and provenance["calibrated"]
    qa = {"ground_truth": False, "noise_rate_estimated": 0.002, "run": {"run_id": audit["run_id"]}}
    v = verdict(qa, provenance)
    assert (
        v["trust"] is None and v["in_sample"] and "in-sample" in v["why"] and "None captions" not in v["why"]
    )
    # on another run the same calibrator is judged by the domain checks like any other
    other = verdict({**qa, "run": {"run_id": "another"}}, provenance)
    assert "in_sample" not in other and f"30 audit labels of run {audit['run_id']} (30 pairs)" in other["why"]
    assert np.isfinite(audit["ece_after"])
