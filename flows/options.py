"""The `mine-rsm` parameters: one typed table of them (`MineParams`), the argparse CLI derived from it,
and their validation into the resolved `MineOptions` the pipeline runs on.

Consumes user parameters (CLI flags, flow parameters, deployment `--param`s); produces `MineOptions`
(paths resolved, an `RSMConfig` built). The RSM settings' defaults are read from `RSMConfig` and
`MatchConfig` themselves, so each default is written once; the flow signature in flows/mine_rsm.py
lists the same names with these defaults, and a test holds it to this table.
"""

from __future__ import annotations

import argparse
import types
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from miners.bank import BankError
from miners.matching import MATCH_MODES, MatchConfig
from miners.model_folder import CROP_MODES, clip_folder_problem, model_fingerprint
from miners.regions import PROPOSER_NAMES
from miners.rsm import RSMConfig, load_companions
from miners.run_config import run_config_for
from storage.shards import RUN_FILE, config_changes, load_run_plan

CLIP_MODEL_HINT = (
    "pass --clip-model DIR (a CLIP folder saved with save_pretrained); `make demo` bootstraps a tiny one "
    "in outputs/demo/models/tiny-clip"
)


def _rsm_default(name: str) -> Any:
    """RSMConfig's default for `name` (the single place RSM defaults are written)."""
    f = next(f for f in fields(RSMConfig) if f.name == name)
    return f.default


def _opt(default: Any, help: str, **meta: Any) -> Any:
    return field(default=default, metadata={"help": help, **meta})


