"""From audit labels: the noise rate with a 95% interval, and a calibrator refit on the labels.

Consumes an audit database (qa.audit.db) and the run it was sampled from; produces, in DIR:
- `audit.json`: `noise_rate_kept` and `noise_rate_all` (each {estimate, ci_low, ci_high, n_labels, method,
  ...}, see qa.audit.estimate), `ece_before` / `ece_after` (cross-validated, 1/π-weighted), `calibrator`
  (its path and fit), annotator counts and agreement, the strata;
- `rsm-calibrator.json`: the run calibrator refit on the verdicts, each labelled pair weighted by 1/π, in the
  versioned format that `--calibrator` loads (its `model_fingerprint` is the run's CLIP, so the miner
  refuses it for another model). Two kinds of refit compete: Platt scaling of the mined reliability
  (sigmoid(a·logit + c): two parameters) and a logistic regression on the calibrator's own features (at a
  few L2 strengths); the one with the lower out-of-fold log loss is kept;
- `reliability.png`: reliability diagrams of the mined and the refit reliability on the labelled pairs.

Cross-validation: 5 folds (split by stratum and verdict, seeded); `ece_after` is the out-of-fold ECE of the
chosen refit, so it is measured on pairs the refit did not see (the choice among four candidates on the
same folds makes it slightly optimistic; bench/audit.py measures the refit on every unsampled pair). The calibrator saved is then fitted on all labelled pairs. "unsure" labels take no part
in the refit.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa

from miners.calibration import (
    Calibrator,
    default_calibrator,
    feature_matrix,
    features_for,
    fit_calibrator,
    sigmoid,
)
from miners.metrics import expected_calibration_error
from miners.rsm import calibrator_fingerprint, calibrator_path, matches_from_pairs
from miners.run_config import RunConfig
from qa.audit.db import AuditDB, AuditError, UnknownItemError
from qa.audit.estimate import combine_annotators, noise_rates
from qa.audit.sample import pair_keys, run_source
from storage.reader import read_pairs

AUDIT_FILE = "audit.json"
AUDIT_VERSION = 1
L2_GRID = (0.01, 0.1, 1.0)
N_FOLDS = 5
ECE_BINS = 10


def combined_verdicts(db: AuditDB) -> tuple[dict[int, str], dict]:
    """(item -> one verdict, annotator figures): the majority over annotators, and how often two
    annotators of the same item agree."""
    per_item = db.verdicts()
    verdict = {i: combine_annotators(by) for i, by in per_item.items()}
    annotators: dict[str, int] = {}
    for by in per_item.values():
        for name in by:
            annotators[name] = annotators.get(name, 0) + 1
    multi = [by for by in per_item.values() if len(by) > 1]
    agree = [len(set(by.values())) == 1 for by in multi]
    return verdict, {
        "labels_by_annotator": annotators,
        "items_with_several_annotators": len(multi),
        "agreement": float(np.mean(agree)) if agree else None,
    }


def run_calibrator(cfg: RunConfig, pairs: pa.Table) -> Calibrator:
    """The calibrator the run was mined with (for its feature list): the run's file when it still hashes
    as the run recorded, else the default prior or the mode's features with what the pairs carry."""
    path = calibrator_path(cfg.rsm)
    if path.is_file() and calibrator_fingerprint(cfg.rsm) == cfg.fingerprints.get("calibrator"):
        return Calibrator.load(path)
    if cfg.fingerprints.get("calibrator") == "default-prior":
        return default_calibrator(cfg.rsm.match.mode)
    content = pairs["bank_region_z"].null_count < pairs.num_rows
    colour = pairs["colour_logit"].null_count < pairs.num_rows
    garment = pairs["garment_logit"].null_count < pairs.num_rows
    names = features_for(cfg.rsm.match.mode, content, colour, garment)
    return Calibrator(names, np.zeros(len(names)), 0.0, np.zeros(len(names)), np.ones(len(names)), False)


# A refit needs this many labels of each kind (correct, wrong): with the folds below, every training fold
# then holds both kinds (the project's own rule: one of each kind per fold).
MIN_PER_KIND = N_FOLDS


