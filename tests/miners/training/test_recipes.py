"""Recipes (presets, config files, flags), parameter groups and the lr schedule, the val split's best
checkpoint, the evaluate command, TensorBoard: the contracts of train_rogle's training settings."""

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from miners.clip_scorer import load_clip
from miners.train_rogle import main as rogle_main
from miners.training.config import GLOBAL_LOSS_NAMES, IMAGE_AUGMENT_NAMES, TrainConfig
from miners.training.evaluate import main as evaluate_main
from miners.training.heads import CrossModalMLM, IdentityClassifier
from miners.training.recipes import PRESETS, RecipeError, resolve_config
from miners.training.trainer import lr_factor, parameter_groups
from tests.factories import noise_only


def test_precedence_is_defaults_then_preset_then_file_then_flags(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("lr: 3e-5\nepochs: 7\naugment: irra\n")  # YAML reads 3e-5 as a string
    cfg, source = resolve_config("irra-b16", yaml_file, {"epochs": 2}, base={"local_weight": 0.4})
    assert cfg.lr == 3e-5 and isinstance(cfg.lr, float) and source["lr"] == f"config {yaml_file}"
    assert cfg.epochs == 2 and source["epochs"] == "flag"
    assert cfg.adam_eps == 1e-3 and source["adam_eps"] == "preset irra-b16"
    assert cfg.local_weight == 0.4 and source["local_weight"] == "command default"
    assert cfg.warmup_fraction == TrainConfig().warmup_fraction and "warmup_fraction" not in source
    json_file = tmp_path / "c.json"
    json_file.write_text(json.dumps({"global_loss": "cmpm", "id_loss_weight": 0.5}))
    cfg, _ = resolve_config(None, json_file, {})
    assert cfg.global_loss == "cmpm" and cfg.id_loss_weight == 0.5 and cfg.lr == TrainConfig().lr


def test_a_config_file_with_unknown_fields_or_bad_values_is_refused_by_name(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: 1e-5\nlearning_rate: 1e-5\nepoch: 3\n")
    with pytest.raises(RecipeError, match=r"unknown field\(s\) epoch, learning_rate"):
        resolve_config(None, bad, {})
    bad.write_text("global_loss: triplet\n")
    with pytest.raises(RecipeError, match="global_loss 'triplet'"):
        resolve_config(None, bad, {})
    bad.write_text("epochs: many\n")
    with pytest.raises(RecipeError, match="epochs: expected an integer"):
        resolve_config(None, bad, {})


def test_irra_b16_is_irras_published_recipe_and_method_irra_its_losses():
    cfg, source = resolve_config("irra-b16", None, {"method": "irra"})
    expected = dict(
        optimizer="adam", lr=1e-5, adam_eps=1e-3, weight_decay=4e-5, bias_lr_factor=2.0, head_lr_factor=5.0,
        epochs=60, warmup_epochs=5.0, warmup_start_factor=0.1, schedule_per="epoch", batch_size=64,
        augment="irra", text_mode="truncate", max_grad_norm=0.0,
        global_loss="sdm", sdm_temperature=0.02, id_loss_weight=1.0, mlm_weight=1.0, local="none",
    )  # fmt: skip
    assert {k: getattr(cfg, k) for k in expected} == expected
    assert source["global_loss"] == "method irra" and source["optimizer"] == "preset irra-b16"
    # the preset alone keeps the default method's losses (ROGLE with IRRA's optimizer and augmentation)
    rogle, _ = resolve_config("irra-b16", None, {})
    assert (rogle.method, rogle.global_loss, rogle.local, rogle.optimizer) == (
        "rogle",
        "identity-infonce",
        "rsm",
        "adam",
    )
    # IRRA's schedule: epochs 0-4 warm up linearly from 0.1x, then a cosine to 0 at epoch 60, per epoch
    spe = 10
    factors = [lr_factor(cfg, e * spe, spe, 60 * spe) for e in range(60)]
    for e in range(5):
        assert factors[e] == pytest.approx(0.1 + 0.9 * e / 5)
        assert lr_factor(cfg, e * spe + spe - 1, spe, 60 * spe) == factors[e]  # constant within an epoch
    for e in range(5, 60):
        assert factors[e] == pytest.approx(0.5 * (1 + math.cos(math.pi * (e - 5) / 55)))
    assert (
        set(GLOBAL_LOSS_NAMES) >= {"identity-infonce", "sdm", "itc", "cmpm"} and "irra" in IMAGE_AUGMENT_NAMES
    )


def test_the_default_schedule_is_unchanged_per_step():
    cfg = TrainConfig()  # 5% warm-up from 0 (the first step at 1/warmup), then a cosine, per step
    total = 200
    warm = int(total * cfg.warmup_fraction)
    assert [lr_factor(cfg, s, 20, total) for s in range(warm)] == [(s + 1) / warm for s in range(warm)]
    assert lr_factor(cfg, warm, 20, total) == 1.0 and lr_factor(cfg, total, 20, total) == pytest.approx(0)


def test_parameter_groups_exempt_biases_norms_embeddings_and_the_logit_scale(tiny_clip_dir):
    model, _ = load_clip(tiny_clip_dir, "cpu")
    heads = torch.nn.ModuleDict({"id": IdentityClassifier(4, 3), "mlm": CrossModalMLM(64, 10, depth=1)})
    cfg = TrainConfig(weight_decay=0.1, lr=1.0, bias_lr_factor=2.0, head_lr_factor=5.0)
    groups = parameter_groups(model, heads, cfg)
    of = {id(p): g for g in groups for p in g["params"]}
    names = dict(model.named_parameters())
    assert len(of) == len(names) + sum(1 for _ in heads.parameters())  # each parameter in exactly one group
    for name, p in names.items():
        g = of[id(p)]
        exempt = (
            name.endswith("bias")
            or p.ndim < 2
            or any(k in name for k in ("token_embedding", "position_embedding", "class_embedding"))
        )
        assert g["weight_decay"] == (0.0 if exempt else 0.1), name
        assert g["lr"] == (2.0 if name.endswith("bias") else 1.0), name
    assert of[id(names["logit_scale"])]["weight_decay"] == 0.0
    assert any("layer_norm" in n and of[id(p)]["weight_decay"] == 0.0 for n, p in names.items())
    classifier = heads["id"].classifier
    assert of[id(classifier.weight)]["lr"] == 5.0 and of[id(classifier.weight)]["weight_decay"] == 0.1
    assert of[id(classifier.bias)]["lr"] == 2.0  # IRRA applies its bias rule after the new-module rule
    for name, p in heads["mlm"].named_parameters():  # IRRA: cross*, mlm_head at 5x; ln_pre_*, ln_post not
        fast = "cross" in name or "mlm_head" in name
        assert of[id(p)]["lr"] == (2.0 if name.endswith("bias") else 5.0 if fast else 1.0), name
    assert any(not ("cross" in n or "mlm_head" in n) for n, _ in heads["mlm"].named_parameters())
    # the tiny CLIP's recipe (the bootstrap, the tiny preset): decay on every parameter
    legacy = parameter_groups(model, heads, TrainConfig(weight_decay=0.1, weight_decay_exempt=False))
    assert {g["weight_decay"] for g in legacy} == {0.1}
    assert resolve_config("tiny", None, {})[0].weight_decay_exempt is False
    assert resolve_config("irra-b16", None, {})[0].weight_decay_exempt is True


def _manifest_with_val(tiny_dataset, tmp_path):
    """The tiny dataset with two train identities moved to a val split."""
    table = pq.read_table(tiny_dataset / "manifest.parquet")
    train_pids = sorted({r["person_id"] for r in table.to_pylist() if r["split"] == "train"})
    val_pids = set(train_pids[:2])
    splits = [
        "val" if p in val_pids else s
        for p, s in zip(table["person_id"].to_pylist(), table["split"].to_pylist(), strict=True)
    ]
    table = table.set_column(table.schema.get_field_index("split"), "split", pa.array(splits))
    path = tmp_path / "with_val.parquet"
    pq.write_table(table, path)
    return path


def test_a_val_split_chooses_the_best_epoch_and_evaluate_reads_it_back(
    tiny_dataset, tiny_clip_dir, tmp_path, capsys
):
    manifest = _manifest_with_val(tiny_dataset, tmp_path)
    out = tmp_path / "run"
    argv = ["--manifest", str(manifest), "--init", str(tiny_clip_dir), "--out", str(out)]
    assert (
        rogle_main(
            [*argv, "--epochs", "3", "--batch-size", "4", "--lr", "1e-3", "--tensorboard", "--log-every", "1"]
        )
        == 0
    )
    said = capsys.readouterr().out
    assert "val captions (the best epoch on val is kept in checkpoint-best/)" in said
    history = [json.loads(ln) for ln in (out / "history.jsonl").read_text().splitlines()]
    val_r1 = {r["epoch"]: r["val"]["R1"] for r in history}
    best_epoch = max(val_r1, key=lambda e: (val_r1[e], -e))  # the first epoch reaching the best val R1
    metrics = json.loads((out / "metrics.json").read_text())
    sel = metrics["selection"]
    assert sel["chosen_on"] == "val" and sel["epoch"] == best_epoch and sel["checkpoint"] == "checkpoint-best"
    assert sel["val"]["R1"] == val_r1[best_epoch]
    # the reported test figures are those of the chosen epoch, not of the last
    chosen = next(r for r in history if r["epoch"] == best_epoch)["eval"]
    assert metrics["R1"] == chosen["R1"] and metrics["mAP"] == chosen["mAP"]
    assert metrics["last_epoch"]["epoch"] == 3 and metrics["last_epoch"]["R1"] == history[-1]["eval"]["R1"]
    assert json.loads((out / "checkpoint-best" / "best.json").read_text())["epoch"] == best_epoch
    # both text modes, both directions
    assert set(metrics["text_modes"]) == {"sentence-pool", "truncate"} and "R1" in metrics["i2t"]
    assert metrics["text_modes"]["sentence-pool"]["R1"] == metrics["R1"]
    # the evaluate command reproduces the run's own figures from the checkpoint it names
    assert evaluate_main(["--run", str(out), "--checkpoint", "best", "--split", "test"]) == 0
    again = json.loads((out / "eval" / "test-best-sentence-pool.json").read_text())
    for key in ("R1", "R5", "mAP", "mINP"):
        assert again[key] == pytest.approx(metrics[key], abs=1e-6), key
    assert again["evaluated"]["epoch"] == best_epoch
    assert evaluate_main(["--run", str(out), "--split", "val", "--text-mode", "truncate"]) == 0
    last_val = json.loads((out / "eval" / "val-last-truncate.json").read_text())
    assert last_val["R1"] == pytest.approx(history[-1]["val"]["text_modes"]["truncate"]["R1"], abs=1e-6)
    assert "val, checkpoint (epoch 3), truncate: R1 " in capsys.readouterr().out
    # TensorBoard event files with the step and epoch scalars
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "val/R1", "test/R1", "test/mAP"} <= tags
    assert [e.value for e in events.Scalars("val/R1")] == pytest.approx([val_r1[e] for e in (1, 2, 3)])


def test_evaluate_refuses_what_is_not_there_in_one_line(tiny_run, tmp_path, capsys):
    assert evaluate_main(["--run", str(tmp_path)]) == 2
    assert "is not a training run folder" in capsys.readouterr().out
    out = tmp_path / "run"
    argv = ["--pairs", str(tiny_run), "--out", str(out), "--epochs", "1", "--batch-size", "8"]
    assert rogle_main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["selection"]["chosen_on"] is None and "no val split" in metrics["selection"]["why"]
    capsys.readouterr()
    assert evaluate_main(["--run", str(out), "--checkpoint", "best"]) == 2
    assert "only when the manifest has a val split" in capsys.readouterr().out
    assert evaluate_main(["--run", str(out), "--split", "val"]) == 2
    assert "has no 'val' split" in capsys.readouterr().out


def test_flags_config_and_preset_reach_the_saved_config_and_a_real_clip_gets_a_warning(
    tiny_dataset, tiny_clip_dir, tmp_path, capsys, monkeypatch
):
    manifest = str(tiny_dataset / "manifest.parquet")
    conf = tmp_path / "recipe.json"
    conf.write_text(json.dumps({"global_loss": "sdm", "weight_decay": 0.01, "epochs": 5}))
    out = tmp_path / "run"
    argv = ["--manifest", manifest, "--init", str(tiny_clip_dir), "--out", str(out), "--batch-size", "8"]
    assert rogle_main([*argv, "--config", str(conf), "--epochs", "1", "--id-loss", "0.5"]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["global_loss"] == "sdm" and saved["weight_decay"] == 0.01 and saved["epochs"] == 1
    assert saved["id_loss_weight"] == 0.5 and saved["lr"] == PRESETS["tiny"]["lr"]
    run_args = json.loads((out / "run_args.json").read_text())
    assert run_args["settings_from"]["epochs"] == "flag" and run_args["preset"] == "tiny"
    assert "warning: --init is a CLIP" not in capsys.readouterr().out  # the tiny CLIP: no warning
    # A real-size CLIP with the tiny defaults is warned about; counting parameters is what decides
    import miners.training.rogle as rogle

    monkeypatch.setattr(rogle, "_parameter_count", lambda model: 150_000_000)
    assert rogle_main([*argv, "--epochs", "1", "--overwrite"]) == 0
    said = capsys.readouterr().out
    assert "warning: --init is a CLIP of 150M parameters, trained here with the tiny CLIP's defaults" in said
    assert "--preset irra-b16" in said
    assert rogle_main([*argv, "--epochs", "1", "--overwrite", "--lr", "1e-5"]) == 0
    assert "warning" not in capsys.readouterr().out
    assert rogle_main([*argv, "--config", str(tmp_path / "missing.yaml")]) == 2
    said = capsys.readouterr().out
    assert "error: --config" in said and "missing.yaml: no such file" in said


def _objective_config(**overrides) -> TrainConfig:
    """Every part of the objective on at once: SDM, ID, MLM, IRRA's augmentation, text augmentation, the
    local branch; IRRA's optimizer groups and per-epoch schedule."""
    cfg, _ = resolve_config(
        "irra-b16",
        None,
        {"epochs": 2, "batch_size": 6, "lr": 1e-4, "text_augment": True, "device": "cpu"}
        | {"method": "irra", "local": "rsm"}
        | overrides,
    )
    return cfg


def _pairs_data(tiny_run, tiny_dataset, processor):
    from miners.run_config import read_committed_run
    from miners.training.data import build_clip_data

    _, _, pairs = read_committed_run(tiny_run)
    table = pq.read_table(tiny_dataset / "manifest.parquet")
    train = table.filter(pa.compute.equal(table["split"], "train"))
    return build_clip_data(train, processor, pairs=pairs, reliability_threshold=0.0)


def test_the_whole_objective_trains_logs_its_parts_saves_heads_beside_the_clip_and_resumes_exactly(
    tiny_run, tiny_dataset, tiny_clip_dir, tmp_path
):
    from miners.training.trainer import Trainer

    cfg = _objective_config()
    model, processor = load_clip(tiny_clip_dir, "cpu")
    train = _pairs_data(tiny_run, tiny_dataset, processor)
    assert sum(len(p) for p in train.local_pairs) > 0
    straight = Trainer(model, processor, cfg, tmp_path / "straight")
    straight.fit(train)
    history = [json.loads(ln) for ln in (tmp_path / "straight" / "history.jsonl").read_text().splitlines()]
    for key in ("loss_global", "loss_id", "loss_mlm", "loss_local", "local_pairs_kept_frac"):
        assert key in history[0], key
    assert all(math.isfinite(r["loss"]) for r in history)
    # the augmentation moved and dropped boxes: some pairs left some step's local loss
    assert min(r["local_pairs_kept_frac"] for r in history) < 1.0
    ckpt = tmp_path / "straight" / "checkpoint"
    heads = torch.load(ckpt / "heads.pt", weights_only=False)
    assert {k.split(".")[0] for k in heads["heads"]} == {"id", "mlm"}
    assert heads["pid_classes"] == sorted({int(p) for p in train.cap_pids})
    reloaded, _ = load_clip(ckpt, "cpu")  # the checkpoint stays a plain CLIP folder the miner loads
    assert sum(p.numel() for p in reloaded.parameters()) == sum(p.numel() for p in model.parameters())

    model_b, _ = load_clip(tiny_clip_dir, "cpu")
    part = Trainer(model_b, processor, cfg, tmp_path / "resumed")
    part.fit(train, stop_after=1)
    model_c, _ = load_clip(tmp_path / "resumed" / "checkpoint", "cpu")
    resumed = Trainer(model_c, processor, cfg, tmp_path / "resumed")
    resumed.fit(train, resume=True)
    for (name, a), b in zip(
        straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True
    ):
        if noise_only(name):  # zero true gradient: its Adam updates are float noise (tests/factories.py)
            continue
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)
    for (name, a), b in zip(
        straight.heads.state_dict().items(), resumed.heads.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)


@pytest.mark.parametrize("loss", ["sdm", "itc", "cmpm"])
def test_every_global_loss_trains_the_tiny_clip_through_the_cli(tiny_run, tmp_path, loss):
    out = tmp_path / loss
    argv = ["--pairs", str(tiny_run), "--out", str(out), "--epochs", "1", "--batch-size", "8"]
    assert rogle_main([*argv, "--global-loss", loss, "--augment", "irra", "--text-augment"]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["global_loss"] == loss and saved["augment"] == "irra" and saved["text_augment"] is True
    assert math.isfinite(json.loads((out / "history.jsonl").read_text().splitlines()[0])["loss_global"])
