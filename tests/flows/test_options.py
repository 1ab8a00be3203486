"""flows.options: one table of mine-rsm parameters; the flow signature, the CLI and the RSM defaults
agree with it, and validation refuses bad values before any work starts."""

from __future__ import annotations

import inspect
from dataclasses import MISSING, fields

import pytest

from flows.mine_rsm import mine_rsm, parse_args
from flows.options import MineParams, PreflightError, build_options, param_defaults, params_from
from miners.matching import MatchConfig
from miners.rsm import RSMConfig


def test_flow_signature_is_the_parameter_table():
    sig = inspect.signature(mine_rsm.fn)
    assert list(sig.parameters) == [f.name for f in fields(MineParams)]
    for f in fields(MineParams):
        expected = inspect.Parameter.empty if f.name in ("manifest", "out") else f.default
        assert sig.parameters[f.name].default == expected, f.name
    # Prefect's deployment parameter schema is built from that signature
    assert set(mine_rsm.parameters.properties) == {f.name for f in fields(MineParams)}


def test_rsm_defaults_are_read_from_rsmconfig():
    defaults = param_defaults()
    rsm = {f.name: f.default for f in fields(RSMConfig) if f.name in defaults and f.default is not MISSING}
    assert rsm and all(defaults[k] == v for k, v in rsm.items())
    assert defaults["match_mode"] == MatchConfig().mode


def test_cli_is_derived_from_the_table(tmp_path):
    args = parse_args(
        ["--manifest", "m.parquet", "--out", "o", "--shard-size", "8", "--shard-timeout", "2.5"]
    )
    values = vars(args)
    assert values.pop("no_prefect") is False and values.pop("debug") is False  # CLI-only switches
    params = MineParams(**values)
    assert (params.shard_size, params.shard_timeout_s) == (8, 2.5)
    assert params.proposer == param_defaults()["proposer"] and params.progress_bar is False
    with pytest.raises(SystemExit):  # choices come from the table too
        parse_args(["--manifest", "m", "--out", "o", "--crop-mode", "nope"])


def test_preflight_reports_every_problem_at_once_with_its_fix(tmp_path):
    params = params_from(
        manifest=str(tmp_path / "missing.parquet"),
        out=str(tmp_path / "o"),
        clip_model=str(tmp_path / "nope"),
        proposer="sam-prompted",
        calibrator=str(tmp_path / "cal.json"),
    )
    with pytest.raises(PreflightError) as info:
        build_options(params)
    problems = info.value.problems
    assert len(problems) == 4 and str(info.value).startswith("4 problems before mining: (1) ")
    clip, manifest, sam, calibrator = problems
    assert (
        f"CLIP model folder {tmp_path / 'nope'} does not exist" in clip
        and "--param clip_model=DIR" in clip
        and "--clip-model DIR" in clip
    )
    assert "python -m storage.manifest" in manifest
    assert "--param sam_checkpoint=PATH" in sam and "cal.json does not exist" in calibrator
    assert not (tmp_path / "o").exists()  # nothing was created


def test_validation_refuses_bad_values_up_front(tiny_dataset, tiny_clip_dir, tmp_path):
    base = {"manifest": str(tiny_dataset / "manifest.parquet"), "out": str(tmp_path / "o")}
    with pytest.raises(ValueError, match="--clip-model"):
        build_options(params_from(**base))
    with pytest.raises(PreflightError, match="not a CLIP model folder"):
        build_options(params_from(**base, clip_model=str(tmp_path)))
    good = {**base, "clip_model": str(tiny_clip_dir)}
    with pytest.raises(ValueError, match="crop_mode 'x' is not one of"):
        build_options(params_from(**good, crop_mode="x"))
    with pytest.raises(ValueError, match="shard_size"):
        build_options(params_from(**good, shard_size=0))
    with pytest.raises(TypeError, match="unknown mine-rsm parameter"):
        params_from(**good, fail_shards=[1])
    opts = build_options(params_from(**good, match_mode="clip", images_per_batch=4))
    assert opts.config.match.mode == "clip" and opts.config.images_per_batch == 4
    opts = build_options(params_from(**good, max_batch_pixels=1_000_000))
    assert opts.config.max_batch_pixels == 1_000_000
    with pytest.raises(ValueError, match="max_batch_pixels must be >= 1"):
        build_options(params_from(**good, max_batch_pixels=0))
    assert not (tmp_path / "o").exists()


