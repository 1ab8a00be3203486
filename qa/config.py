"""`ReportConfig`: every setting of a QA report and its default (qa.report's CLI and the flow's
`--qa-out` both build one; qa.inject reads the injection settings from it)."""

from __future__ import annotations

from dataclasses import dataclass

# How qa.inject makes a unit wrong: "any" swaps in a part-naming unit of another person, "same-part" one
# naming the same body part(s), "attribute" replaces one colour or garment word by one the person lacks
INJECT_MODES: tuple[str, ...] = ("any", "same-part", "attribute")


def parse_inject_modes(text: str) -> tuple[str, ...]:
    """ "any,same-part" -> ("any", "same-part"); "all" -> INJECT_MODES. Order kept, repeats dropped."""
    names = [m.strip() for m in text.split(",") if m.strip()]
    modes = INJECT_MODES if names == ["all"] else tuple(dict.fromkeys(names))
    check_inject_modes(modes)
    return modes


def check_inject_modes(modes: tuple[str, ...]) -> None:
    unknown = [m for m in modes if m not in INJECT_MODES]
    if not modes or unknown:
        raise ValueError(
            f"inject modes must be a non-empty list of {', '.join(INJECT_MODES)} (or all), got {list(modes)}"
        )


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
    inject_modes: tuple[str, ...] = ("any",)  # INJECT_MODES; the first fills qa.json "injection" itself
    ece_bins: int = 10
    audit: str | None = None  # a `qa.audit fit --out` folder: its figures go into the report
