"""The run config: the one versioned shape a mining run is identified by, and the one reader of it.

Consumes an `RSMConfig` (to build it) or a run folder (to read it back); produces a `RunConfig`. It is
stored as the plan's `config` in `OUT/_run.json` (see storage.shards) in exactly this shape:

    {"version": 1,
     "rsm": {...RSMConfig fields, without the runtime-only ones (RSMConfig.RUNTIME_FIELDS)...},
     "fingerprints": {"clip_model": "<sha256[:16] of the CLIP folder>",
                      "calibrator": "<sha256[:16] of the calibrator file, or 'default-prior'>",
                      "bank": "<sha256[:16] of the reference bank's arrays (miners.bank), or 'none'>"}}

Everything that needs a run's settings (resume, QA, training, benchmarks) calls `read_run_config`;
nobody searches the JSON. Runtime-only fields (device, batch size) change speed, not output, so they
are not part of the identity and read back as their defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from miners.bank import bank_fingerprint
from miners.model_folder import model_fingerprint
from miners.rsm import RSMConfig, bank_folder, calibrator_fingerprint
from storage.plan import RunPlan
from storage.reader import read_pairs
from storage.shards import load_run_plan

RUN_CONFIG_VERSION = 1


class RunConfigError(ValueError):
    """A run folder's config is not in the shape this version reads."""


@dataclass(frozen=True)
class RunConfig:
    rsm: RSMConfig
    fingerprints: dict[str, str] = field(default_factory=dict)  # clip_model, calibrator
    version: int = RUN_CONFIG_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "rsm": self.rsm.identity_dict(),
            "fingerprints": dict(self.fingerprints),
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "run config") -> RunConfig:
        if not isinstance(data, dict) or data.get("version") != RUN_CONFIG_VERSION or "rsm" not in data:
            got = data.get("version") if isinstance(data, dict) else type(data).__name__
            raise RunConfigError(
                f"{where}: not a version-{RUN_CONFIG_VERSION} run config (version {got!r}); it was written by "
                "another release of this project: re-mine into a new --out folder"
            )
        try:
            rsm = RSMConfig.from_dict(data["rsm"])
        except TypeError as exc:
            raise RunConfigError(f"{where}: bad 'rsm' block ({exc})") from exc
        return cls(rsm=rsm, fingerprints=dict(data.get("fingerprints") or {}))


def run_config_for(cfg: RSMConfig) -> RunConfig:
    """The identity of a run mined with `cfg`: its settings plus the content hashes of the CLIP folder
    and the calibrator (a model or calibrator changed in place must not mix with older shards)."""
    fingerprints = {
        "clip_model": model_fingerprint(cfg.clip_model),
        "calibrator": calibrator_fingerprint(cfg),
        "bank": bank_fingerprint(folder) if (folder := bank_folder(cfg)) is not None else "none",
    }
    return RunConfig(rsm=cfg, fingerprints=fingerprints)


def read_committed_run(run_dir: str | Path) -> tuple[RunPlan, RunConfig, pa.Table]:
    """(plan, config, every pair) of a finished run, each read and checked through the run manifest
    (what training and refinement start from)."""
    return load_run_plan(run_dir), read_run_config(run_dir), read_pairs(run_dir)


def read_run_config(run_dir: str | Path) -> RunConfig:
    """The config of the run in `run_dir` (ShardStoreError if it is no run folder)."""
    plan = load_run_plan(run_dir)
    return RunConfig.from_dict(plan.config, where=f"{Path(run_dir) / '_run.json'}")


__all__ = [
    "RUN_CONFIG_VERSION",
    "RunConfig",
    "RunConfigError",
    "read_committed_run",
    "read_run_config",
    "run_config_for",
]
