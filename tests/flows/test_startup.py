"""Start-up of a mining command as users get it: the CLI in a fresh process, Prefect's temporary server on a
fresh PREFECT_HOME, no test harness (it raises the start limit and so hides the one users get), cores busy
with other work, and a previous run's Ray still shutting down.

A fresh clone's first `make demo` failed with "Timed out while attempting to connect to ephemeral Prefect
API server" (Prefect's 20 s default; the first start migrates a new SQLite database), and a run begun
right after another failed "The current node timed out during startup" in 2 of 3 tries (2026-12-04).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.startup import StartupClock, StartupError, process_start_epoch

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(900)

# A CPU burner of the test's own: bounded in time by itself, killed by pid by the test
BURN = "import time\nt0 = time.time()\nwhile time.time() - t0 < {s}:\n    pass\n"


def user_env(prefect_home: Path, **extra: str) -> dict[str, str]:
    """The environment of a user's shell: no Prefect API, no test settings, a PREFECT_HOME of its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "PYTEST_", "RAY_ADDRESS"))}
    return env | {"PREFECT_HOME": str(prefect_home), "PYTHONPATH": str(ROOT)} | extra


def mine_cmd(params: dict, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "flows.mine_rsm", "--manifest", params["manifest"], "--out", str(out),
        "--clip-model", params["clip_model"], "--shard-size", "12", *extra,
    ]  # fmt: skip


@pytest.fixture
def params(tiny_dataset, tiny_clip_dir) -> dict:
    return {"manifest": str(tiny_dataset / "manifest.parquet"), "clip_model": str(tiny_clip_dir)}


@pytest.fixture
def busy_cores():
    """Both cores busy for the test: two burners (at most 600 s each), killed by pid afterwards."""
    burners = [subprocess.Popen([sys.executable, "-c", BURN.format(s=600)]) for _ in range(2)]
    try:
        yield [p.pid for p in burners]
    finally:
        for proc in burners:
            proc.kill()
            proc.wait(timeout=30)


def test_the_cli_starts_on_a_fresh_prefect_home_while_both_cores_are_busy(params, tmp_path, busy_cores):
    home = tmp_path / "prefect-home"  # does not exist yet: the server creates and migrates its database
    out = tmp_path / "shards"
    for pid in busy_cores:
        assert Path(f"/proc/{pid}").exists()  # the burners run while the command starts
    proc = subprocess.run(
        mine_cmd(params, out), env=user_env(home), cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert (out / "_SUCCESS").is_file() and "3/3 shards (3 mined now)" in proc.stdout
    assert (home / "prefect.db").is_file()  # the temporary server used this fresh home
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("start-up"))
    assert "to the first shard" in line and "prefect" in line and "ray" in line


def test_a_run_started_while_the_previous_runs_ray_shuts_down_succeeds(params, tmp_path):
    """The previous run: a local Ray with two actors that imported torch (as mining workers do); the new
    command starts the moment that Ray begins to shut down."""
    previous = (
        "import sys, ray\n"
        "ray.init(address='local', num_cpus=2, include_dashboard=False)\n"
        "@ray.remote(num_cpus=1)\n"
        "class W:\n"
        "    def ready(self):\n"
        "        import torch\n"
        "        return torch.get_num_threads()\n"
        "ws = [W.remote() for _ in range(2)]\n"
        "ray.get([w.ready.remote() for w in ws])\n"
        "print('up', flush=True)\n"
        "sys.stdin.readline()\n"
        "ray.shutdown()\n"
    )
    env = user_env(tmp_path / "prefect-home")
    prev = subprocess.Popen(
        [sys.executable, "-c", previous], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert prev.stdout is not None and prev.stdin is not None
        assert prev.stdout.readline().strip() == "up"
        prev.stdin.write("\n")
        prev.stdin.flush()  # its ray.shutdown() starts now
        proc = subprocess.run(
            mine_cmd(params, tmp_path / "shards", "--no-prefect"),
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
    finally:
        prev.kill()
        prev.wait(timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "3/3 shards (3 mined now)" in proc.stdout


def test_a_prefect_server_that_does_not_start_in_its_limit_is_one_line_and_rc_3(params, tmp_path):
    env = user_env(tmp_path / "prefect-home", PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="1")
    out = tmp_path / "shards"
    proc = subprocess.run(
        mine_cmd(params, out), env=env, cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 3, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr
    (error,) = errors
    # what did not start, how long it was waited for, what to do
    assert "Prefect's temporary API server did not start: 2 tries of up to 1 s" in error
    assert "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=300" in error and "PREFECT_API_URL" in error
    assert not (out / "_SUCCESS").exists()


def test_a_failed_ray_start_is_retried_then_said_in_one_line(monkeypatch):
    """A head node that does not come up cannot be made to fail on demand here: ray.init is replaced
    by one that fails the way it did (the message Ray raises), to check the retry and the message."""
    import ray

    from flows import ray_workers

    calls = []

    def failing_init(*args, **kwargs):
        calls.append(kwargs.get("address"))
        raise Exception(
            "The current node timed out during startup. This could happen because some of the raylet "
            "failed to startup or the GCS has become overloaded."
        )

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", failing_init)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr(ray_workers, "RAY_RETRY_PAUSE_S", 0.0)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(StartupError) as info:
        ray_workers.connect_ray(tries=3)
    message = str(info.value)
    assert calls == ["local"] * 3 and "\n" not in message
    assert message.startswith("Ray's local head node did not start: 3 tries")
    assert "timed out during startup" in message and "ray stop" in message

    calls.clear()
    outcomes = iter([Exception("The current node timed out during startup."), None])

    def flaky_init(*args, **kwargs):
        calls.append(kwargs.get("address"))
        if (exc := next(outcomes)) is not None:
            raise exc

    monkeypatch.setattr(ray, "init", flaky_init)
    assert ray_workers.connect_ray(tries=3) is True and len(calls) == 2


def test_the_startup_clock_counts_from_the_process_start():
    t0 = process_start_epoch()
    assert t0 <= time.time() and time.time() - t0 < 24 * 3600  # this process, not the machine's boot
    clock = StartupClock()
    clock.mark("a")
    clock.mark("a")  # the first mark of a name wins
    assert list(clock.summary()) == ["a"] and clock.summary()["a"] >= 0
