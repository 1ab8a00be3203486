"""The one trainer: losses, exact resume, the bootstrap CLI and the ROGLE CLI on tiny data (CPU smoke)."""

import json

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from miners.clip_scorer import load_clip
from miners.train_rogle import main as rogle_main
from miners.training.bootstrap import main as bootstrap_main
from miners.training.config import RUN_ONLY_FIELDS, TrainConfig
from miners.training.data import build_clip_data
from miners.training.losses import identity_infonce as identity_aware_loss
from miners.training.trainer import Trainer, local_alignment_loss
from tests.factories import noise_only


def test_identity_aware_loss_treats_same_person_as_positive():
    e = torch.nn.functional.normalize(torch.eye(3), dim=1)
    pids = torch.tensor([1, 1, 2])
    # Images 0 and 1 show the same person: text 0 matching image 1 is not penalised like a stranger.
    swapped = e[[1, 0, 2]]
    same = identity_aware_loss(e, swapped, pids, 20.0)
    wrong = identity_aware_loss(e, e[[2, 1, 0]], pids, 20.0)
    assert same < wrong


def test_local_loss_is_the_reliability_weighted_mean_of_pair_losses():
    s = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), dim=1)
    r = torch.nn.functional.normalize(torch.tensor([[1.0, 0.1], [1.0, 0.0], [1.0, 0.1]]), dim=1)
    keys = torch.tensor([0, 1, 0])  # pairs 0 and 2 point at the same region: positives of each other

    def loss(w):
        return local_alignment_loss(s, r, keys, torch.tensor(w), 0.1)

    per_pair = [loss([1.0, 0.0, 0.0]), loss([0.0, 1.0, 0.0]), loss([0.0, 0.0, 1.0])]
    w = [0.9, 0.2, 0.5]
    expected = sum(wi * li for wi, li in zip(w, per_pair, strict=True)) / sum(w)
    torch.testing.assert_close(loss(w), expected)
    # Pair 1 (sentence [0, 1] on a region like [1, 0]) is the wrong one: down-weighting it lowers the loss.
    assert per_pair[1] > per_pair[0] and loss([1.0, 0.05, 1.0]) < loss([1.0, 1.0, 1.0])
    # Pair 0's positives include region 2 (same key): probability mass on either counts.
    logits = s[0] @ r.T / 0.1
    torch.testing.assert_close(per_pair[0], -torch.logsumexp(logits[[0, 2]], 0) + torch.logsumexp(logits, 0))


def _train_data(tiny_dataset, processor, limit: int | None = None):
    table = pq.read_table(tiny_dataset / "manifest.parquet")
    train = table.filter(pc.equal(table["split"], "train"))
    return build_clip_data(train if limit is None else train.slice(0, limit), processor)


def test_resume_continues_exactly(tiny_dataset, tiny_clip_dir, tmp_path):
    cfg = TrainConfig(epochs=2, batch_size=8, lr=1e-3, text_mode="truncate")
    model_a, proc = load_clip(tiny_clip_dir, "cpu")
    data = _train_data(tiny_dataset, proc)
    Trainer(model_a, proc, cfg, tmp_path / "straight").fit(data)

    model_b, _ = load_clip(tiny_clip_dir, "cpu")
    Trainer(model_b, proc, cfg, tmp_path / "resumed").fit(data, stop_after=1)  # "preempted" after epoch 1
    model_c, _ = load_clip(tmp_path / "resumed" / "checkpoint", "cpu")
    Trainer(model_c, proc, cfg, tmp_path / "resumed").fit(data, resume=True)
    for (name, a), (_, c) in zip(model_a.state_dict().items(), model_c.state_dict().items(), strict=True):
        torch.testing.assert_close(a, c, msg=lambda m, name=name: f"{name} differs after resume: {m}")
    history = (tmp_path / "resumed" / "history.jsonl").read_text().splitlines()
    assert [json.loads(h)["epoch"] for h in history] == [1, 2]


def test_a_resume_on_other_data_is_refused(tiny_dataset, tiny_clip_dir, tmp_path):
    """Another number of batches per epoch would re-scale the schedule and shift the position in the
    epoch: not a continuation of the checkpointed run."""
    cfg = TrainConfig(epochs=2, batch_size=8, lr=1e-3, text_mode="truncate")
    model, proc = load_clip(tiny_clip_dir, "cpu")
    data = _train_data(tiny_dataset, proc)
    Trainer(model, proc, cfg, tmp_path / "run").fit(data, stop_after=1)
    fewer = _train_data(tiny_dataset, proc, limit=8)
    model_b, _ = load_clip(tmp_path / "run" / "checkpoint", "cpu")
    with pytest.raises(ValueError, match="the training data changed since the checkpoint"):
        Trainer(model_b, proc, cfg, tmp_path / "run").fit(fewer, resume=True)


