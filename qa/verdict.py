"""Which noise figure of a QA report to trust, and why: the verdict at the top of every report.

Consumes the qa.json figures and the run's calibrator (its JSON: what it was fitted on); produces
{"trust": the qa.json key to read, "why": one paragraph, "calibrator": its provenance}. The order:
ground truth when the manifest has it (a measurement); else an audit of a labelled sample (`qa.report
--audit`: a measurement on a sample, with its 95% interval); else mean(1 − reliability) when the calibrator
was fitted on labels *and* this run passes the checks of qa.domain that can see a new domain (a joint
two-sample test against the fitting data, a body part almost all dropped, caption words outside the CLIP's
vocabulary) — otherwise the figure is "unverified here", with why and the commands that audit a sample; a
calibrator refit on this run's own audit makes the figure in-sample, said so; else nothing label-free is
trustworthy: the reliability is the uncalibrated prior, and the two-component mixture is shown only as
a hint (on the demo it reads 0.6–0.9 against a true 0.07–0.09: correctness is not what splits the
cosine distribution in two).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from miners.calibration import CALIBRATOR_FILENAME, Calibrator, feature_matrix
from miners.matching import UnitMatches


def calibrator_provenance(clip_model: str | None, calibrator: str | None) -> dict[str, Any] | None:
    """What the run's calibrator was fitted on (None: the uncalibrated default prior)."""
    if calibrator:
        path = Path(calibrator)
    elif clip_model:
        path = Path(clip_model) / CALIBRATOR_FILENAME
    else:
        return None
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    info = raw.get("fit_info", {})
    return {
        # a refit on an audit (qa.audit fit) records the run and labels it was fitted on
        "fitted_on_run": info.get("run_id"),
        "labels": info.get("labels"),
        "pairs": info.get("n_pairs"),
        "path": str(path),
        "calibrated": bool(raw.get("calibrated")),
        "version": raw.get("version"),
        "model_fingerprint": raw.get("model_fingerprint"),
        "fitted_on": info.get("manifest"),
        "split": info.get("split"),
        "samples": info.get("samples"),
        "text_noise": info.get("text_noise"),
        "features": len(raw.get("features", [])),
    }


SHIFT_SD = 0.5  # a feature whose mean moved by more than this many of the fitting data's sds "differs"


def data_shift(calibrator_path: str | Path, matches: UnitMatches) -> dict[str, Any]:
    """Does this run's data look like what the calibrator was fitted on? Per feature, how far the run's mean
    lies from the fitting data's mean (which the calibrator stores for standardisation), in the fitting
    data's standard deviations. `applies` is False when any feature moved more than SHIFT_SD: a new dataset,
    proposer or caption style, where a calibrated number still needs an audit."""
    cal = Calibrator.load(calibrator_path)
    try:
        x = feature_matrix(matches, cal.features)
    except ValueError as exc:
        return {"applies": False, "why": str(exc), "shifted": {}}
    shift = np.abs(np.nanmean(x, axis=0) - cal.mean) / cal.std
    shifted = {n: round(float(v), 3) for n, v in zip(cal.features, shift, strict=True) if v > SHIFT_SD}
    top = sorted(shifted.items(), key=lambda kv: -kv[1])[:3]
    return {
        "applies": not shifted,
        "max_shift_sd": round(float(np.nanmax(shift)), 3) if shift.size else 0.0,
        "shifted": shifted,
        "pairs_compared": int(x.shape[0]),
        "why": (
            f"every feature within {SHIFT_SD} sd of the fitting data's mean"
            if not shifted
            else "this run's data differs from the fitting data: "
            + ", ".join(f"{n} by {v:.2f} sd" for n, v in top)
        ),
    }


