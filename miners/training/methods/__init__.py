"""The training methods, by name (`python -m miners.train_rogle --method NAME`).

Each is one module of this package with a `Method` subclass (see base.py). The registry names modules, not
classes, so `--help`, config checks and the docs list the methods without importing torch; the names are
`miners.training.config.METHOD_NAMES`.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from typing import Any

from miners.training.config import METHOD_NAMES

# name → "module:class"
METHODS: dict[str, str] = {
    "rogle": "miners.training.methods.rogle:RogleMethod",
    "irra": "miners.training.methods.irra:IrraMethod",
    "park": "miners.training.methods.park:ParkMethod",
    "scmm": "miners.training.methods.scmm:ScmmMethod",
    "ivt": "miners.training.methods.ivt:IvtMethod",
}
assert tuple(METHODS) == METHOD_NAMES, "miners.training.config lists the methods"


def method_class(name: str):
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}: choose one of {', '.join(METHODS)}")
    module, cls = METHODS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def method_options(name: str, given: dict[str, Any]) -> Any:
    """The method's options dataclass with `given` applied; unknown names are refused by name."""
    cls = method_class(name).options
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(given) - known)
    if unknown:
        raise ValueError(
            f"method {name} has no option(s) {', '.join(unknown)}"
            + (f"; its options: {', '.join(sorted(known))}" if known else "; it has no options")
        )
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in given:
            values[f.name] = _typed(given[f.name], getattr(cls(), f.name), f"{name}.{f.name}")
    return cls(**values)


def _typed(value: Any, default: Any, where: str) -> Any:
    """A command line's "key=value" string (or a file's value) in the type of the option's default."""
    if not isinstance(value, str) or isinstance(default, str):
        return value
    try:
        parsed = json.loads(value.lower() if isinstance(default, bool) else value)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"method option {where}: cannot read {value!r} as a {type(default).__name__}"
        ) from exc
    if isinstance(default, float) and isinstance(parsed, int):
        parsed = float(parsed)
    if isinstance(default, tuple) and isinstance(parsed, list):
        parsed = tuple(parsed)
    if default is not None and not isinstance(parsed, type(default)):
        raise ValueError(f"method option {where}: expected a {type(default).__name__}, got {value!r}")
    return parsed


def build_method(name: str, given: dict[str, Any] | None = None):
    """The Method instance for a run's `method` and `method_options`."""
    return method_class(name)(method_options(name, dict(given or {})))