def test_bootstrap_cli_writes_a_loadable_model_and_reuses_it(tiny_dataset, tmp_path, capsys):
    out = tmp_path / "clip"
    args = [
        "--manifest",
        str(tiny_dataset / "manifest.parquet"),
        "--out",
        str(out),
        "--epochs",
        "1",
        "--batch-size",
        "8",
    ]
    assert bootstrap_main(args) == 0
    report = json.loads((out / "bootstrap.json").read_text())
    for key in ("R1", "R5", "R10", "mAP", "mINP", "long_query"):
        assert key in report["metrics"]
    assert report["train_seconds"] > 0 and (out / "training" / "curves.png").is_file()
    model, processor = load_clip(out, "cpu")  # the exact path a real checkpoint takes
    assert model.config.projection_dim == 128
    capsys.readouterr()
    assert bootstrap_main(args) == 0
    assert "reusing" in capsys.readouterr().out
    # Fields that change no weight are not part of the model's identity: a release that adds one (as
    # log_every_steps was added) must reuse a model an earlier release trained, not retrain it and so
    # invalidate every run mined with it
    assert not set(RUN_ONLY_FIELDS) & set(report["fingerprint"]["settings"]["train"])
    assert bootstrap_main(["--manifest", str(tmp_path / "missing.parquet"), "--out", str(out)]) == 2
    # Other settings into a folder that holds a model (with a bank and calibrator built for it): refused,
    # nothing touched (before: the model was silently replaced and its bank and calibrator left stale)
    (out / "rsm-bank.json").write_text("{}")
    (out / "rsm-calibrator.json").write_text("{}")
    weights = (out / "model.safetensors").read_bytes()
    capsys.readouterr()
    other = [*args[:-2], "--batch-size", "4"]
    assert bootstrap_main(other) == 2
    said = capsys.readouterr().out
    assert f"error: --out {out} already holds a CLIP model, trained on another manifest or settings" in said
    assert "pass --overwrite to replace it (its rsm-bank.json, rsm-calibrator.json" in said
    assert (out / "model.safetensors").read_bytes() == weights and (out / "rsm-bank.json").is_file()
    assert bootstrap_main([*other, "--overwrite"]) == 0
    assert "removed" in capsys.readouterr().out
    assert not (out / "rsm-bank.json").exists() and not (out / "rsm-calibrator.json").exists()
    assert (out / "model.safetensors").read_bytes() != weights


@pytest.mark.parametrize("flags", [[], ["--no-local"], ["--no-reliability"]])
def test_train_rogle_cli_smoke(tiny_run, tmp_path, flags, capsys):
    out = tmp_path / "run"
    rc = rogle_main(
        [
            "--pairs",
            str(tiny_run),
            "--out",
            str(out),
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--reliability-threshold",
            "0.0",
            *flags,
        ]
    )
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("R1", "R5", "R10", "mAP", "mINP", "local_grounding_acc", "long_query"):
        assert key in metrics
    assert 0 <= metrics["R1"] <= 100 and metrics["local_sentences"] > 0
    assert (out / "curves.png").is_file() and (out / "checkpoint" / "trainer_state.pt").is_file()
    args = json.loads((out / "run_args.json").read_text())
    assert (args["local_pairs"] == 0) == ("--no-local" in flags)
    if "--no-local" not in flags:  # uniform weights are all 1; reliabilities of the tiny run are not
        uniform = args["local_weight_mean"] == pytest.approx(1.0)
        assert uniform == ("--no-reliability" in flags), args["local_weight_mean"]
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert ("loss_local" in history[0]) == ("--no-local" not in flags)
    assert "R1" in capsys.readouterr().out


