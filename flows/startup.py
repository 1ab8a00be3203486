"""Start-up of a mining command: what it waits on before its first shard, with limits that fit a loaded
2-core machine, retries where a retry is safe, one-line errors, and a clock of the phases.

A mining command waits on Prefect's temporary API server (when no PREFECT_API_URL names a running one),
a local Ray head node (when no --ray-address / RAY_ADDRESS names a cluster) and the Ray actors loading
their models. `TemporaryPrefectServer` starts the first in a background thread, so the CLI can start
Ray and the actors while it boots (flows/mine_rsm.py: `main`). Prefect's own start-up of that server
gives it 20 s (PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS): on a fresh PREFECT_HOME the first start
also creates and migrates its SQLite database, 17.8 s on an idle 2-core machine (2026-12-04), so any
other work on the cores failed a new user's first `make demo` with a traceback.

`CLOCK` marks each phase as seconds since this process started (`startup_s` in bench/results.json, the
`startup` block of the run summary, the CLI's "start-up" line).
"""

from __future__ import annotations

import contextvars
import os
import threading
import time
from pathlib import Path

# Per try. The project's own choice: 4x the slowest start measured on an idle machine (a fresh database),
# room for both cores busy with other work. A user's explicit PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS
# wins (Prefect's 20 s default is not taken: it is what failed).
PREFECT_START_LIMIT_S = 90.0
PREFECT_START_TRIES = 2
PREFECT_LIMIT_ENV = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"


class StartupError(RuntimeError):
    """Something the command waits on did not start. The message is one line: what did not start, how
    long it was waited for, and what to do."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 1] + "…"


# ---------------------------------------------------------------------------------------------- clock


def process_start_epoch() -> float:
    """When this process started (epoch seconds), from /proc: interpreter start and imports count too.
    Its start time there is in clock ticks since boot (10 ms), read against CLOCK_BOOTTIME (/proc/stat's
    btime has whole seconds only). Elsewhere (no /proc): when this module was imported."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started_after_boot_s = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of stat(5)
        age_s = time.clock_gettime(time.CLOCK_BOOTTIME) - started_after_boot_s
        return time.time() - age_s
    except (OSError, ValueError, IndexError, AttributeError):
        return _IMPORTED_AT


_IMPORTED_AT = time.time()


class StartupClock:
    """Named moments of this process's start-up, as seconds since the process started (first mark of a
    name wins: a second mining round does not move `first_shard`)."""

    def __init__(self) -> None:
        self.t0 = process_start_epoch()
        self.marks: dict[str, float] = {}

    def mark(self, name: str) -> None:
        self.marks.setdefault(name, round(time.time() - self.t0, 2))

    def reset(self) -> None:
        """For a second command in the same process (the demo runs several): count from now."""
        self.t0, self.marks = time.time(), {}

    def summary(self) -> dict[str, float]:
        return dict(self.marks)


CLOCK = StartupClock()


# ---------------------------------------------------------------------------------------------- Prefect


def prefect_api_url() -> str | None:
    """The Prefect API this process will use, or None when a flow run would start a temporary server."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


def prefect_start_limit_s() -> float:
    explicit = os.environ.get(PREFECT_LIMIT_ENV)
    try:
        return float(explicit) if explicit else PREFECT_START_LIMIT_S
    except ValueError:
        return PREFECT_START_LIMIT_S


class TemporaryPrefectServer:
    """Prefect's temporary API server, started by us with our limit, in a background thread.

    It is the same `SubprocessASGIServer` a flow run would start (a process-wide singleton), so the flow
    run, its logs and events then find it running and use it. A try that times out stops its half-started
    process before the next try (two servers would contend for the same SQLite database).
    """

    def __init__(self, limit_s: float | None = None, tries: int = PREFECT_START_TRIES):
        self.limit_s = limit_s if limit_s is not None else prefect_start_limit_s()
        self.tries = max(1, tries)
        self.error: StartupError | None = None
        self.api_url: str | None = None
        self.seconds = 0.0
        # The caller's context (e.g. temporary_settings) holds in the thread too: the same settings start it
        context = contextvars.copy_context()
        self._thread = threading.Thread(
            target=context.run, args=(self._run,), name="prefect-temporary-server", daemon=True
        )

    def begin(self) -> TemporaryPrefectServer:
        self._thread.start()
        return self

    def wait(self) -> str:
        """Block until the server answers; StartupError (one line) when every try failed."""
        self._thread.join()
        if self.error is not None:
            raise self.error
        assert self.api_url is not None
        return self.api_url

    def _run(self) -> None:
        t0 = time.perf_counter()
        last = ""
        try:
            from prefect.server.api.server import SubprocessASGIServer
            from prefect.settings import PREFECT_HOME

            for _ in range(self.tries):
                server = SubprocessASGIServer()
                try:
                    server.start(timeout=self.limit_s)  # type: ignore[arg-type]  (Prefect annotates int)
                    self.api_url = server.api_url
                    return
                except Exception as exc:  # a timeout, or the process died: stop it, then try again
                    last = first_line(exc)
                    server.stop()
            home = PREFECT_HOME.value()
        except Exception as exc:  # importing Prefect's server failed: not something a retry fixes
            last, home = first_line(exc), "?"
        finally:
            self.seconds = time.perf_counter() - t0
        self.error = StartupError(
            f"Prefect's temporary API server did not start: {self.tries} tries of up to {self.limit_s:g} s, "
            f"{self.seconds:.0f} s in all (PREFECT_HOME={home}; last: {last}). Other work may hold the "
            f"cores: rerun; or allow longer with {PREFECT_LIMIT_ENV}=300; or start a server once "
            "(`prefect server start`) and set PREFECT_API_URL=http://127.0.0.1:4200/api; or pass --no-prefect"
        )


__all__ = [
    "CLOCK",
    "PREFECT_START_LIMIT_S",
    "StartupClock",
    "StartupError",
    "TemporaryPrefectServer",
    "first_line",
    "prefect_api_url",
    "prefect_start_limit_s",
    "process_start_epoch",
]
