"""A record of the paths a block of code opens or looks at, for "touched nothing outside the root" tests.

`open` (and every `os.*` event) comes from a `sys.addaudithook` hook; `os.stat`, `os.lstat` and
`os.readlink` raise no audit event, so a fixture spies on those three as well. Audit hooks cannot be
removed, so the one hook installed per process records only while a `FileAccess.recording()` is active.
"""

from __future__ import annotations

import contextlib
import os
import sys

_ACCESS_LOG: list[tuple[str, str]] | None = None
_AUDIT_HOOK_INSTALLED = False


def _record_access(event: str, args: tuple) -> None:
    log = _ACCESS_LOG
    if log is None or not (event == "open" or event.startswith("os.")):
        return
    # `open` is (path, mode, flags): only its first argument is a path (an int when opening a descriptor).
    for arg in args[:1] if event == "open" else args:
        if isinstance(arg, str | bytes | os.PathLike):
            log.append((event, os.fsdecode(arg)))


class FileAccess:
    """The paths opened or looked at (event, path) while `recording()` is active."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    @contextlib.contextmanager
    def recording(self):
        global _ACCESS_LOG
        _ACCESS_LOG = self.events
        try:
            yield self
        finally:
            _ACCESS_LOG = None

    def outside(self, *roots: str | os.PathLike) -> list[tuple[str, str]]:
        """Events on paths that are none of `roots` and under none of them (string prefix, unresolved)."""
        prefixes = [os.fspath(r) for r in roots]
        return [
            (e, p)
            for e, p in self.events
            if not any(p == r or p.startswith(r.rstrip("/") + "/") for r in prefixes)
        ]


def install(monkeypatch) -> FileAccess:
    """Install the hook (once per process) and the stat/lstat/readlink spies (for one test)."""
    global _AUDIT_HOOK_INSTALLED
    if not _AUDIT_HOOK_INSTALLED:
        sys.addaudithook(_record_access)
        _AUDIT_HOOK_INSTALLED = True
    for name in ("stat", "lstat", "readlink"):
        original = getattr(os, name)

        def spy(path, *args, _original=original, _event=f"os.{name}", **kwargs):
            log = _ACCESS_LOG
            if log is not None and isinstance(path, str | bytes | os.PathLike):
                log.append((_event, os.fsdecode(path)))
            return _original(path, *args, **kwargs)

        monkeypatch.setattr(os, name, spy)
    return FileAccess()
