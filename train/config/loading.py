"""Reading recipes: YAML, dotted `key.sub=value` overrides, strict validation with one-line errors."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from train.config.schema import Recipe, algorithm
from train.errors import ConfigError


def trl_config_class(recipe: Recipe) -> type:
    """The TRL config class that `trainer:` feeds (imported lazily: trl is slow to import)."""
    import trl

    return getattr(trl, algorithm(recipe).trl_config)


def check_trainer_keys(recipe: Recipe) -> None:
    """Unknown TRL fields, and fields the algorithm sets itself, fail here naming `trainer.<key>`, before any model
    loads."""
    cls = trl_config_class(recipe)
    fields = {f.name for f in dataclasses.fields(cls)}
    owned = algorithm(recipe).owned
    for key in recipe.trainer:
        if key not in fields:
            raise ConfigError(f"trainer.{key}: not a field of trl.{cls.__name__}")
        if key in owned:
            raise ConfigError(f"trainer.{key}: `{recipe.algorithm}` sets it from {owned[key]}")


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `5e-6` / `1E3` (no dot) as floats, as YAML 1.2 does; YAML 1.1 makes them strings,
    which `trainer:` (passed through untyped) would hand to TRL as text."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override `{text}`: expected key.sub=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override `{text}`: empty key")
    try:
        value = _yaml(raw) if raw != "" else ""
    except (yaml.YAMLError, ValueError, RecursionError):  # ValueError: e.g. an impossible date `2001-13-45`
        value = raw
    return key.split("."), value


def apply_override(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for i, part in enumerate(path[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {'.'.join(path)}: `{'.'.join(path[: i + 1])}` is not a section")
        node = child
    node[path[-1]] = value


def _error_line(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "(top level)"
    kind = first["type"]
    if kind == "extra_forbidden":
        return f"{source}: unknown key `{key}`"
    if kind == "missing":
        return f"{source}: missing required key `{key}`"
    msg = first["msg"].removeprefix("Value error, ")
    return f"{source}: `{key}`: {msg}"


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a YAML recipe, apply `key.sub=value` overrides and validate it strictly."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe file not found: {path}")
    try:
        tree = _yaml(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    except (ValueError, OSError, RecursionError) as e:  # undecodable bytes, an impossible date, unreadable file
        raise ConfigError(f"{path}: cannot read recipe ({type(e).__name__}: {e})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of keys")
    for text in overrides:
        keys, value = parse_override(text)
        apply_override(tree, keys, value)
    try:
        recipe = Recipe.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_error_line(e, str(path))) from None
    check_trainer_keys(recipe)
    return recipe


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    return recipe.model_dump(mode="json")
