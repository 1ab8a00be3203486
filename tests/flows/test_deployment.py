"""The real deployment path: Prefect server + process work pool + `prefect deploy` from prefect.yaml +
process worker + `prefect deployment run mine-rsm/demo --watch`, driven by flows/deploy_local.sh.

The demo deployment's parameters are overridden with `--param` to point at the tiny dataset and tiny
CLIP built in tmp dirs; `out` is given RELATIVE to the repository root, so the committed output landing
in the tmp folder proves that the flow ran in the directory the pull step set.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from storage.reader import read_run_manifest, read_status, verify_run

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "flows" / "deploy_local.sh"
RUN_TIMEOUT_S = 240

pytestmark = [pytest.mark.prefect_server, pytest.mark.timeout(RUN_TIMEOUT_S + 60)]


def test_prefect_yaml_declares_both_deployments_on_the_process_pool():
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    pull = spec["pull"]
    assert [next(iter(step)) for step in pull] == ["prefect.deployments.steps.set_working_directory"]
    deployments = {d["name"]: d for d in spec["deployments"]}
    assert set(deployments) == {"pvlg", "demo"}
    for d in deployments.values():
        assert d["entrypoint"] == "flows/mine_rsm.py:mine_rsm" and d["work_pool"]["name"] == "rsm-process"
    assert deployments["pvlg"]["parameters"]["manifest"] == "data/pvlg/manifest.parquet"
    assert deployments["pvlg"]["parameters"]["clip_model"] == "models/clip-vit-base-patch16"
    # Its own folder: `make demo` mines outputs/demo/shards with refine rounds (another config), so a
    # one-round deployment run there after `make demo` was refused (docs/walkthrough.md, section 6)
    assert deployments["demo"]["parameters"]["out"] == "outputs/demo/shards-deployed"
    # Every parameter named in prefect.yaml is a parameter of the flow
    from flows.mine_rsm import mine_rsm

    for d in deployments.values():
        assert set(d["parameters"]) <= set(mine_rsm.parameters.properties), d["name"]


def _run_script(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run the script in its own session; on timeout SIGTERM it (its trap stops server and worker)."""
    proc = subprocess.Popen(
        ["bash", str(SCRIPT), *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
        pytest.fail(f"deploy_local.sh did not finish in {RUN_TIMEOUT_S}s:\n{out[-4000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, None)


def test_deployment_run_through_server_and_process_worker(tiny_dataset, tiny_clip_dir, tmp_path):
    out = tmp_path / "demo-shards"
    home = tmp_path / "prefect-home"
    home.mkdir()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_BIN": str(Path(sys.executable).parent / "prefect"),
        "PREFECT_UI_ENABLED": "false",  # not needed here; saves serving the UI bundle
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    env.pop("PREFECT_API_URL", None)
    params = {
        "manifest": str(tiny_dataset / "manifest.parquet"),
        "clip_model": str(tiny_clip_dir),
        "out": os.path.relpath(out, REPO),  # relative: resolved in the pull step's directory
        "shard_size": "12",
        "max_workers": "1",
    }
    args = [arg for key, value in params.items() for arg in ("--param", f"{key}={value}")]
    result = _run_script(args, env)
    assert result.returncode == 0, result.stdout[-6000:]
    assert "Flow run finished successfully in 'Completed'" in result.stdout
    assert "prefect.flow-run.pull-step.executed" in result.stdout

    # The committed output of the run, read through the run manifest
    manifest_ids = pq.read_table(params["manifest"], columns=["sample_id"])["sample_id"].to_pylist()
    assert sorted(read_status(out)["sample_id"].to_pylist()) == sorted(manifest_ids)
    assert read_run_manifest(out)["finalized"] is True
    assert verify_run(out) == []
    # The script stopped what it started
    pids = [int(m) for m in re.findall(r"(?:server|worker started) \(pid (\d+)\)", result.stdout)]
    assert len(pids) == 2, result.stdout[-2000:]
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)

    # Bad parameters: `--watch` shows why (before: only "Flow run finished in state 'Failed'", the
    # reason was in the worker's terminal between two tracebacks)
    bad = {**params, "clip_model": "models/no-such-clip", "out": os.path.relpath(tmp_path / "o2", REPO)}
    args = [arg for key, value in bad.items() for arg in ("--param", f"{key}={value}")]
    failed = _run_script(args, env)
    assert failed.returncode == 1, failed.stdout[-6000:]
    # what --watch streamed (rich wraps it at the terminal's width)
    watched = " ".join(failed.stdout.split("Flow run finished in state")[0].split())
    assert "preflight: 1 problem before mining: (1) CLIP model folder" in watched, failed.stdout[-6000:]
    assert "models/no-such-clip does not exist" in watched and "--param clip_model=DIR" in watched
    assert "Traceback" not in watched  # one line each, not the engine's frames
    assert not (tmp_path / "o2").exists()
