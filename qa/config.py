"""`ReportConfig`: every setting of a QA report and its default (qa.report's CLI and the flow's
`--qa-out` both build one; qa.inject reads the injection settings from it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ReportConfig:
    sheet_samples: int = 24  # per band; 0 draws no sheets
    seed: int = 0
    mixture_score: str = "clip_cosine"  # any numeric pairs column (per-pair similarity, as in RDE)
    mixture_kind: str = "gaussian"  # gaussian | beta (beta needs a score in [0, 1])
    check_hashes: bool = True  # sha256 every listed file (reads every byte)
    ground_truth: bool = True  # judge pairs against the manifest's gt_links where present
    allow_partial: bool = False  # report on the committed shards of an unfinished run
    inject_noise: float | None = None  # fraction of text units to swap (estimator check)
    clip_model: str | None = None  # for the injection; default: the run config's
    inject_max_samples: int = 512  # captions re-mined for the injection
    ece_bins: int = 10
