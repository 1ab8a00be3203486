"""ROGLE training: global identity-aware contrastive + reliability-weighted region–sentence alignment.

Consumes committed pair shards (read through their run manifest, never a glob), the manifest they were
mined from (images, captions, person ids, splits, ground truth), and a CLIP folder to start from (the
tiny bootstrapped CLIP by default; a real CLIP such as ViT-B/16 when given); produces a run folder
(see miners/training/trainer.py): resolved config, resumable checkpoint, history, `metrics.json` with R1, R5,
R10, mAP, mINP, local_grounding_acc and a `long_query` block, and `curves.png`.

    python -m miners.train_rogle [--pairs SHARDS] [--manifest M] [--init DIR] [--out RUN_DIR]
        [--epochs N] [--no-local] [--no-reliability] [--seed S] [--resume | --overwrite]

Run folders never overwrite each other: without `--out` each run gets a new folder
`outputs/train/<UTC time>/` (and `outputs/train/latest` points at it); an `--out` that already holds a
run is refused unless `--resume` (continue it) or `--overwrite` (replace it) is given.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import shutil
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from miners.model_folder import clip_folder_problem, resolve_model_ref
from miners.training.config import (
    GLOBAL_LOSS_NAMES,
    IMAGE_AUGMENT_NAMES,
    METHOD_NAMES,
    TrainConfig,
    training_settings,
)
from miners.training.recipes import PRESETS, RecipeError, resolve_config

# torch, transformers, pyarrow and the trainer are imported in `main`, after the arguments are parsed:
# `--help` and a refused command answer in well under a second


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m miners.train_rogle", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--pairs",
        type=Path,
        help="committed shard folder (has _SUCCESS); without it the run is global-only and needs --manifest "
        "and --init",
    )
    ap.add_argument("--manifest", type=Path, help="default: the manifest the shards were mined from")
    ap.add_argument(
        "--init",
        help="CLIP to start from: a from_pretrained folder, a Hugging Face model id found in the local HF "
        "cache, or an OpenAI CLIP .pt checkpoint (converted once, see python -m miners.convert_clip; "
        "default: the mining run's CLIP)",
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"run folder (default: a new {DEFAULT_RUNS}/<UTC time>/, with {DEFAULT_RUNS}/latest pointing at it)",
    )
    recipe = ap.add_argument_group(
        "recipe",
        "every setting below defaults to the preset's (without --preset: tiny), then to --config FILE; a flag "
        "given here wins. The resolved settings are saved as RUN_DIR/config.json",
    )
    recipe.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="tiny: fine-tuning the tiny bootstrapped CLIP (lr 1e-4, 10 epochs; the default); irra-b16: "
        "IRRA's published recipe for CLIP ViT-B/16 (Adam 1e-5, 60 epochs, SDM + ID + MLM, augmentations)",
    )
    recipe.add_argument("--config", type=Path, help="a YAML or JSON file of TrainConfig fields")
    recipe.add_argument(
        "--method",
        choices=list(METHOD_NAMES),
        help="the training method (docs/methods.md): rogle (default: global alignment + the local branch on "
        "mined pairs), irra, park, scmm, ivt",
    )
    recipe.add_argument(
        "--local",
        choices=["none", "rsm"],
        help="rsm: add ROGLE's reliability-weighted region–sentence branch on the mined pairs to the method "
        "(rogle: on by default with --pairs)",
    )
    recipe.add_argument(
        "--method-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="one of the method's own options (docs/methods.md), repeatable; e.g. --method-option stripes=4",
    )
    recipe.add_argument("--epochs", type=int)
    recipe.add_argument("--batch-size", type=int)
    recipe.add_argument("--lr", type=float, help="base learning rate (tiny: 1e-4)")
    recipe.add_argument("--no-local", action="store_true", help="no local branch (= --local none)")
    recipe.add_argument("--no-reliability", action="store_true", help="uniform weights for the local pairs")
    recipe.add_argument("--local-weight", type=float, help="weight of the local branch (default 0.5)")
    recipe.add_argument("--reliability-threshold", type=float, help="pairs below it are not used (0.5)")
    recipe.add_argument(
        "--text-mode",
        choices=["sentence-pool", "truncate"],
        help="how a long caption becomes one global text embedding in training and the headline figures "
        "(tiny: sentence-pool; irra-b16: truncate at 77 tokens); metrics.json has both",
    )
    recipe.add_argument("--global-loss", choices=list(GLOBAL_LOSS_NAMES), help="default identity-infonce")
    recipe.add_argument(
        "--id-loss", type=float, metavar="W", help="weight of the identity classification loss (0: off)"
    )
    recipe.add_argument(
        "--mlm",
        type=float,
        metavar="W",
        help="weight of IRRA's masked-language modelling through fusion (0: off)",
    )
    recipe.add_argument(
        "--augment",
        choices=list(IMAGE_AUGMENT_NAMES),
        help="image augmentation: none, or irra (flip, pad-crop, erasing)",
    )
    recipe.add_argument(
        "--text-augment", action="store_true", help="token mask / replace / delete on the global text (RDE)"
    )
    recipe.add_argument("--seed", type=int)
    recipe.add_argument("--eval-every", type=int, help="evaluate every N epochs (and after the last; 1)")
    recipe.add_argument(
        "--log-every", type=int, help="one log line and a steps.csv row every N steps (0: off; 50)"
    )
    recipe.add_argument(
        "--tensorboard",
        action="store_true",
        help="also write TensorBoard event files to RUN_DIR/tensorboard/",
    )
    recipe.add_argument("--device", help="auto (CUDA when present), cpu, cuda:N")
    ap.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoint")
    ap.add_argument("--overwrite", action="store_true", help="replace what RUN_DIR holds")
    args = ap.parse_args(argv)
    if args.resume and args.overwrite:
        ap.error("--resume and --overwrite exclude each other")
    return args


DEFAULT_RUNS = Path("outputs/train")


def new_run_dir(runs: Path = DEFAULT_RUNS) -> Path:
    """A folder under `runs` that does not exist yet, named by the UTC time."""
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    out, k = runs / stamp, 1
    while out.exists():
        k += 1
        out = runs / f"{stamp}-{k}"
    return out


def point_latest(run_dir: Path) -> None:
    """`<runs>/latest` -> run_dir (a relative symlink, swapped in atomically)."""
    link = run_dir.parent / "latest"
    tmp = run_dir.parent / ".latest.tmp"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(run_dir.name)
    os.replace(tmp, link)


def claim_run_dir(out: Path | None, resume: bool, overwrite: bool) -> tuple[Path | None, str | None]:
    """(the run folder to write, None) or (None, why it is refused)."""
    if out is None:
        if resume:
            return None, "--resume needs --out RUN_DIR (the run to continue)"
        return new_run_dir(), None
    if out.exists() and not out.is_dir():
        return None, f"--out {out} is a file, not a run folder"
    holds_run = out.is_dir() and any(out.iterdir())
    # Someone's folder, not a run: refused even with --overwrite, which would delete it
    if holds_run and not (out / "run_args.json").is_file():
        names = sorted(p.name for p in out.iterdir())
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        return None, (
            f"--out {out} is not empty ({shown}) and is not a training run folder (no run_args.json); "
            "pass an empty or new --out (without --out every run gets a new folder under outputs/train/)"
        )
    if holds_run and not (resume or overwrite):
        return None, (
            f"--out {out} already holds a training run; pass --resume to continue it, --overwrite to replace "
            "it, or another --out (without --out every run gets a new folder)"
        )
    if holds_run and overwrite:
        shutil.rmtree(out)
    return out, None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from miners.training.distributed import init_from_env, launched_by_torchrun, shutdown

    if not launched_by_torchrun():
        return _main(args, argv, None)
    # torchrun: every process runs this command; rank 0 speaks for the run and writes its folder
    dist_info = init_from_env(args.device or "auto")
    stdout = sys.stdout
    if not dist_info.is_main:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (restored below)
    try:
        return _main(args, argv, dist_info)
    finally:
        if sys.stdout is not stdout:
            sys.stdout.close()
            sys.stdout = stdout
        shutdown()


def _main(args: argparse.Namespace, argv: list[str] | None, dist_info) -> int:
    try:
        cfg, sources = resolve_config(args.preset or "tiny", args.config, recipe_flags(args))
    except RecipeError as exc:
        print(f"error: {exc}")
        return 2
    if cfg.tensorboard and importlib.util.find_spec("tensorboard") is None:
        print("error: --tensorboard needs the tensorboard package (pip install tensorboard)")
        return 2
    import pyarrow.compute as pc

    from miners.clip_scorer import load_clip
    from miners.run_config import read_committed_run
    from miners.training.data import build_clip_data
    from miners.training.distributed import process_device
    from storage.manifest import read_manifest

    problems = []
    pairs = None
    if args.pairs is not None:
        try:
            plan, run_config, pairs = read_committed_run(args.pairs)
        except Exception as exc:
            print(f"error: cannot read committed pairs from {args.pairs}: {exc}")
            return 2
        manifest_path = args.manifest or Path(plan.manifest_path)
        init = args.init or Path(run_config.rsm.clip_model)
    else:  # a baseline without mining: the manifest's captions and images, global branch only
        if args.manifest is None or args.init is None:
            print(
                "error: without --pairs, pass --manifest (the dataset) and --init (the CLIP folder to start "
                "from): the mining run would otherwise name both"
            )
            return 2
        manifest_path, init = args.manifest, args.init
        print("train_rogle: no --pairs: global branch only (no mined region–sentence pairs)")
    # A resume starts from the run's own checkpoint: the start model need not exist any more
    has_checkpoint = bool(
        args.resume and args.out and (Path(args.out) / "checkpoint" / "trainer_state.pt").is_file()
    )
    init, unresolved = (Path(init), None) if has_checkpoint else resolve_model_ref(init)
    if unresolved:
        problems.append(unresolved)
    if not manifest_path.is_file():
        problems.append(
            f"manifest {manifest_path} not found" + ("" if args.manifest else " (pass --manifest)")
        )
    clip_problem = None if unresolved or has_checkpoint else clip_folder_problem(init)
    if clip_problem:
        hint = "" if args.init else " (pass --init)"
        problems.append(f"{clip_problem}{hint}")
    main_process = dist_info is None or dist_info.is_main
    out, refused = None, None
    if not problems and main_process:  # rank 0 claims (or names) the folder; the others take its answer
        out, refused = claim_run_dir(args.out, args.resume, args.overwrite)
    if dist_info is not None:
        import torch.distributed as torch_dist

        shared = [problems, out, refused]
        torch_dist.broadcast_object_list(shared, src=0)
        problems, out, refused = shared
    if refused:
        problems.append(refused)
    if problems:  # every problem at once, before anything is written or removed
        print("error: " + "; ".join(problems))
        return 2
    args.out = out
    table, meta = read_manifest(manifest_path)
    if pairs is not None:
        pairs = pairs.filter(pc.equal(pairs["split"], "train"))

    if args.pairs is None and cfg.local != "none":  # nothing mined: no local branch, whatever the method
        cfg.local = "none"
        sources["local"] = "no --pairs"
    if args.no_local and args.local == "rsm":
        print("error: --no-local and --local rsm contradict each other")
        return 2
    resuming = has_checkpoint  # args.out is the folder claim_run_dir kept
    if resuming:
        # The run continues from its own weights, never from --init: a preempted run resumed at epoch 30
        # used to train the start model for the remaining epochs at a decayed lr (issue 24)
        changed = config_changes(args.out / "config.json", cfg)
        if changed:
            print(
                f"error: --resume: {args.out} was trained with other settings ({'; '.join(changed)}); "
                f"resume with the original flags (in {args.out / 'run_args.json'}), or train anew with "
                "--overwrite or another --out"
            )
            return 2
        model, processor = load_clip(args.out / "checkpoint", "cpu")
        print(f"train_rogle: resuming {args.out} from its checkpoint (weights, optimizer, schedule, RNG)")
    else:
        if args.resume:
            print(f"train_rogle: --resume: {args.out} has no checkpoint yet; starting it from {init}")
        model, processor = load_clip(init, "cpu")
        warning = tiny_defaults_warning(model, args)
        if warning:
            print(warning)
    given = ", ".join(f"{k} {getattr(cfg, k)!r} ({where})" for k, where in sorted(sources.items()))
    print(f"train_rogle: settings: preset {args.preset or 'tiny'}; {given}")
    t0 = time.perf_counter()
    train_rows = table.filter(pc.equal(table["split"], "train"))
    test_rows = table.filter(pc.equal(table["split"], "test"))
    val_rows = table.filter(pc.equal(table["split"], "val"))
    for entry in sorted(pc.value_counts(table["split"]).to_pylist(), key=lambda c: str(c["values"])):
        if entry["values"] not in ("train", "val", "test"):
            print(
                f"train_rogle: split {entry['values']!r}: {entry['counts']} captions not used "
                "(train trains, val chooses the best epoch, test evaluates)"
            )
    train = build_clip_data(
        train_rows,
        processor,
        root=meta["root"],
        pairs=pairs if cfg.local == "rsm" else None,
        use_reliability=cfg.use_reliability,
        reliability_threshold=cfg.reliability_threshold,
    )
    test = build_clip_data(test_rows, processor, root=meta["root"]) if test_rows.num_rows else None
    val = build_clip_data(val_rows, processor, root=meta["root"]) if val_rows.num_rows else None
    weights = [pair.weight for caption_pairs in train.local_pairs for pair in caption_pairs]
    n_local = len(weights)
    print(
        f"train_rogle: {len(train)} train captions, {n_local} local pairs "
        f"({'reliability-weighted' if cfg.use_reliability else 'uniform'}"
        f"{', local branch off' if cfg.local != 'rsm' else ''}), "
        f"{len(test) if test else 0} test captions, "
        + (
            f"{len(val)} val captions (the best epoch on val is kept in checkpoint-best/)"
            if val
            else "no val split (the last epoch is reported)"
        )
        + f"; data in {time.perf_counter() - t0:.1f}s"
    )
    for split, part in (("train", train), ("val", val), ("test", test)):
        cache = part.decode_cache if part is not None else {}
        if cache.get("path"):
            how = "read from" if cache["hit"] else "decoded and cached in"
            print(f"train_rogle: {split} images {how} {cache['path']} ({cache['mb']} MiB)")
    skipped = {"train": train.skipped, "test": test.skipped if test else {}}
    if val is not None:
        skipped["val"] = val.skipped
    for split, images in skipped.items():  # an unreadable test image shrinks the gallery: say which
        if images:
            shown = "; ".join(f"{iid}: {why}" for iid, why in list(images.items())[:5])
            more = f" (and {len(images) - 5} more, in run_args.json)" if len(images) > 5 else ""
            print(f"train_rogle: {len(images)} {split} image(s) skipped, unreadable: {shown}{more}")
    if dist_info is not None:
        cfg.device = process_device(dist_info, cfg.device)
        per = cfg.batch_size // dist_info.world_size if cfg.batch_size % dist_info.world_size == 0 else None
        print(
            f"train_rogle: {dist_info.world_size} processes ({dist_info.backend}), global batch "
            f"{cfg.batch_size}" + (f" = {dist_info.world_size} x {per} per process" if per else "")
        )
    if not main_process:  # only rank 0 writes the run folder
        return _train(args, argv, cfg, model, processor, train, test, val, resuming, manifest_path, dist_info)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.out.parent.resolve() == DEFAULT_RUNS.resolve():
        point_latest(args.out)
    run_args_path = args.out / "run_args.json"
    if resuming and run_args_path.is_file():  # the original run's arguments stay; each resume adds its own
        k = 1
        while (args.out / f"run_args.resume-{k}.json").exists():
            k += 1
        run_args_path = args.out / f"run_args.resume-{k}.json"
    run_args_path.write_text(
        json.dumps(
            {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
            | {
                "manifest_resolved": str(manifest_path),
                "init_resolved": str(init),
                "local_pairs": n_local,
                "local_weight_mean": sum(weights) / n_local if n_local else None,
                "skipped_images": skipped,
                "preset": args.preset or "tiny",
                "settings_from": sources,
            },
            indent=2,
        )
    )
    return _train(args, argv, cfg, model, processor, train, test, val, resuming, manifest_path, dist_info)


def _train(args, argv, cfg, model, processor, train, test, val, resuming, manifest_path, dist_info) -> int:
    from miners.training.trainer import Trainer, TrainingInterrupted

    try:
        trainer = Trainer(model, processor, cfg, args.out, dist=dist_info)
    except ValueError as exc:  # a global batch that does not split over the processes
        print(f"error: {exc}")
        return 2
    try:
        metrics = trainer.fit(train, test, resume=resuming, stop_on_signals=True, val=val)
    except ValueError as exc:  # a resume whose data no longer matches its checkpoint
        print(f"error: --resume: {exc}; resume with the run's own data, or train anew with --overwrite")
        return 2
    except TrainingInterrupted as exc:
        print(f"train_rogle: stopped by {exc}")
        print(f"train_rogle: to resume: {resume_command(argv, args.out, dist_info)}")
        return 128 + exc.signum  # the shell's code for a process ended by that signal
    if metrics:
        print(metrics_line(metrics) + f"  → {args.out}")
    else:
        print(f"train_rogle: no test split in {manifest_path}: nothing evaluated  → {args.out}")
    return 0


# flag (argparse dest) → TrainConfig field; store_true flags count only when given
FLAG_FIELDS = {
    "epochs": "epochs",
    "batch_size": "batch_size",
    "lr": "lr",
    "local_weight": "local_weight",
    "reliability_threshold": "reliability_threshold",
    "text_mode": "text_mode",
    "global_loss": "global_loss",
    "id_loss": "id_loss_weight",
    "mlm": "mlm_weight",
    "augment": "augment",
    "seed": "seed",
    "eval_every": "eval_every_epochs",
    "log_every": "log_every_steps",
    "device": "device",
    "method": "method",
    "local": "local",
}


def recipe_flags(args: argparse.Namespace) -> dict:
    """The TrainConfig fields the user set on the command line (nothing for flags left out)."""
    flags = {
        field: getattr(args, dest) for dest, field in FLAG_FIELDS.items() if getattr(args, dest) is not None
    }
    if args.no_reliability:
        flags["use_reliability"] = False
    if args.text_augment:
        flags["text_augment"] = True
    if args.tensorboard:
        flags["tensorboard"] = True
    if args.no_local:
        flags["local"] = "none"
    options = {}
    for item in args.method_option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"--method-option {item!r}: expected KEY=VALUE")
        options[key.strip()] = value.strip()
    if options:
        flags["method_options"] = options
    return flags


def tiny_defaults_warning(model, args: argparse.Namespace) -> str | None:
    """A warning when a real-size CLIP would train with the tiny CLIP's defaults (no --preset, --config or
    --lr): lr 1e-4 for 10 epochs suits the tiny model trained from scratch here, not a pretrained ViT."""
    if args.preset or args.config or args.lr is not None:
        return None
    n_params = _parameter_count(model)
    if n_params < 50_000_000:  # the tiny CLIPs (this project's bootstrap) are a few million
        return None
    tiny = PRESETS["tiny"]
    return (
        f"warning: --init is a CLIP of {n_params / 1e6:.0f}M parameters, trained here with the tiny CLIP's "
        f"defaults (lr {tiny['lr']:g}, {tiny['epochs']} epochs, AdamW, weight decay {TrainConfig().weight_decay:g}, "
        "no augmentation); for a real CLIP pass --preset irra-b16 (IRRA's recipe), a --config file, or at "
        "least --lr"
    )


def _parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def config_changes(saved_config: Path, cfg: TrainConfig) -> list[str]:
    """'name saved → given' for every TrainConfig field a resume would change (none when the run wrote no
    config yet)."""
    if not saved_config.is_file():
        return []
    saved = json.loads(saved_config.read_text())
    return [
        f"{name} {saved[name]!r} → {value!r}"
        for name, value in training_settings(cfg).items()
        if name in saved and saved[name] != value
    ]


def resume_command(argv: list[str] | None, out: Path, dist_info=None) -> str:
    """The command line that continues this run: the same arguments, --out RUN_DIR and --resume (under
    torchrun, the torchrun launch with the same number of processes per node and nodes)."""
    words = list(sys.argv[1:] if argv is None else argv)
    words = [w for w in words if w not in ("--resume", "--overwrite")]
    if "--out" not in words:
        words += ["--out", str(out)]
    launch = ["python", "-m", "miners.train_rogle"]
    if dist_info is not None:
        per_node = os.environ.get("LOCAL_WORLD_SIZE", str(dist_info.world_size))
        nodes = max(1, dist_info.world_size // max(1, int(per_node)))
        launch = ["torchrun", f"--nproc_per_node={per_node}"]
        if nodes > 1:  # the rendezvous options of the original launch are not known here
            launch += [f"--nnodes={nodes}", "<your --rdzv-* options>"]
        launch += ["-m", "miners.train_rogle"]
    return " ".join(shlex.quote(w) if not w.startswith("<") else w for w in [*launch, *words, "--resume"])


def metrics_line(metrics: dict) -> str:
    """The figures with the sizes they stand on, and the reason where one cannot be computed."""
    lq = metrics.get("long_query", {})
    parts = [
        f"R1 {metrics['R1']:.1f}  R5 {metrics['R5']:.1f}  R10 {metrics['R10']:.1f}  mAP {metrics['mAP']:.1f}  "
        f"mINP {metrics['mINP']:.1f} ({metrics.get('num_queries')} queries, gallery of {metrics.get('num_gallery')} images)"
    ]
    if lq.get("R1") is not None:
        parts.append(f"long-query R1 {lq['R1']:.1f} ({lq.get('num_queries')} queries)")
    else:
        parts.append("long-query R1: no test captions with >= 5 sentences")
    if metrics.get("local_grounding_acc") is not None:
        parts.append(
            f"local grounding {metrics['local_grounding_acc']:.1f}% ({metrics.get('local_sentences')} sentences)"
        )
    else:
        parts.append("local grounding: no ground-truth links in the test split")
    return "  ".join(parts)


if __name__ == "__main__":
    raise SystemExit(main())
