"""The QA estimator check: inject known noise, re-score it with the RSM, and see whether the report's
label-free estimates notice.

Consumes a committed run (its plan, status shards and manifest) and a `qa.report.ReportConfig`; swaps a
known fraction of text units for units of other persons' captions, re-mines the perturbed captions with
the run's RSM settings, finds each swapped-in unit by char span, and produces the qa.json "injection"
block: injected rate, how far the estimated noise moves, AUROC of reliability clean vs injected.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from miners.caption_noise import pick_donor, swap_unit
from miners.metrics import auroc
from miners.rsm import RSMConfig, RSMMiner
from miners.run_config import RunConfig
from qa.checks import scan_shards
from qa.config import ReportConfig
from qa.mixture import fit_mixture, posterior_noisy
from storage.plan import RunPlan
from storage.schemas import STATUS_SCHEMA
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


def run_injection(
    plan: RunPlan, run_config: RunConfig | None, manifest_path: Path, status_files: list, cfg: ReportConfig
) -> dict:
    """Estimator check: swap a known fraction of text units for units of other persons' captions,
    re-score them with the RSM, and see how far the label-free estimates move (see the README)."""
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
    root = (pq.read_schema(manifest_path).metadata or {}).get(b"rsm.root", b"").decode() or plan.manifest_root
    rsm_cfg = injection_rsm_config(run_config, cfg.clip_model)
    miner = RSMMiner(rsm_cfg)
    clean = pl.from_arrow(miner.mine(rows.to_arrow(), root).pairs)
    n = clean.height
    if n < 2:
        raise ValueError(
            f"injection: only {n} text unit(s) mined from {rows.height} captions; nothing to inject"
        )

    # Swap units that name a body part (the ones that can be right) for another person's such units:
    # the text still names a part, so only the image side can tell the pair is wrong
    n_target = round(cfg.inject_noise * n)
    persons = clean["person_id"].to_numpy()
    tagged = np.flatnonzero(clean["part_tags"].list.len().to_numpy() > 0)
    untagged = np.setdiff1d(np.arange(n), tagged)
    first = rng.choice(tagged, size=min(n_target, tagged.size), replace=False)
    rest = rng.choice(untagged, size=n_target - first.size, replace=False)
    targets = np.sort(np.concatenate([first, rest]).astype(np.int64))
    pool = tagged if tagged.size else np.arange(n)
    captions = dict(rows.select("sample_id", "caption").iter_rows())
    row_of = {r["sample_id"]: r for r in rows.iter_rows(named=True)}
    perturbed, spans = [], {}
    for t in targets:
        unit = clean.row(int(t), named=True)
        d = pick_donor(rng, pool, persons, persons[t])
        if d is None:
            continue
        sid = f"{unit['sample_id']}#inject{int(t)}"
        caption, span = swap_unit(
            captions[unit["sample_id"]], unit["char_start"], unit["char_end"], clean["sentence"][d]
        )
        perturbed.append({**row_of[unit["sample_id"]], "sample_id": sid, "caption": caption})
        spans[sid] = (int(t), *span)
    mined = pl.from_arrow(
        miner.mine(pa.Table.from_pylist(perturbed, schema=rows.to_arrow().schema), root).pairs
    )

    # Find each swapped-in unit by char span (the splitter may cut it a little differently)
    found: dict[int, dict] = {}
    for sid, units in mined.group_by("sample_id"):
        t, s0, s1 = spans[sid[0]]
        overlap = np.minimum(units["char_end"].to_numpy(), s1) - np.maximum(
            units["char_start"].to_numpy(), s0
        )
        best = int(np.argmax(overlap))
        if overlap[best] * 2 >= s1 - s0:
            found[t] = units.row(best, named=True)
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
    has_tags = (clean["part_tags"].list.len().to_numpy() > 0)[base]
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
    mix_clean = _mean(posterior_noisy(fit_clean, score))
    mix_mixed = _mean(posterior_noisy(fit_mixed, mixed_score))
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
        "auroc_clean_vs_injected": auroc(mixed_rel, is_clean),
        # Injected units all name a part: compare with clean units that do too (no ungroundable ones)
        "auroc_tagged_clean_vs_injected": auroc(
            np.concatenate([rel[untouched & has_tags], inj["reliability"]]),
            np.concatenate([np.ones(int((untouched & has_tags).sum()), bool), np.zeros(len(found), bool)]),
        ),
        "injected_kept_fraction": _mean(inj["kept"]),
        "clean_kept_fraction": _mean(kept[untouched].astype(float)),
        "clip_model": rsm_cfg.clip_model,
        "proposer": rsm_cfg.proposer,
        "seed": cfg.seed,
    }
    gt_rows = rows.filter(pl.col("gt_links").is_not_null())
    if gt_rows.height:
        # If every injected pair is wrong, true noise (all pairs) rises by the swapped units that were right
        _, _, correct = judge_pairs(clean.to_arrow(), gt_rows.to_arrow())
        block["true_noise_rise"] = float(correct[list(found)].sum() / units) if units else None
    return block
