"""The QA estimator check: inject known noise, re-score it with the RSM, and see whether the report's
label-free estimates notice.

Consumes a committed run (its plan, status shards and manifest) and a `qa.report.ReportConfig`; re-mines
an audit subset of captions clean once, then per injection mode (`ReportConfig.inject_modes`, see
qa.config.INJECT_MODES) makes a known fraction of its text units wrong — swapped for another person's
unit ("any"), for another person's unit naming the same body part(s) ("same-part"), or with one colour
or garment word replaced by one the person does not wear ("attribute", only where the dataset folder
holds the synthetic benchmark's identity file) — re-mines the perturbed captions with the run's RSM
settings, finds each injected unit by char span, and produces one block per mode: injected rate, how far
the estimated noise moves against the true rise, AUROC of reliability clean vs injected, kept fractions.
qa.json "injection" is the first mode's block plus "modes" (mode -> block).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from miners.caption_noise import (
    NoiseUnavailable,
    Perturbation,
    attribute_perturbations,
    locate_injected,
    swap_perturbations,
    tagged_units,
)
from miners.metrics import auroc
from miners.rsm import RSMConfig, RSMMiner
from miners.run_config import RunConfig
from qa.checks import scan_shards
from qa.config import ReportConfig, check_inject_modes
from qa.mixture import fit_mixture, posterior_noisy
from storage.plan import RunPlan, image_root
from storage.schemas import STATUS_SCHEMA
from storage.synth.generate import IDENTITIES_FILE
from storage.synth.identities import AttributeWords, read_identity_attributes
from storage.truth import judge_pairs

# ---------------------------------------------------------------------------------------------- injection


def injection_rsm_config(run_config: RunConfig | None, clip_model: str | None) -> RSMConfig:
    """RSMConfig for re-scoring: the run's RSM settings (proposer, match, ...) with `clip_model`.

    The run's calibrator file is dropped when the CLIP model differs (it is bound to its model)."""
    if run_config is None:
        if clip_model is None:
            raise ValueError("--inject-noise needs --clip-model: the run has no readable run config")
        return RSMConfig(clip_model=str(clip_model))
    rsm = run_config.rsm
    if clip_model is None or str(clip_model) == str(rsm.clip_model):
        return rsm
    return dataclasses.replace(rsm, clip_model=str(clip_model), calibrator=None)


def _mean(values: np.ndarray) -> float | None:
    return float(np.mean(values)) if values.size else None


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


@dataclass(frozen=True)
class CleanSet:
    """The audit subset mined clean once; every mode perturbs it and is compared with it."""

    rows: pl.DataFrame  # manifest rows of the audit captions, by sample_id
    clean: pl.DataFrame  # their pairs (one per text unit)
    root: str | None  # image root
    miner: RSMMiner
    rsm_cfg: RSMConfig
    correct: np.ndarray | None  # per clean unit: its pair is right (ground truth), None without gt

    @property
    def captions(self) -> dict[str, str]:
        return dict(self.rows.select("sample_id", "caption").iter_rows())


EXAMPLES = 6  # injected units listed per mode block, for a reader to see what the mode does


