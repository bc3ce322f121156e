"""Unknown config keys are refused, whatever their prefix, in one line naming the closest key.

Hydra refuses `train.betta=0.1` (in seven lines that list no valid key) and suggests
`+train.betta=0.1`, which it then accepts silently, as it accepts `++train.betta=0.1`.
Here every override on the command line and every key of the composed config is checked
against the schema (the root dataclass, `cpt.config.CptConfig`, and those under it; passed
in, so this module imports no config): a key that is not
a field, not under a free-form field (a `dict` or `list`, such as
`cluster.additional_parameters`) and not a config group is reported as

    train.betta: unknown config key (did you mean train.beta?)
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from pathlib import Path
from typing import Any

from cpt.store import REPO_ROOT

CONF_DIR = REPO_ROOT / "conf"


def _dataclass_of(tp: Any) -> type | None:
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and dataclasses.is_dataclass(args[0]):
            return args[0]
    return None


def _paths(cls: type, prefix: str = "") -> dict[str, bool]:
    hints = typing.get_type_hints(cls)
    out: dict[str, bool] = {}
    for f in dataclasses.fields(cls):
        tp, path = hints[f.name], prefix + f.name
        sub = _dataclass_of(tp)
        out[path] = sub is None and (tp is Any or typing.get_origin(tp) in (dict, list))
        if sub is not None:
            out.update(_paths(sub, path + "."))
    return out


@functools.cache
def schema_paths(root: type) -> dict[str, bool]:
    """Every dotted key of the schema `root` (a dataclass, e.g. `cpt.config.CptConfig`)
    -> whether any key below it is allowed (a dict or list field)."""
    return _paths(root)


def unknown_key(root: type, key: str, groups: tuple[str, ...] = ()) -> str | None:
    """The one-line problem with `key` (dotted), or None when the schema has it."""
    paths = schema_paths(root)
    parts = key.split(".")
    if key in paths or key in groups:
        return None
    if any(paths.get(".".join(parts[:i])) for i in range(1, len(parts))):
        return None  # below a free-form field
    close = difflib.get_close_matches(key, [*paths, *groups], n=1, cutoff=0.6)
    parent = ".".join(parts[:-1])
    if close:
        hint = f"did you mean {close[0]}?"
    elif parent in paths:
        keys = sorted(p.rsplit(".", 1)[-1] for p in paths if p.rsplit(".", 1)[0] == parent)
        hint = f"keys of {parent}: {', '.join(keys)}"
    else:
        hint = "see `python jobs/launch.py --cfg job`"
    return f"{key}: unknown config key ({hint})"


def config_groups(conf_dir: Path = CONF_DIR) -> tuple[str, ...]:
    """Config group names (folders of conf/), which overrides may choose (`teacher=tiny`)."""
    return tuple(sorted(p.name for p in conf_dir.iterdir() if p.is_dir()))


def override_key(arg: str) -> str | None:
    """The dotted key an override sets (`+train.betta=0.1` -> `train.betta`), or None for
    what is not a config key (flags, Hydra's own keys, group paths like hydra/launcher)."""
    if arg.startswith("-") or ("=" not in arg and not arg.startswith("~")):
        return None
    key = arg.lstrip("~+").split("=", 1)[0].split("@", 1)[0].strip()
    if not key or "/" in key or key == "hydra" or key.startswith("hydra."):
        return None
    return key


def override_problems(
    root: type, args: list[str], conf_dir: Path = CONF_DIR
) -> list[tuple[str, str]]:
    """(argument, problem) for each command-line override naming an unknown key."""
    groups = config_groups(conf_dir)
    out = []
    for arg in args:
        key = override_key(arg)
        problem = unknown_key(root, key, groups) if key else None
        if problem:
            out.append((arg, problem))
    return out


def composed_problems(root: type, node: Any, prefix: str = "") -> list[str]:
    """Unknown keys anywhere in a composed config (a plain dict of the OmegaConf node)."""
    paths = schema_paths(root)
    out = []
    for key in node:
        path = f"{prefix}{key}"
        if path not in paths:
            problem = unknown_key(root, path)
            if problem:
                out.append(problem)
        elif not paths[path] and hasattr(node[key], "keys"):
            out += composed_problems(root, node[key], path + ".")
    return out