def test_train_rogle_clear_error_without_a_run(tmp_path, capsys):
    assert rogle_main(["--pairs", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "cannot read committed pairs" in capsys.readouterr().out


def test_train_rogle_runs_never_overwrite_each_other(tiny_run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the default run folders live under ./outputs/train
    base = ["--pairs", str(tiny_run), "--epochs", "1", "--batch-size", "8"]
    assert rogle_main(base) == 0
    captured = capsys.readouterr()
    first_out = captured.out
    # Not a terminal: no progress-bar frames, one plain line per epoch instead.
    assert (
        "\r" not in captured.err
        and "Loading weights" not in captured.err
        and "Writing model" not in captured.err
    )
    assert "epoch 1/1: loss" in first_out
    runs = tmp_path / "outputs" / "train"
    (first,) = [p for p in runs.iterdir() if p.name != "latest"]
    assert (runs / "latest").resolve() == first.resolve() and (first / "metrics.json").is_file()
    # The line names what the figures stand on, and why a figure is missing.
    assert "queries, gallery of" in first_out
    assert "long-query R1" in first_out and "nan" not in first_out
    assert rogle_main(base) == 0
    second = (runs / "latest").resolve()
    assert second != first.resolve() and (first / "metrics.json").is_file()  # the first run is intact
    # An --out that holds a run is refused without --resume / --overwrite, and nothing is touched.
    before = sorted(p.name for p in first.iterdir())
    capsys.readouterr()
    assert rogle_main([*base, "--out", str(first)]) == 2
    assert "already holds a training run; pass --resume" in capsys.readouterr().out
    assert sorted(p.name for p in first.iterdir()) == before
    # A missing --init is reported with the flag's value, before the run folder is claimed or removed.
    assert rogle_main([*base, "--out", str(first), "--overwrite", "--init", str(tmp_path / "nope")]) == 2
    assert f"CLIP model folder {tmp_path / 'nope'} does not exist" in capsys.readouterr().out
    assert sorted(p.name for p in first.iterdir()) == before
    assert rogle_main([*base, "--out", str(first), "--overwrite"]) == 0
    assert (first / "metrics.json").is_file()


def test_a_non_empty_folder_that_is_no_run_is_named_so_and_never_deleted(tmp_path):
    from miners.training.rogle import claim_run_dir

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "readme.txt").write_text("mine")
    for resume, overwrite in ((False, False), (False, True), (True, False)):
        out, why = claim_run_dir(notes, resume=resume, overwrite=overwrite)
        assert out is None and "already holds a training run" not in why  # before: the wrong reason
        assert f"--out {notes} is not empty (readme.txt) and is not a training run folder" in why
    assert (notes / "readme.txt").read_text() == "mine"  # --overwrite did not delete someone's folder
    (notes / "run_args.json").write_text("{}")
    assert "already holds a training run" in claim_run_dir(notes, resume=False, overwrite=False)[1]
    assert claim_run_dir(tmp_path / "empty", resume=False, overwrite=False) == (tmp_path / "empty", None)


def test_a_signal_stops_training_at_a_step_and_the_cli_resume_continues_exactly(tiny_run, tmp_path):
    """`train_rogle` straight vs SIGTERM after epoch 1 (a preemption) + the `--resume` command it prints:
    the same weights and the same metrics.json. --resume used to rebuild the model from --init."""
    import os
    import shlex
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    root = Path(__file__).resolve().parents[3]
    env = os.environ | {"PYTHONPATH": str(root)}
    base = [sys.executable, "-m", "miners.train_rogle", "--pairs", str(tiny_run), "--epochs", "3",
            "--batch-size", "4", "--reliability-threshold", "0.0", "--log-every", "1"]  # fmt: skip
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    done = subprocess.run([*base, "--out", str(straight)], env=env, cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr

    proc = subprocess.Popen(
        [*base, "--out", str(stopped)], env=env, cwd=root, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:  # --log-every 1: a line after every step; stop inside epoch 2
        seen.append(line)
        if line.startswith("step ") and "(epoch 2)" in line:
            proc.send_signal(signal.SIGTERM)
            break
    rest, _ = proc.communicate(timeout=300)
    said = "".join(seen) + rest
    assert proc.returncode == 128 + signal.SIGTERM, said
    assert "stopped by SIGTERM" in said
    state = torch.load(stopped / "checkpoint" / "trainer_state.pt", weights_only=False)
    # stopped inside epoch 2 (after 1 or 2 of its 6 steps): the mid-epoch path is what is tested
    assert state["epoch"] == 1 and 1 <= state["batch_in_epoch"] < 6, (state["epoch"], state["batch_in_epoch"])
    assert "stopped by SIGTERM at epoch 2, step " in said
    original_args = (stopped / "run_args.json").read_text()

    resume_line = next(ln for ln in said.splitlines() if ln.startswith("train_rogle: to resume: "))
    command = shlex.split(resume_line.split("to resume: ", 1)[1])
    assert command[:3] == ["python", "-m", "miners.train_rogle"] and command[-1] == "--resume"
    resumed = subprocess.run(
        [sys.executable, *command[1:]], env=env, cwd=root, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming" in resumed.stdout

    a = load_file(straight / "checkpoint" / "model.safetensors")
    b = load_file(stopped / "checkpoint" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        if noise_only(name):  # zero true gradient: its Adam updates are float noise (tests/factories.py)
            continue
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
    assert json.loads((straight / "metrics.json").read_text()) == json.loads(
        (stopped / "metrics.json").read_text()
    )
    assert (stopped / "run_args.json").read_text() == original_args  # the original run's arguments are kept
    assert (stopped / "run_args.resume-1.json").is_file()


def test_resume_with_other_settings_is_refused_naming_them(tiny_run, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--pairs", str(tiny_run), "--out", str(out), "--epochs", "1", "--batch-size", "8"]
    assert rogle_main(argv) == 0
    weights = (out / "checkpoint" / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert rogle_main([*argv[:-2], "--batch-size", "4", "--lr", "0.01", "--resume"]) == 2
    said = capsys.readouterr().out
    assert "batch_size 8 → 4" in said and "lr 0.0001 → 0.01" in said and "--overwrite" in said
    assert (out / "checkpoint" / "model.safetensors").read_bytes() == weights


def test_train_rogle_from_a_manifest_alone_is_global_only_and_says_so(
    tiny_dataset, tiny_clip_dir, tmp_path, capsys
):
    manifest = str(tiny_dataset / "manifest.parquet")
    out = tmp_path / "baseline"
    assert rogle_main(["--manifest", manifest, "--out", str(out)]) == 2
    assert "without --pairs, pass --manifest (the dataset) and --init" in capsys.readouterr().out
    assert not out.exists()
    argv = ["--manifest", manifest, "--init", str(tiny_clip_dir), "--out", str(out), "--epochs", "1"]
    assert rogle_main([*argv, "--batch-size", "8"]) == 0
    said = capsys.readouterr().out
    assert "no --pairs: global branch only" in said and "0 local pairs" in said
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert "loss_local" not in history[0] and "R1" in json.loads((out / "metrics.json").read_text())


def test_train_rogle_logs_steps_and_names_skipped_images(tiny_dataset, tiny_clip_dir, tmp_path, capsys):
    import csv
    import shutil

    import pyarrow.parquet as pq

    from storage.manifest import main as manifest_main

    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data, ignore=shutil.ignore_patterns("manifest.parquet"))
    assert manifest_main(["--format", "pvlg", "--root", str(data), "--out", str(data / "m.parquet")]) == 0
    rows = pq.read_table(data / "m.parquet").to_pylist()
    broken = next(r for r in rows if r["split"] == "test")
    (data / broken["image_path"]).write_bytes(b"not an image")  # unreadable after the import
    capsys.readouterr()
    out = tmp_path / "run"
    argv = ["--manifest", str(data / "m.parquet"), "--init", str(tiny_clip_dir), "--out", str(out)]
    assert rogle_main([*argv, "--epochs", "1", "--batch-size", "4", "--log-every", "2"]) == 0
    said = capsys.readouterr().out
    assert f"1 test image(s) skipped, unreadable: {broken['image_id']}" in said
    skipped = json.loads((out / "run_args.json").read_text())["skipped_images"]
    assert list(skipped["test"]) == [broken["image_id"]] and skipped["train"] == {}
    steps = list(csv.DictReader((out / "steps.csv").open()))
    assert [int(r["step"]) for r in steps] == list(range(2, 2 * len(steps) + 1, 2)) and len(steps) >= 2
    assert float(steps[0]["lr"]) > 0  # the cosine schedule ends at 0 on the last step
    for row in steps:
        assert float(row["lr"]) >= 0 and float(row["samples_per_s"]) > 0 and float(row["peak_mem_mb"]) > 0
        assert float(row["grad_norm"]) >= 0 and float(row["logit_scale"]) > 0 and row["loss"]
    assert "step 2 (epoch 1): loss " in said and " lr " in said and "samples_per_s" in said


def test_init_accepts_a_hugging_face_id_from_the_local_cache_and_names_the_cache_when_absent(
    tiny_dataset, tiny_clip_dir, tmp_path
):
    """The cache is laid out on disk by the test as huggingface_hub lays it out (refs/main → a snapshot)."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    cache = tmp_path / "hub"
    repo = cache / "models--acme--tiny-clip"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_clip_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    root = Path(__file__).resolve().parents[3]
    env = os.environ | {"PYTHONPATH": str(root), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    base = [sys.executable, "-m", "miners.train_rogle", "--manifest", str(tiny_dataset / "manifest.parquet"),
            "--epochs", "1", "--batch-size", "8"]  # fmt: skip
    ok = subprocess.run([*base, "--init", "acme/tiny-clip", "--out", str(tmp_path / "a")], env=env, cwd=root,
                        capture_output=True, text=True)  # fmt: skip
    assert ok.returncode == 0, ok.stdout + ok.stderr
    run_args = json.loads((tmp_path / "a" / "run_args.json").read_text())
    assert run_args["init_resolved"] == str(repo / "snapshots" / commit)
    missing = subprocess.run([*base, "--init", "acme/other-clip", "--out", str(tmp_path / "b")], env=env,
                             cwd=root, capture_output=True, text=True)  # fmt: skip
    assert missing.returncode == 2
    assert f"no copy of the Hugging Face model acme/other-clip in the local cache {cache}" in missing.stdout
    assert not (tmp_path / "b").exists()