def _score_mode(
    shared: CleanSet, targets: np.ndarray, perturbed: list[Perturbation], cfg: ReportConfig
) -> dict:
    """Re-mine the perturbed captions, find each injected unit by char span, and compare the mixed set
    (clean units, injected ones in place of their targets) with the clean set."""
    clean, rows, n = shared.clean, shared.rows, shared.clean.height
    mined = pl.from_arrow(
        shared.miner.mine(
            pa.Table.from_pylist([p.row for p in perturbed], schema=rows.to_arrow().schema), shared.root
        ).pairs
    )
    found = locate_injected(mined, perturbed)
    lost = len(targets) - len(found)

    # Clean set: the clean units but lost targets. Mixed set: the same units, found targets swapped
    base = np.ones(n, dtype=bool)
    base[[t for t in targets if t not in found]] = False
    untouched = base.copy()
    untouched[list(found)] = False
    rel, kept, score = (
        clean[c].to_numpy().astype(np.float64)[base] for c in ("reliability", "kept", cfg.mixture_score)
    )
    kept = kept.astype(bool)
    untouched = untouched[base]
    has_tags = tagged_units(clean)[base]
    inj = {
        c: np.array([u[c] for u in found.values()], dtype=np.float64)
        for c in ("reliability", "kept", cfg.mixture_score)
    }
    mixed_rel = np.concatenate([rel[untouched], inj["reliability"]])
    mixed_kept = np.concatenate([kept[untouched], inj["kept"].astype(bool)])
    mixed_score = np.concatenate([score[untouched], inj[cfg.mixture_score]])
    is_clean = np.concatenate([np.ones(untouched.sum(), bool), np.zeros(len(found), bool)])
    units = int(mixed_rel.size)
    fit_clean = fit_mixture(score, kind=cfg.mixture_kind)
    fit_mixed = fit_mixture(mixed_score, kind=cfg.mixture_kind)
    est_clean, est_mixed = _mean(1 - rel), _mean(1 - mixed_rel)
    # A fit stopped by the EM cap gives no figure (n/a), as in the report's headline.
    mix_clean = _mean(posterior_noisy(fit_clean, score)) if fit_clean.converged else None
    mix_mixed = _mean(posterior_noisy(fit_mixed, mixed_score)) if fit_mixed.converged else None
    injected_rate = len(found) / units if units else None
    block = {
        "fraction_requested": cfg.inject_noise,
        "captions": rows.height,
        "units": units,
        "targets": int(len(targets)),
        "injected": len(found),
        "lost": lost,
        "injected_rate": injected_rate,
        "estimated_noise_clean": est_clean,
        "estimated_noise_mixed": est_mixed,
        "recovered_rate": _diff(est_mixed, est_clean),
        "recovery_ratio": (_diff(est_mixed, est_clean) / injected_rate) if injected_rate else None,
        "estimated_noise_kept_clean": _mean(1 - rel[kept]),
        "estimated_noise_kept_mixed": _mean(1 - mixed_rel[mixed_kept]),
        "mixture_noise_clean": mix_clean,
        "mixture_noise_mixed": mix_mixed,
        "mixture_recovered_rate": _diff(mix_mixed, mix_clean),
        "mixture_why_na": fit_clean.why_no_figure() or fit_mixed.why_no_figure(),
        "auroc_clean_vs_injected": auroc(mixed_rel, is_clean),
        # Injected units all name a part: compare with clean units that do too (no ungroundable ones)
        "auroc_tagged_clean_vs_injected": auroc(
            np.concatenate([rel[untouched & has_tags], inj["reliability"]]),
            np.concatenate([np.ones(int((untouched & has_tags).sum()), bool), np.zeros(len(found), bool)]),
        ),
        "injected_kept_fraction": _mean(inj["kept"]),
        "clean_kept_fraction": _mean(kept[untouched].astype(float)),
        "clip_model": shared.rsm_cfg.clip_model,
        "proposer": shared.rsm_cfg.proposer,
        "seed": cfg.seed,
    }
    if shared.correct is not None:
        # If every injected pair is wrong, true noise (all pairs) rises by the injected units that were right
        rise = float(shared.correct[list(found)].sum() / units) if units else None
        block["true_noise_rise"] = rise
        block["recovery_ratio_true"] = _diff(est_mixed, est_clean) / rise if rise else None
    slots = {p.target: p.slot for p in perturbed if p.slot is not None}
    if slots:
        # Attribute swaps: a colour word and a garment noun are different tests of sight; one AUROC hides
        # which the model fails (a changed garment is much harder to see than a changed colour)
        clean_tagged = rel[untouched & has_tags]
        by_slot = {}
        for slot in sorted(set(slots.values())):
            units_of = [u for t, u in found.items() if slots.get(t) == slot]
            slot_rel = np.array([u["reliability"] for u in units_of], dtype=np.float64)
            by_slot[slot] = {
                "injected": len(units_of),
                "auroc_tagged_clean_vs_injected": auroc(
                    np.concatenate([clean_tagged, slot_rel]),
                    np.concatenate([np.ones(clean_tagged.size, bool), np.zeros(slot_rel.size, bool)]),
                ),
                "injected_kept_fraction": _mean(np.array([u["kept"] for u in units_of], dtype=np.float64)),
            }
        block["by_slot"] = by_slot
    block["examples"] = [
        {
            "sample_id": clean["sample_id"][p.target],
            "person_id": clean["person_id"][p.target],
            "original": p.original,
            "injected": p.injected,
        }
        for p in perturbed
        if p.target in found
    ][:EXAMPLES]
    return block


