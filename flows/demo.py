"""`make demo`: the main job, end to end, on the embedded synthetic P-VLG benchmark.

Consumes nothing but this repository; produces everything under `outputs/demo/`:
`data/` (synthetic pvlg dataset), `manifest.parquet`, `calib/` (a second, independently seeded
benchmark used only to fit the reliability calibrators), `models/tiny-clip/` (bootstrapped CLIP, its
reference bank `rsm-bank.*` and `rsm-calibrator.json`), `shards-rounds/` (round 0 mined with it, and
`round-1/clip`, the CLIP refined on round 0's kept pairs), `shards/` (the last round, through the
`mine-rsm` flow with `--rounds 1`), `qa/` (noise report, `rounds.png` comparing the rounds) and
`audit.sqlite` + `audit/` (300 pairs of the last round labelled by a simulated annotator from the ground
truth: noise rate with its 95% interval, a refit calibrator) and `train/` (a short ROGLE training on the
last round). Every step skips work already done, so a second run is quick.

    python -m flows.demo [--out outputs/demo] [--identities 480] [--images-per-id 4]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from flows.env import apply_offline_defaults


def _synth(root: Path, identities: int, images_per_id: int, seed: int) -> None:
    from storage.synth import generate

    config_path = root / "synth_config.json"
    if (root / "pvlg.json").is_file() and config_path.is_file():
        cfg = json.loads(config_path.read_text())
        if (cfg.get("identities"), cfg.get("images_per_id"), cfg.get("seed")) == (
            identities,
            images_per_id,
            seed,
        ):
            print(f"  reusing {root}")
            return
    generate(root, identities=identities, images_per_id=images_per_id, seed=seed, overwrite=root.exists())


def _manifest(root: Path, out: Path) -> None:
    from storage.manifest import main as manifest_main

    if out.is_file() and out.stat().st_mtime >= (root / "pvlg.json").stat().st_mtime:
        print(f"  reusing {out}")
        return
    if manifest_main(["--format", "pvlg", "--root", str(root), "--out", str(out)]) != 0:
        raise SystemExit(f"manifest import failed for {root}")


def _bank(manifest: Path, clip_dir: Path) -> None:
    from miners.bank import BankError, ReferenceBank
    from miners.bank import main as bank_main
    from miners.model_folder import model_fingerprint

    try:
        ReferenceBank.load(clip_dir, expect_fingerprint=model_fingerprint(clip_dir), crop_mode="box")
        print(f"  reusing the reference bank in {clip_dir}")
        return
    except BankError:
        pass
    if bank_main(["--manifest", str(manifest), "--clip-model", str(clip_dir)]) != 0:
        raise SystemExit("building the reference bank failed")


def _calibrate(calib_manifest: Path, clip_dir: Path) -> None:
    from miners.calibration import CALIBRATOR_FILENAME, Calibrator, features_for
    from miners.model_folder import model_fingerprint
    from miners.training.fit_calibrator import main as calibrate_main

    path = clip_dir / CALIBRATOR_FILENAME
    if path.is_file():
        try:
            cal = Calibrator.load(path, expect_fingerprint=model_fingerprint(clip_dir))
            # One fitted on other features (before the bank existed, an older release) is refit.
            if cal.features == features_for("combined", content=True, colour=True, garment=True):
                print(f"  reusing {path}")
                return
        except ValueError:
            pass
    rc = calibrate_main(["--manifest", str(calib_manifest), "--clip-model", str(clip_dir), "--split", ""])
    if rc != 0:
        raise SystemExit("calibration failed")


def _audit(shards: Path, manifest: Path, out: Path) -> dict:
    """The audit loop with the simulated annotator: 300 pairs sampled, labelled from the ground truth, noise
    rate with its interval and a refit calibrator in OUT/audit/ (what a researcher does by hand with
    `qa.audit serve` on a dataset without ground truth)."""
    from qa.audit.fit import fit_audit, read_audit
    from qa.audit.oracle import label_with_oracle
    from qa.audit.sample import sample_pairs
    from storage.shards import load_run_plan

    db, audit_dir = out / "audit.sqlite", out / "audit"
    run_id = load_run_plan(shards).run_id
    try:
        audit = read_audit(audit_dir)
        if audit.get("run_id") == run_id:
            print(f"  reusing {audit_dir}")
            return audit
    except FileNotFoundError:
        pass
    for stale in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        stale.unlink(missing_ok=True)  # made from an earlier run (or half made): sample again
    sample_pairs(shards, db, n=300, n_strata=5, seed=0)
    label_with_oracle(db, manifest, seed=0)
    return fit_audit(db, shards, audit_dir)


def main(argv: list[str] | None = None) -> int:
    apply_offline_defaults()
    ap = argparse.ArgumentParser(prog="python -m flows.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("outputs/demo"))
    ap.add_argument("--identities", type=int, default=480)
    ap.add_argument("--images-per-id", type=int, default=4)
    ap.add_argument("--bootstrap-epochs", type=int, default=12)
    ap.add_argument("--train-epochs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1, help="refine rounds (mine, refine the CLIP, mine again)")
    ap.add_argument("--refine-epochs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    data, calib = out / "data", out / "calib"
    manifest, calib_manifest = out / "manifest.parquet", out / "calib" / "manifest.parquet"
    clip_dir, shards, qa_dir, train_dir = (
        out / "models" / "tiny-clip",
        out / "shards",
        out / "qa",
        out / "train",
    )
    timings: dict[str, float] = {}

    def step(name: str):
        print(f"[demo] {name} …", flush=True)
        timings[name] = time.perf_counter()

    def done(name: str):
        timings[name] = round(time.perf_counter() - timings[name], 1)

    step("synth")
    _synth(data, args.identities, args.images_per_id, args.seed)
    _synth(calib, max(40, args.identities // 4), 2, args.seed + 1000)
    done("synth")

    step("manifest")
    _manifest(data, manifest)
    _manifest(calib, calib_manifest)
    done("manifest")

    step("bootstrap")
    from miners.training.bootstrap import main as bootstrap_main

    if bootstrap_main(
        # --overwrite: the demo owns outputs/demo; a model of other settings is retrained (not refused)
        [
            "--manifest",
            str(manifest),
            "--out",
            str(clip_dir),
            "--epochs",
            str(args.bootstrap_epochs),
            "--overwrite",
        ]
    ):
        raise SystemExit("tiny CLIP bootstrap failed")
    done("bootstrap")

    step("bank")
    _bank(manifest, clip_dir)
    done("bank")

    step("calibrate")
    _calibrate(calib_manifest, clip_dir)
    done("calibrate")

    step("mine")
    from flows.mine_rsm import main as mine_main

    # The flow writes the QA report too (and publishes its summary as Prefect artifacts).
    rc = mine_main(
        [
            "--manifest",
            str(manifest),
            "--out",
            str(shards),
            "--clip-model",
            str(clip_dir),
            "--qa-out",
            str(qa_dir),
            "--qa-inject-noise",
            "0.3",
            "--rounds",
            str(args.rounds),
            "--refine-epochs",
            str(args.refine_epochs),
            "--calibration-manifest",
            str(calib_manifest),
        ]
    )
    if rc:
        raise SystemExit("mining failed; rerun `make demo` to resume the unfinished shards")
    done("mine")

    step("audit")
    audit = _audit(shards, manifest, out)
    done("audit")

    step("train")
    from miners.train_rogle import main as train_main

    metrics_path = train_dir / "metrics.json"
    if metrics_path.is_file() and json.loads(metrics_path.read_text()):
        print(f"  reusing {train_dir}")
    elif train_main(
        ["--pairs", str(shards), "--out", str(train_dir), "--epochs", str(args.train_epochs)]
        # an interrupted run continues from its checkpoint; a folder left without one starts again
        + (["--resume"] if (train_dir / "checkpoint").is_dir() else ["--overwrite"])
    ):
        raise SystemExit("ROGLE training failed")
    done("train")

    boot = json.loads((clip_dir / "bootstrap.json").read_text())
    qa = json.loads((qa_dir / "qa.json").read_text())
    train = json.loads(metrics_path.read_text())
    print("\n=== demo headline figures ===")
    print(f"tiny CLIP (bootstrap)     text→image R1 {boot['metrics']['R1']:.1f}%  ({clip_dir})")
    print(
        f"mined pairs               {qa['pairs_total']} scored, {qa['pairs_kept']} kept; "
        f"estimated noise {100 * qa['noise_rate_estimated']:.1f}%"
        + (
            f", true noise {100 * qa['noise_rate_true']:.1f}%"
            if qa.get("noise_rate_true") is not None
            else ""
        )
        + (f", ECE {qa['ece']:.3f}" if qa.get("ece") is not None else "")
    )
    rounds_path = qa_dir / "rounds.json"
    for r in json.loads(rounds_path.read_text())["rounds"] if rounds_path.is_file() else []:
        print(
            f"round {r['round']}                   precision {r['precision_kept']:.3f}, coverage {r['coverage']:.3f}, "
            f"ECE {r['ece']:.3f}, AUROC of reliability vs injected units "
            + ", ".join(f"{k[6:]} {v:.3f}" for k, v in r.items() if k.startswith("auroc_") and v is not None)
        )
    kept = audit["noise_rate_kept"]
    print(
        f"audit (300 oracle labels) noise of kept pairs {kept['estimate']:.3f}, 95% CI "
        f"{kept['ci_low']:.3f}–{kept['ci_high']:.3f}; ECE {audit['ece_before']:.3f} → {audit['ece_after']:.3f} "
        f"refit ({out}/audit/)"
    )
    print(
        f"label pairs yourself      python -m qa.audit sample --pairs {shards} --db {out}/my-audit.sqlite "
        f"&& python -m qa.audit serve --db {out}/my-audit.sqlite"
    )
    print(
        f"ROGLE (short training)    R1 {train['R1']:.1f}%  mAP {train['mAP']:.1f}%  "
        f"long-query R1 {train['long_query'].get('R1', float('nan')):.1f}%  "
        f"local grounding {train.get('local_grounding_acc') or float('nan'):.1f}%"
    )
    print(
        f"outputs                   {out}/{{manifest.parquet,models/,shards-rounds/,shards/,qa/report.html,"
        "qa/rounds.png,audit/,train/}"
    )
    print(f"step seconds              {json.dumps(timings)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
