"""Every command's `--help` answers without importing the heavy libraries (torch, transformers, spaCy,
Prefect, Ray, matplotlib, FastAPI): each costs a second or more of start-up, and `--help` took 4.7–7.6 s on
a loaded machine when they were imported at the top. Imports where used keep it under 2 s.

The check is on what `--help` imports, not on its wall time: a wall-time bound flakes on a shared machine,
an import check fails exactly when a heavy import moves back to a module's top.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "spacy", "prefect", "ray", "matplotlib", "fastapi", "uvicorn")

# Not a user command (the caption splitter's debug CLI): spaCy is what it runs.
NOT_COMMANDS = {"miners.captions"}
SUBCOMMANDS = {"qa.audit": ("sample", "serve", "fit", "label", "export", "import")}

_PROBE = """
import json, runpy, sys
module, args = sys.argv[1], sys.argv[2:]
sys.argv = [module, *args]
try:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
except SystemExit as exc:
    code = exc.code
else:
    code = None
print(json.dumps({"code": code, "heavy": [m for m in HEAVY if m in sys.modules]}))
"""


def commands() -> list[str]:
    """Every `python -m X` of the project: modules with a `__main__` guard and packages with __main__.py."""
    found = set()
    for layer in ("storage", "miners", "qa", "flows"):
        for path in (REPO / layer).rglob("*.py"):
            module = ".".join(path.relative_to(REPO).with_suffix("").parts)
            if path.name == "__main__.py":
                found.add(module.removesuffix(".__main__"))
            elif 'if __name__ == "__main__"' in path.read_text():
                found.add(module)
    return sorted(found - NOT_COMMANDS)


def _cases() -> list:
    cases = []
    for module in commands():
        for sub in ((),) + tuple((s,) for s in SUBCOMMANDS.get(module, ())):
            cases.append(pytest.param(module, sub, id=" ".join((module, *sub))))
    return cases


def test_the_commands_are_found():
    found = commands()
    for expected in (
        "flows.mine_rsm",
        "flows.demo",
        "qa.report",
        "qa.audit",
        "storage.manifest",
        "storage.synth",
    ):
        assert expected in found
    assert "miners.bank" in found and "miners.refine_clip" in found


@pytest.mark.parametrize(("module", "sub"), _cases())
def test_help_imports_no_heavy_library(module, sub):
    probe = f"HEAVY = {HEAVY!r}\n{_PROBE}"
    done = subprocess.run(
        [sys.executable, "-c", probe, module, *sub, "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["code"] in (0, None), done.stderr[-2000:]
    assert "usage:" in done.stdout  # the help was printed
    assert result["heavy"] == [], f"`python -m {module} {' '.join(sub)} --help` imports {result['heavy']}"