def _unavailable(mode: str, reason: str) -> dict:
    return {"mode": mode, "available": False, "reason": reason}


def _identities(root: str | None) -> tuple[dict[int, AttributeWords] | None, str]:
    """The dataset's per-person attribute words, or None and why not."""
    if root is None:
        return None, "the manifest names no dataset folder (rsm.root) to look for the identity file in"
    try:
        identities = read_identity_attributes(root)
    except ValueError as exc:
        return None, str(exc)
    if identities is None:
        return None, (
            f"no {IDENTITIES_FILE} in the dataset folder {root}: the attribute swap needs each person's "
            "clothing, which only the synthetic benchmark (python -m storage.synth) writes"
        )
    return identities, ""


def run_injection(
    plan: RunPlan, run_config: RunConfig | None, manifest_path: Path, status_files: list, cfg: ReportConfig
) -> dict:
    """Estimator check, per mode of `cfg.inject_modes`: make a known fraction of text units wrong,
    re-score them with the RSM, and see how far the label-free estimates move (see the README).
    Returns the first mode's block with "modes": {mode: block} for every mode."""
    check_inject_modes(cfg.inject_modes)
    # Audit subset: captions mined "ok", re-mined clean with the same miner so both sides compare
    rng = np.random.default_rng(cfg.seed)
    ok = (
        scan_shards(status_files, STATUS_SCHEMA)
        .filter(pl.col("status") == "ok")
        .select("sample_id")
        .collect()
    )
    ids = np.sort(ok["sample_id"].to_numpy())
    if ids.size > cfg.inject_max_samples:
        ids = np.sort(rng.choice(ids, cfg.inject_max_samples, replace=False))
    rows = (
        pl.scan_parquet(str(manifest_path))
        .filter(pl.col("sample_id").is_in(ids.tolist()))
        .collect()
        .sort("sample_id")
    )
    root = image_root(plan, manifest_path)

    modes: dict[str, dict] = {}
    identities, why_not = _identities(root) if "attribute" in cfg.inject_modes else (None, "")
    if "attribute" in cfg.inject_modes and identities is None:
        modes["attribute"] = _unavailable("attribute", why_not)
    if all(m in modes for m in cfg.inject_modes):
        first = modes[cfg.inject_modes[0]]
        return {**first, "modes": modes}

    rsm_cfg = injection_rsm_config(run_config, cfg.clip_model)
    miner = RSMMiner(rsm_cfg)
    clean = pl.from_arrow(miner.mine(rows.to_arrow(), root).pairs)
    n = clean.height
    if n < 2:
        raise ValueError(
            f"injection: only {n} text unit(s) mined from {rows.height} captions; nothing to inject"
        )
    correct = None
    gt_rows = rows.filter(pl.col("gt_links").is_not_null())
    if gt_rows.height:
        _, _, correct = judge_pairs(clean.to_arrow(), gt_rows.to_arrow())
    shared = CleanSet(rows, clean, root, miner, rsm_cfg, correct)

    n_target = round(cfg.inject_noise * n)
    for mode in cfg.inject_modes:
        if mode in modes:
            continue
        # Every mode draws from the same stream state: "any" stays what it was alone, and "same-part"
        # swaps the very units "any" swaps (only the donors differ), a paired comparison
        mode_rng = copy.deepcopy(rng)
        extra = {}
        try:
            if mode == "attribute" and identities is not None:
                targets, perturbed, alterable = attribute_perturbations(
                    clean, rows, identities, mode_rng, n_target
                )
                extra["alterable_units"] = alterable
            else:
                targets, perturbed = swap_perturbations(clean, rows, mode_rng, n_target, mode == "same-part")
        except NoiseUnavailable as exc:
            modes[mode] = _unavailable(mode, str(exc))
            continue
        modes[mode] = {
            "mode": mode,
            "available": True,
            **_score_mode(shared, targets, perturbed, cfg),
            **extra,
        }
    first = modes[cfg.inject_modes[0]]
    return {**first, "modes": {m: modes[m] for m in cfg.inject_modes}}