def test_a_bank_left_from_a_replaced_model_is_refused_before_ray_starts(
    tiny_dataset, tiny_clip_dir, tmp_path
):
    """docs/walkthrough.md finding 3: the stale bank was found only inside every Ray worker (about 40
    lines of actor tracebacks, then the same error once per worker)."""
    import json
    import shutil

    from miners.bank import main as bank_main

    clip = tmp_path / "clip"
    shutil.copytree(tiny_clip_dir, clip)
    argv = ["--manifest", str(tiny_dataset / "manifest.parquet"), "--clip-model", str(clip), "--split", ""]
    assert bank_main([*argv, "--per-part", "4"]) == 0
    params = {"manifest": str(tiny_dataset / "manifest.parquet"), "out": str(tmp_path / "o")}
    build_options(params_from(**params, clip_model=str(clip)))  # a matching bank passes
    config = json.loads((clip / "config.json").read_text())
    (clip / "config.json").write_text(json.dumps({**config, "note": "another model"}))  # new fingerprint
    with pytest.raises(PreflightError) as info:
        build_options(params_from(**params, clip_model=str(clip)))
    (problem,) = info.value.problems
    assert "rsm-bank.json: built with CLIP model" in problem and "python -m miners.bank" in problem
    assert not (tmp_path / "o").exists()


def test_the_flow_driver_starts_without_torch_spacy_or_matplotlib():
    """Every command's start-up: `import flows.mine_rsm` took 6.9 s with torch (through miners.rsm and
    miners.clip_scorer), transformers, spaCy and matplotlib (the QA report), which only the Ray actors,
    refine rounds and QA need; without them it takes about half."""
    import subprocess
    import sys

    heavy = ("torch", "transformers", "spacy", "matplotlib")
    code = f"import sys, flows.mine_rsm; print([m for m in {heavy!r} if m in sys.modules])"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout


def test_a_changed_config_on_an_existing_out_is_refused_in_the_preflight_once_with_old_and_new_values(
    tiny_dataset, tiny_clip_dir, tmp_path, monkeypatch, capsys
):
    """The user's run: a changed --match-mode was refused only after 22 s (after Prefect started), printed
    4 times, without the values; a changed --crop-mode blamed the bank instead. Now: before Prefect or Ray,
    one line naming each changed key with its old and new value."""
    import json
    import shutil
    import time

    import ray

    import flows.mine_rsm as mine
    from miners.bank import main as bank_main
    from miners.run_config import run_config_for
    from storage.plan import plan_shards
    from storage.shards import begin_run

    clip = tmp_path / "clip"
    shutil.copytree(tiny_clip_dir, clip)
    manifest = str(tiny_dataset / "manifest.parquet")
    assert (
        bank_main(["--manifest", manifest, "--clip-model", str(clip), "--split", "", "--per-part", "4"]) == 0
    )
    out = tmp_path / "run"
    opts = build_options(params_from(manifest=manifest, out=str(out), clip_model=str(clip), shard_size=4))
    begin_run(out, plan_shards(manifest, 4, run_config_for(opts.config).to_dict()))  # a box-mode run
    run_file = (out / "_run.json").read_text()
    capsys.readouterr()

    def must_not_start(*_args, **_kwargs):
        raise AssertionError("a service started before the preflight refused")

    monkeypatch.setattr(mine.TemporaryPrefectServer, "begin", must_not_start)
    monkeypatch.setattr(mine, "ray_session", must_not_start)
    argv = ["--manifest", manifest, "--out", str(out), "--clip-model", str(clip), "--shard-size", "4"]
    cpu0 = time.process_time()
    rc = mine.main([*argv, "--crop-mode", "mask", "--match-mode", "clip"])  # the Prefect path
    cpu_s = time.process_time() - cpu0
    printed = capsys.readouterr()
    assert rc == 2 and printed.out == ""
    (line,) = printed.err.strip().splitlines()  # once
    assert line.startswith("error: 1 problem before mining:")
    assert "rsm.crop_mode 'box' -> 'mask'" in line and "rsm.match.mode 'combined' -> 'clip'" in line
    assert f"{out} holds run" in line and "new --out folder" in line
    assert "miners.bank" not in line and "cp -r" not in line  # the bank is not blamed, nothing to rebuild
    assert not ray.is_initialized() and (out / "_run.json").read_text() == run_file
    assert cpu_s < 5.0  # a few file reads and one model hash (Prefect's start alone took 22 s wall)
    # The same settings resume: no refusal from the preflight
    build_options(params_from(manifest=manifest, out=str(out), clip_model=str(clip), shard_size=4))
    with pytest.raises(PreflightError, match=r"shard_size 4 -> 8"):
        build_options(params_from(manifest=manifest, out=str(out), clip_model=str(clip), shard_size=8))

    # A fresh --out with --crop-mode mask and this box-mode bank: the bank is the problem. The fix mines
    # from a copy of the model folder, never rebuilds the bank other runs read, and its command is quoted.
    with pytest.raises(PreflightError) as info:
        build_options(
            params_from(manifest=manifest, out=str(tmp_path / "o2"), clip_model=str(clip), crop_mode="mask")
        )
    (problem,) = info.value.problems
    assert problem.count("`") == 2 and "MANIFEST: the manifest" in problem and " M " not in problem
    command = problem.split("`")[1]
    assert command.startswith(f"cp -r {clip} {clip}-mask && python -m miners.bank")
    assert f"--clip-model {clip}-mask --crop-mode mask" in command and f"--clip-model {clip} " not in command
    assert json.loads((clip / "rsm-bank.json").read_text())["crop_mode"] == "box"
