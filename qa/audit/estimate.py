"""The noise rate from a stratified audit sample, with a 95% interval.

Consumes per-item verdicts (one per item after combining annotators), each item's stratum, and the
strata's population sizes; produces, for a domain of strata (kept pairs, or all pairs), the
inverse-probability-weighted estimate of the share of wrong pairs and its interval.

Method ("stratified Wilson, effective n"): the estimate is p̂ = Σ_h W_h·x_h/n_h with W_h = N_h/N the
stratum's share of the domain, x_h wrong verdicts out of n_h labelled items. Its variance is
V = Σ_h W_h²·(1 − n_h/N_h)·p̃_h(1 − p̃_h)/n_h, with p̃_h = (x_h + ½)/(n_h + 1) so that a stratum whose
sample holds no wrong pair still carries variance (the plain p̂_h would claim certainty). The design's
effective sample size n* = p̃(1 − p̃)/V (capped at Σ n_h; p̃ = Σ W_h p̃_h) goes into the Wilson score
interval around p̂ (Korn & Graubard 1998 use the same effective-n device with Clopper–Pearson); Wilson
behaves at rates near 0, where the normal interval would reach below zero. A stratum of the domain
without a single label makes its share unknown: the interval then spans it whole (its rate taken as 0
for ci_low and 1 for ci_high) and `unlabelled_share` says how much.

"unsure" verdicts are reported twice: left out (the main figure) and counted wrong.
"""

from __future__ import annotations

import math
from collections import Counter

Z95 = 1.959963984540054
METHOD = "stratified Wilson (effective n), inverse-probability weighted; unsure excluded"


def combine_annotators(by_annotator: dict[str, str]) -> str:
    """One verdict from several annotators: the majority; a tie is `unsure`."""
    counts = Counter(by_annotator.values()).most_common()
    if not counts:
        raise ValueError("no verdicts to combine")
    if len(counts) > 1 and counts[0][1] == counts[1][1]:
        return "unsure"
    return counts[0][0]


def wilson(p_hat: float, n: float, z: float = Z95) -> tuple[float, float]:
    if n <= 0:
        return 0.0, 1.0
    denom = 1.0 + z * z / n
    centre = (p_hat + z * z / (2 * n)) / denom
    half = z * math.sqrt(max(0.0, p_hat * (1 - p_hat) / n + z * z / (4 * n * n))) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def stratified_rate(
    wrong: dict[int, int], labelled: dict[int, int], population: dict[int, int], method: str = METHOD
) -> dict:
    """{estimate, ci_low, ci_high, n_labels, method, unlabelled_share, strata} over the strata in
    `population` (stratum -> N_h); `wrong` / `labelled` give x_h and n_h per stratum."""
    total = sum(population.values())
    if total == 0:
        return {"estimate": None, "ci_low": None, "ci_high": None, "n_labels": 0, "method": method}
    est = var = p_tilde = 0.0
    missing = 0.0
    n_labels = 0
    strata = []
    for h, n_pop in sorted(population.items()):
        w = n_pop / total
        n_h, x_h = labelled.get(h, 0), wrong.get(h, 0)
        strata.append({"stratum": h, "N": n_pop, "n": n_h, "wrong": x_h, "weight": w})
        if n_h == 0:
            missing += w
            continue
        n_labels += n_h
        est += w * x_h / n_h
        pt = (x_h + 0.5) / (n_h + 1.0)
        p_tilde += w * pt
        fpc = max(0.0, 1.0 - n_h / n_pop) if n_pop > 0 else 0.0
        var += w * w * fpc * pt * (1 - pt) / n_h
    if n_labels == 0:
        return {
            "estimate": None,
            "ci_low": 0.0,
            "ci_high": 1.0,
            "n_labels": 0,
            "method": method,
            "unlabelled_share": 1.0,
            "strata": strata,
        }
    covered = 1.0 - missing
    # The labelled strata's rate, then widened by the share nobody looked at.
    rate = est / covered
    p_t = p_tilde / covered
    v = var / (covered * covered)
    n_eff = n_labels if v <= 0 else min(float(n_labels), p_t * (1 - p_t) / v)
    lo, hi = wilson(rate, n_eff)
    return {
        "estimate": rate if missing == 0 else None,
        "ci_low": lo * covered,
        "ci_high": hi * covered + missing,
        "n_labels": n_labels,
        "n_effective": n_eff,
        "method": method,
        "unlabelled_share": missing,
        "strata": strata,
    }


def noise_rates(verdict: dict[int, str], stratum_of: dict[int, int], strata: list[dict]) -> dict[str, dict]:
    """`noise_rate_kept` and `noise_rate_all` from combined verdicts (item -> correct|wrong|unsure),
    each with `unsure_counted_wrong` beside the main (unsure excluded) figure."""
    out = {}
    for key, domain in (
        ("noise_rate_kept", [s for s in strata if s["kept"]]),
        ("noise_rate_all", strata),
    ):
        population = {s["stratum"]: s["n_population"] for s in domain}
        figures = {}
        for unsure_as in ("excluded", "wrong"):
            wrong: Counter = Counter()
            labelled: Counter = Counter()
            for item, v in verdict.items():
                h = stratum_of[item]
                if h not in population or (v == "unsure" and unsure_as == "excluded"):
                    continue
                labelled[h] += 1
                wrong[h] += v != "correct"
            method = (
                METHOD if unsure_as == "excluded" else METHOD.replace("unsure excluded", "unsure as wrong")
            )
            figures[unsure_as] = stratified_rate(dict(wrong), dict(labelled), population, method)
        main = figures["excluded"]
        n_unsure = sum(1 for i, v in verdict.items() if v == "unsure" and stratum_of[i] in population)
        out[key] = {
            **main,
            "n_unsure": n_unsure,
            "unsure_counted_wrong": {
                k: figures["wrong"][k] for k in ("estimate", "ci_low", "ci_high", "n_labels", "method")
            },
        }
    return out