def _folds(strata: np.ndarray, y: np.ndarray, seed: int) -> np.ndarray:
    """Fold per pair: for each verdict, one round-robin over its pairs ordered by stratum (shuffled within
    a stratum, seeded), so each fold gets a share of every stratum and a verdict with n ≥ N_FOLDS labels
    is in every fold (a round-robin restarted per stratum put two lone wrong labels in the same fold)."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(y), dtype=np.int64)
    for verdict in sorted(set(y.tolist())):
        idx = np.flatnonzero(y == verdict)
        idx = idx[np.lexsort((rng.random(idx.size), strata[idx]))]
        fold[idx] = np.arange(idx.size) % N_FOLDS
    return fold


def refit_needs(y: np.ndarray) -> dict[str, int]:
    """How many more labels of each kind a refit needs (0 each: it can be fitted)."""
    n_correct = int(np.sum(y == 1))
    return {"correct": max(0, MIN_PER_KIND - n_correct), "wrong": max(0, MIN_PER_KIND - (len(y) - n_correct))}


def _log_loss(p: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return float(-np.sum(w * (y * np.log(p) + (1 - y) * np.log(1 - p))) / np.sum(w))


def platt(score: np.ndarray, y: np.ndarray, w: np.ndarray, iters: int = 50) -> tuple[float, float]:
    """(a, c) of P(correct) = sigmoid(a·score + c), weighted logistic regression by Newton's method (a tiny
    ridge keeps it finite when the labels separate)."""
    x = np.stack([score, np.ones_like(score)], axis=1)
    theta = np.array([1.0, 0.0])
    sw = w / w.mean()
    for _ in range(iters):
        p = sigmoid(x @ theta)
        grad = x.T @ (sw * (p - y)) / len(y) + 1e-4 * theta
        hess = (x * (sw * p * (1 - p))[:, None]).T @ x / len(y) + 1e-4 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        theta -= step
        if np.abs(step).max() < 1e-9:
            break
    return float(theta[0]), float(theta[1])


def recalibrated(base: Calibrator, a: float, c: float) -> Calibrator:
    """`base` with its logit scaled by a and shifted by c: Platt scaling of the mined reliability, exactly
    representable in the calibrator format (same features, same standardisation)."""
    return Calibrator(
        features=base.features,
        coef=a * base.coef,
        intercept=a * base.intercept + c,
        mean=base.mean,
        std=base.std,
        calibrated=True,
    )


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


# The refits tried, chosen by out-of-fold log loss: Platt scaling of the mined reliability (2 parameters: what
# a few hundred labels can pin down when the mined score ranks well) and a full refit on the features.
CANDIDATES = ("platt", *(f"features l2={l2}" for l2 in L2_GRID))


def _fit_candidate(name: str, base: Calibrator, matches, y, w) -> Calibrator:
    if name == "platt":
        return recalibrated(base, *platt(_logit(base.predict(matches)), y, w))
    l2 = float(name.split("=")[1])
    return fit_calibrator(matches, y, sample_weight=w, features=base.features, l2=l2)


def cross_validated(matches, y, w, strata, base: Calibrator, seed: int) -> tuple[np.ndarray, str, dict]:
    """(out-of-fold predictions of the chosen refit, its name, out-of-fold log loss per candidate)."""
    fold = _folds(strata, y, seed)
    losses: dict[str, float] = {}
    best: tuple[float, str, np.ndarray] | None = None
    for name in CANDIDATES:
        oof = np.full(len(y), np.nan)
        for k in range(N_FOLDS):
            test = fold == k
            train = ~test
            if not test.any() or y[train].min() == y[train].max():
                continue
            cal = _fit_candidate(name, base, _take(matches, train), y[train], w[train])
            oof[test] = cal.predict(_take(matches, test))
        if np.isnan(oof).any():
            raise AuditError("too few labels of one kind to cross-validate; label more pairs")
        losses[name] = _log_loss(oof, y, w)
        if best is None or losses[name] < best[0]:
            best = (losses[name], name, oof)
    assert best is not None
    return best[2], best[1], losses


def _take(matches, mask: np.ndarray):
    import dataclasses

    idx = np.flatnonzero(mask)
    out = {}
    for f in dataclasses.fields(matches):
        v = getattr(matches, f.name)
        out[f.name] = None if v is None else ([v[i] for i in idx] if isinstance(v, list) else v[idx])
    return type(matches)(**out)


def _figure(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), 6)


def fit_audit(db_path: str | Path, pairs_dir: str | Path, out_dir: str | Path, seed: int = 0) -> dict:
    """Write audit.json, rsm-calibrator.json and reliability.png into `out_dir`; returns audit.json."""
    src = run_source(pairs_dir)
    out = Path(out_dir)
    with AuditDB(db_path) as db:
        db.check_run(src.run_id, pairs_dir)
        items = {it.item_id: it for it in db.items()}
        strata = db.strata()
        verdict, people = combined_verdicts(db)
    if not verdict:
        raise AuditError(
            f"{db_path} holds no labels yet; label pairs with `python -m qa.audit serve --db {db_path}` "
            "(or `python -m qa.audit label --db ... --oracle-from MANIFEST` on a benchmark)"
        )
    rates = noise_rates(verdict, {i: it.stratum for i, it in items.items()}, strata)

    pairs = read_pairs(pairs_dir)
    row_of = {k: r for r, k in enumerate(pair_keys(pairs))}
    labelled = [i for i, v in sorted(verdict.items()) if v in ("correct", "wrong")]
    missing = [items[i].pair_key for i in labelled if items[i].pair_key not in row_of]
    if missing:
        raise UnknownItemError(
            f"{len(missing)} labelled pairs of {db_path} no longer exist in {pairs_dir}, e.g. {missing[0]}"
        )
    rows = pairs.take(np.asarray([row_of[items[i].pair_key] for i in labelled], dtype=np.int64))
    y = np.asarray([verdict[i] == "correct" for i in labelled], dtype=np.float64)
    w = np.asarray([1.0 / items[i].inclusion_prob for i in labelled], dtype=np.float64)
    stratum = np.asarray([items[i].stratum for i in labelled], dtype=np.int64)
    before = np.asarray([items[i].reliability for i in labelled], dtype=np.float64)
    ece_before, bins_before = expected_calibration_error(before, y, ECE_BINS, weights=w)
    out.mkdir(parents=True, exist_ok=True)
    needs = refit_needs(y)
    n_correct = int(y.sum())
    counts = f"{len(labelled)} correct/wrong labels ({n_correct} correct, {len(labelled) - n_correct} wrong)"
    calibrator, ece_after, bins_after, skipped = None, None, None, None
    if any(needs.values()):
        more = " and ".join(f"{n} more {kind}" for kind, n in needs.items() if n)
        skipped = {
            "why": f"{counts}: a refit is cross-validated in {N_FOLDS} folds and needs at least "
            f"{MIN_PER_KIND} labels of each kind; label {more} pairs (the noise rates above need no refit)",
            "needs_more": needs,
        }
    else:
        base = run_calibrator(src.config, pairs)
        matches = matches_from_pairs(rows)
        oof, chosen, losses = cross_validated(matches, y, w, stratum, base, seed)
        ece_after, bins_after = expected_calibration_error(oof, y, ECE_BINS, weights=w)
        refit = _fit_candidate(chosen, base, matches, y, w)
        refit.model_fingerprint = src.config.fingerprints.get("clip_model")
        if refit.reference is None:  # Platt: its fitting data are the audited pairs too
            refit.reference = _reference(matches, refit.features, y, w)
        # What it was fitted on, read back by qa.verdict (a report on this run says its figures are in-sample)
        refit.fit_info |= {
            "kind": "audit",
            "audit_db": str(Path(db_path).resolve()),
            "run_id": src.run_id,
            "pairs_dir": str(Path(pairs_dir).resolve()),
            "labels": len(labelled),
            "labels_by_kind": {"correct": n_correct, "wrong": len(labelled) - n_correct},
            "n_pairs": len(labelled),
            "n_labels": len(labelled),
            "refit": chosen,
            "cv_log_loss": {k: round(v, 6) for k, v in losses.items()},
            "cv_ece": _figure(ece_after),
            "fitted_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        cal_path = refit.save(out / "rsm-calibrator.json")
        calibrator = {
            "path": str(cal_path.resolve()),
            "features": list(refit.features),
            "refit": chosen,
            "cv_log_loss": {k: round(v, 6) for k, v in losses.items()},
            "base_calibrated": base.calibrated,
            "fitted_on": {"run_id": src.run_id, "labels": len(labelled), "pairs": len(labelled)},
            "load_with": f"python -m flows.mine_rsm ... --calibrator {cal_path}",
        }
    from qa.plots import plot_reliability_before_after  # matplotlib: only when a figure is drawn

    plot_reliability_before_after(
        (bins_before, _figure(ece_before)),
        (bins_after, _figure(ece_after)) if bins_after is not None else ([], None),
        out / "reliability.png",
        f"{len(labelled)} audited pairs, weighted by 1/π; right: {N_FOLDS}-fold out-of-fold predictions"
        + ("" if skipped is None else " (no refit: too few labels)"),
    )
    audit = {
        "version": AUDIT_VERSION,
        "run_id": src.run_id,
        "pairs_dir": str(Path(pairs_dir).resolve()),
        "db": str(Path(db_path).resolve()),
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "n_items": len(items),
        "n_items_labelled": len(verdict),
        **{k: _round_figures(v) for k, v in rates.items()},
        "ece_before": _figure(ece_before),
        "ece_after": _figure(ece_after),
        "ece_method": f"{ECE_BINS} equal-width bins, 1/π-weighted, on the labelled pairs; after: "
        f"{N_FOLDS}-fold out-of-fold",
        "calibrator": calibrator,
        "refit_skipped": skipped,
        "annotators": people,
        "reliability_png": "reliability.png",
    }
    tmp = out / (AUDIT_FILE + ".tmp")
    tmp.write_text(json.dumps(audit, indent=2))
    tmp.replace(out / AUDIT_FILE)
    return audit


def _reference(matches, names: tuple[str, ...], y: np.ndarray, w: np.ndarray) -> dict:
    x = feature_matrix(matches, names)
    return {
        "x": [[float(f"{v:.5g}") for v in row] for row in x],
        "correct": [int(v) for v in y],
        "weight": [round(float(v), 5) for v in w],
    }


def _round_figures(value):
    if isinstance(value, float):
        return _figure(value)
    if isinstance(value, dict):
        return {k: _round_figures(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_round_figures(v) for v in value]
    return value


def read_audit(out_dir: str | Path) -> dict:
    """DIR/audit.json (for qa.report --audit); FileNotFoundError naming it when absent."""
    path = Path(out_dir) / AUDIT_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist; write it with `python -m qa.audit fit --out {out_dir}`"
        )
    return json.loads(path.read_text())