@dataclass(frozen=True)
class MineParams:
    """Every parameter of `mine-rsm` (flow, CLI, deployments), with its one default.

    metadata: `help`; `choices`; `flag` (a CLI flag other than --name-with-dashes); `cli=False` for
    parameters only the flow takes.
    """

    manifest: str = field(metadata={"help": "manifest Parquet (python -m storage.manifest)"})
    out: str = field(metadata={"help": "shard folder; an unfinished run there is resumed"})
    clip_model: str | None = _opt(None, "CLIP from_pretrained folder (required)")
    calibrator: str | None = _opt(
        None, "reliability calibrator JSON (default: rsm-calibrator.json in the CLIP folder, else the prior)"
    )
    proposer: str = _opt(_rsm_default("proposer"), "region proposer", choices=PROPOSER_NAMES)
    sam_checkpoint: str | None = _opt(None, "segment-anything .pth (sam-* proposers)")
    sam_model_type: str = _opt(_rsm_default("sam_model_type"), "vit_b | vit_l | vit_h | tiny")
    crop_mode: str = _opt(_rsm_default("crop_mode"), "how a region is cropped for CLIP", choices=CROP_MODES)
    match_mode: str = _opt(MatchConfig().mode, "matching features", choices=MATCH_MODES)
    images_per_batch: int = _opt(_rsm_default("images_per_batch"), "images per CLIP batch")
    max_batch_pixels: int = _opt(
        _rsm_default("max_batch_pixels"),
        "decoded pixels (width*height, from headers) one mining batch may hold; bounds worker memory",
    )
    shard_size: int = _opt(256, "manifest rows per shard (images are never split)")
    ray_address: str | None = _opt(None, "Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    max_workers: int | None = _opt(None, "at most this many Ray actors (default: CPU/GPU slots)")
    gpus_per_worker: float = _opt(1.0, "GPU share per actor where Ray reports GPUs (e.g. 0.5)")
    max_retries: int = _opt(2, "retries per shard before the run fails naming it")
    shard_timeout_s: float | None = _opt(
        None, "seconds before a worker stuck on one shard is killed", flag="--shard-timeout"
    )
    rounds: int = _opt(
        0,
        "refine rounds: mine, fine-tune the CLIP on the kept pairs (miners.refine_clip), mine again; OUT is the last",
    )
    refine_epochs: int = _opt(2, "epochs of each refine round")
    calibration_manifest: str | None = _opt(
        None,
        "manifest with ground truth to refit each refined model's calibrator (default: the start model's)",
    )
    qa_out: str | None = _opt(None, "also write the QA report (python -m qa.report) into this folder")
    qa_inject_noise: float | None = _opt(
        None, "with --qa-out: also run QA's injection check at this fraction (each mode, each round)"
    )
    progress_bar: bool = _opt(False, "show a tqdm bar (the CLI turns it on)", cli=False)


def param_defaults() -> dict[str, Any]:
    """name -> default of every MineParams field that has one."""
    return {f.name: f.default for f in fields(MineParams) if f.default is not MISSING}


def _cli_type(annotation: Any) -> type:
    if get_origin(annotation) in (Union, types.UnionType):
        annotation = next(a for a in get_args(annotation) if a is not type(None))
    return annotation


def add_param_arguments(parser: argparse.ArgumentParser) -> None:
    """One CLI flag per MineParams field: type, default, choices and help taken from the table."""
    hints = get_type_hints(MineParams)
    for f in fields(MineParams):
        if not f.metadata.get("cli", True):
            continue
        flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
        kwargs: dict[str, Any] = {
            "dest": f.name,
            "type": _cli_type(hints[f.name]),
            "help": f.metadata["help"],
        }
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if f.default is MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = f.default
            if f.default is not None:
                kwargs["help"] += f" (default {f.default})"
        parser.add_argument(flag, **kwargs)


def cli_parser(description: str) -> argparse.ArgumentParser:
    """The `python -m flows.mine_rsm` parser: MineParams' flags plus the CLI's own (built here, in a module
    without Prefect or Ray, so that `--help` answers without importing them)."""
    p = argparse.ArgumentParser(prog="python -m flows.mine_rsm", description=description)
    add_param_arguments(p)
    p.add_argument("--no-prefect", action="store_true", help="run the same pipeline without Prefect")
    p.add_argument(
        "--debug", action="store_true", help="keep Python tracebacks (default: one line per error)"
    )
    return p


@dataclass(frozen=True)
class MineOptions:
    """Validated parameters: absolute paths and the resolved RSMConfig (what the pipeline runs on)."""

    manifest: str
    out: str
    config: RSMConfig
    shard_size: int
    ray_address: str | None
    max_workers: int | None
    gpus_per_worker: float
    max_retries: int
    shard_timeout_s: float | None
    rounds: int = 0
    refine_epochs: int = 2
    calibration_manifest: str | None = None

    def __post_init__(self) -> None:
        if self.rounds < 0:
            raise ValueError(f"rounds must be >= 0, got {self.rounds}")
        if self.rounds and self.refine_epochs < 1:
            raise ValueError(f"refine_epochs must be >= 1, got {self.refine_epochs}")
        if not isinstance(self.shard_size, int) or self.shard_size < 1:
            raise ValueError(f"shard_size must be a positive integer, got {self.shard_size!r}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
        if self.shard_timeout_s is not None and self.shard_timeout_s <= 0:
            raise ValueError(f"shard_timeout_s must be > 0 (or unset), got {self.shard_timeout_s}")
        if self.max_workers is not None and self.max_workers < 1:
            raise ValueError(f"max_workers must be >= 1 (or unset), got {self.max_workers}")
        if self.gpus_per_worker < 0:
            raise ValueError(f"gpus_per_worker must be >= 0, got {self.gpus_per_worker}")


def rounds_dir(out: str | Path) -> Path:
    out = Path(out)
    return out.parent / f"{out.name}-rounds"


def round_out(opts: MineOptions, k: int) -> Path:
    """Where round k's shards go: the last round is OUT itself."""
    return Path(opts.out) if k == opts.rounds else rounds_dir(opts.out) / f"round-{k}" / "shards"


class PreflightError(ValueError):
    """Every problem with a run's parameters, found before Ray or Prefect do any work."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        head = "1 problem" if len(problems) == 1 else f"{len(problems)} problems"
        super().__init__(
            f"{head} before mining: " + " ".join(f"({k}) {p}" for k, p in enumerate(problems, 1))
        )


def _fix(name: str, value: str) -> str:
    """How to set parameter `name`, on the CLI and on a deployment."""
    return f"pass --{name.replace('_', '-')} {value} (deployments: --param {name}={value})"


def preflight(p: MineParams) -> list[str]:
    """Every prerequisite of a run, checked at once; each problem says what fixes it."""
    problems = []
    if p.clip_model is None:
        problems.append(f"no CLIP model given: {_fix('clip_model', 'DIR')}; {CLIP_MODEL_HINT}")
    elif clip_problem := clip_folder_problem(Path(p.clip_model).resolve()):
        problems.append(f"{clip_problem}; {_fix('clip_model', 'DIR')} (README: Using real checkpoints)")
    if not Path(p.manifest).is_file():
        problems.append(
            f"manifest {p.manifest} does not exist; build it with `python -m storage.manifest` "
            "(`make demo` builds outputs/demo/manifest.parquet)"
        )
    else:
        root = _manifest_root(Path(p.manifest))
        if root is not None and not Path(root).is_dir():
            problems.append(f"the manifest's dataset root {root} is not a folder (re-import the dataset)")
    for f in fields(MineParams):
        value, valid = getattr(p, f.name), f.metadata.get("choices")
        if valid is not None and value not in valid:
            problems.append(f"{f.name} {value!r} is not one of {', '.join(valid)}")
    if p.proposer.startswith("sam") and not p.sam_checkpoint:
        problems.append(
            f"proposer {p.proposer!r} needs a segment-anything .pth: {_fix('sam_checkpoint', 'PATH')}"
        )
    if p.sam_checkpoint and not Path(p.sam_checkpoint).is_file():
        problems.append(f"SAM checkpoint {p.sam_checkpoint} does not exist")
    if p.calibrator and not Path(p.calibrator).is_file():
        problems.append(f"calibrator {p.calibrator} does not exist")
    if p.calibration_manifest and not Path(p.calibration_manifest).is_file():
        problems.append(f"calibration manifest {p.calibration_manifest} does not exist")
    if p.qa_inject_noise is not None and not 0 < p.qa_inject_noise < 1:
        problems.append(f"qa_inject_noise must be a fraction in (0, 1), got {p.qa_inject_noise}")
    out = Path(p.out)
    if out.exists() and not out.is_dir():
        problems.append(f"--out {out} is a file, not a shard folder")
    return problems


def _manifest_root(path: Path) -> str | None:
    import pyarrow.parquet as pq

    try:
        meta = pq.read_schema(path).metadata or {}
    except Exception:  # an unreadable manifest is plan_shards' to report, with its own message
        return None
    root = meta.get(b"rsm.root")
    return root.decode() if root else None


def build_options(params: MineParams) -> MineOptions:
    """Validate parameters up front (before Ray or Prefect do any work; every problem at once, as one
    PreflightError) and resolve paths."""
    p = params
    problems = preflight(p)
    if problems:
        raise PreflightError(problems)
    clip_dir = Path(p.clip_model).resolve()
    config = RSMConfig(
        clip_model=str(clip_dir),  # absolute: Ray workers do not share the driver's working directory
        calibrator=str(Path(p.calibrator).resolve()) if p.calibrator else None,
        proposer=p.proposer,
        sam_checkpoint=str(Path(p.sam_checkpoint).resolve()) if p.sam_checkpoint else None,
        sam_model_type=p.sam_model_type,
        crop_mode=p.crop_mode,
        match=MatchConfig(mode=p.match_mode),
        images_per_batch=p.images_per_batch,
        max_batch_pixels=p.max_batch_pixels,
    )
    # Another run in OUT first: its own message (old and new values) says what changed, where the bank
    # check below would blame the bank for a changed --crop-mode
    if changes := other_run_in_out(p, config):
        raise PreflightError([changes])
    try:  # the bank and calibrator beside the model: a stale one fails here, not in every Ray worker
        load_companions(config, model_fingerprint(clip_dir))
    except (BankError, ValueError, FileNotFoundError, OSError, KeyError) as exc:
        raise PreflightError([f"{exc} (or pass another --clip-model / --calibrator)"]) from exc
    return MineOptions(
        manifest=str(p.manifest),
        out=str(p.out),
        config=config,
        shard_size=p.shard_size,
        ray_address=p.ray_address,
        max_workers=p.max_workers,
        gpus_per_worker=p.gpus_per_worker,
        max_retries=p.max_retries,
        shard_timeout_s=p.shard_timeout_s,
        rounds=p.rounds,
        refine_epochs=p.refine_epochs,
        calibration_manifest=str(Path(p.calibration_manifest).resolve()) if p.calibration_manifest else None,
    )


def other_run_in_out(p: MineParams, config: RSMConfig) -> str | None:
    """Why OUT (or, with rounds, its round-0 folder: the first one mined) cannot be resumed with these
    settings: each changed config key with its old and new value, and a changed shard size; None when it
    holds no run or the same one. The manifest's content is compared later, when the shards are planned
    (that reads the whole manifest)."""
    folder = rounds_dir(p.out) / "round-0" / "shards" if p.rounds else Path(p.out)
    if not (folder / RUN_FILE).is_file():
        return None
    try:
        stored = load_run_plan(folder)
    except Exception:  # unreadable: begin_run says what is wrong with it
        return None
    changed = config_changes(stored.config, run_config_for(config).to_dict())
    if stored.shard_size != p.shard_size:
        changed.append(f"shard_size {stored.shard_size} -> {p.shard_size}")
    if not changed:
        return None
    return (
        f"{folder} holds run {stored.run_id}, mined with other settings: {'; '.join(changed)}. Its committed "
        "shards would mix with this run's, so this is refused: mine into a new --out folder, or pass the "
        "old values to resume that run"
    )


def params_from(**values: Any) -> MineParams:
    """MineParams from keyword values (unknown names are a TypeError naming them)."""
    unknown = set(values) - {f.name for f in fields(MineParams)}
    if unknown:
        raise TypeError(f"unknown mine-rsm parameter(s): {', '.join(sorted(unknown))}")
    return MineParams(**values)


__all__ = [
    "CLIP_MODEL_HINT",
    "PreflightError",
    "preflight",
    "MineOptions",
    "MineParams",
    "add_param_arguments",
    "build_options",
    "cli_parser",
    "other_run_in_out",
    "param_defaults",
    "params_from",
    "round_out",
    "rounds_dir",
]