def verdict(qa: dict[str, Any], calibrator: dict[str, Any] | None) -> dict[str, Any]:
    if qa.get("ground_truth") and qa.get("noise_rate_true") is not None:
        est, true = qa.get("noise_rate_estimated"), qa.get("noise_rate_true")
        gap = abs(est - true) if est is not None else None
        why = (
            f"Trust the true noise ({true:.3f}): the manifest has ground-truth links and every pair was judged "
            f"against them ({qa.get('pairs_judged', '?')} pairs)."
        )
        if gap is not None:
            why += f" The label-free mean(1 − reliability) reads {est:.3f}, " + (
                "close to it."
                if gap <= 0.03
                else f"off by {gap:.3f}: on data without labels, do not read it as the noise rate."
            )
        return {"trust": "noise_rate_true", "why": why, "calibrator": calibrator}
    audit = qa.get("audit") or {}
    kept = audit.get("noise_rate_kept") or {}
    if kept.get("estimate") is not None:
        why = (
            f"No ground truth; trust the audit: {kept['n_labels']} labelled pairs put the noise of kept pairs at "
            f"{kept['estimate']:.3f} (95% interval {kept['ci_low']:.3f}–{kept['ci_high']:.3f}). The label-free "
            f"mean(1 − reliability) reads {_fmt(qa.get('noise_rate_estimated'))}; "
            + (
                f"the audit's refit calibrator ({audit['calibrator']}) makes it calibrated for this data when "
                "the run is mined again with it (its figures on this run are then in-sample)."
                if audit.get("calibrator")
                else "the audit had too few labels of one kind for a calibrator refit (audit.json says how many "
                "more)."
            )
        )
        return {"trust": "audit.noise_rate_kept", "why": why, "calibrator": calibrator}
    if calibrator and calibrator["calibrated"]:
        est = _fmt(qa.get("noise_rate_estimated"))
        run_id = (qa.get("run") or {}).get("run_id")
        if run_id is not None and calibrator.get("fitted_on_run") == run_id:
            why = (
                f"No ground truth. mean(1 − reliability) reads {est}, but the calibrator was refit on "
                f"{calibrator.get('labels')} audit labels of this very run ({run_id}): the figure is in-sample "
                "(the calibrator has seen these pairs' labels), not an independent measurement. Quote the "
                "audit's noise rate with its interval (qa.report --audit DIR), or audit a fresh sample."
            )
            return {"trust": None, "in_sample": True, "why": why, "calibrator": calibrator}
        domain = calibrator.get("domain") or {}
        fitted = _fitted_on(calibrator)
        if domain.get("applies"):
            why = (
                f"No ground truth. Read mean(1 − reliability) ({est}): the calibrator was fitted on labels "
                f"({fitted}) and this run's data passes the checks that can see a new domain — "
                f"{domain['why']}. The mixture figure is a hint only."
            )
            return {"trust": "noise_rate_estimated", "why": why, "calibrator": calibrator}
        why = (
            f"No ground truth, and mean(1 − reliability) ({est}) is unverified here: the calibrator was fitted "
            f"on labels ({fitted}), and nothing shows it applies to this run's data — "
            f"{domain.get('why') or 'the domain checks did not run'}. Audit a sample of this run before quoting "
            f"any noise figure: {audit_command(qa)}."
        )
        return {"trust": None, "unverified": True, "why": why, "calibrator": calibrator}
    why = (
        "No ground truth and no calibrated reliability (the default prior ranks pairs but its numbers are not "
        "probabilities): no figure here is a noise rate. Audit a sample of pairs, or fit a calibrator on "
        "labelled data (python -m miners.training.fit_calibrator)."
    )
    return {"trust": None, "why": why, "calibrator": calibrator}


def audit_command(qa: dict[str, Any]) -> str:
    """The commands that audit a sample of this run (README, 'Auditing a sample by hand')."""
    pairs = (qa.get("run") or {}).get("pairs_dir") or "RUN"
    return (
        f"python -m qa.audit sample --pairs {pairs} --db audit.sqlite --n 100, then qa.audit serve "
        f"--db audit.sqlite, qa.audit fit --db audit.sqlite --pairs {pairs} --out audit-fit, and "
        "qa.report --audit audit-fit"
    )


MIXTURE_TOLERANCE = 0.05  # |mixture − true| allowed to call the mixture consistent with ground truth


def mixture_check(qa: dict[str, Any]) -> dict[str, Any]:
    """Whether the two-component mixture's noise figure may be read, checked against a measurement.

    No property of the fit itself can say so: the mixture splits the score distribution into two modes,
    and nothing makes those modes "right" and "wrong" (the demo's fit is well separated — Ashman's D 2.4 —
    yet reads 0.62 against a true 0.07). So the test is external: `consistent` when it is within
    MIXTURE_TOLERANCE of the true noise, or inside an audit's 95% interval; `inconsistent` when not;
    `unverified` when there is nothing to check it against (the report then marks it a hint)."""
    mix = qa.get("noise_rate_mixture")
    kept = (qa.get("audit") or {}).get("noise_rate_kept") or {}
    if qa.get("noise_rate_mixture_why_na"):
        return {"status": "not_converged", "why": qa["noise_rate_mixture_why_na"] + ": no figure"}
    if mix is None:
        return {"status": "unavailable", "why": "no mixture was fitted"}
    if qa.get("noise_rate_true") is not None:
        gap = abs(mix - qa["noise_rate_true"])
        ok = gap <= MIXTURE_TOLERANCE
        return {
            "status": "consistent" if ok else "inconsistent",
            "against": "noise_rate_true",
            "why": f"mixture {mix:.3f} vs true {qa['noise_rate_true']:.3f} (off by {gap:.3f}; "
            f"tolerance {MIXTURE_TOLERANCE})",
        }
    if kept.get("ci_low") is not None:
        ok = kept["ci_low"] <= mix <= kept["ci_high"]
        return {
            "status": "consistent" if ok else "inconsistent",
            "against": "audit.noise_rate_kept",
            "why": f"mixture {mix:.3f} {'inside' if ok else 'outside'} the audit's 95% interval "
            f"{kept['ci_low']:.3f}–{kept['ci_high']:.3f}",
        }
    return {
        "status": "unverified",
        "why": "no ground truth and no audit to check it against: a hint, not a noise rate",
    }


def _fitted_on(cal: dict[str, Any]) -> str:
    """What a calibrator was fitted on, in words: a benchmark's captions, or an audit's labels of a run."""
    if cal.get("fitted_on_run"):
        return f"{cal.get('labels')} audit labels of run {cal['fitted_on_run']} ({cal.get('pairs')} pairs)"
    return f"{cal.get('samples')} captions of {cal.get('fitted_on')}"


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


__all__ = ["calibrator_provenance", "mixture_check", "verdict"]
