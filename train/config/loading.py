"""Reading recipes: YAML, dotted `key.sub=value` overrides, strict validation with one-line errors."""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import TypeAdapter, ValidationError

from train.config.schema import Recipe, algorithm
from train.errors import ConfigError


def trl_config_class(recipe: Recipe) -> type:
    """The TRL config class that `trainer:` feeds (imported lazily: trl is slow to import)."""
    import trl

    return getattr(trl, algorithm(recipe).trl_config)


def check_trainer_keys(recipe: Recipe) -> None:
    """Unknown TRL fields, fields the algorithm sets itself, and values TRL would refuse fail here naming
    `trainer.<key>`, before any model loads: numbers and flags are checked (and coerced, `"3"` -> 3) against the
    TRL field's type, then the config is built once, offline (`_probe_trl_config`)."""
    cls = trl_config_class(recipe)
    fields = {f.name for f in dataclasses.fields(cls)}
    owned = algorithm(recipe).owned
    for key in recipe.trainer:
        if key not in fields:
            raise ConfigError(f"trainer.{key}: not a field of trl.{cls.__name__}")
        if key in owned:
            raise ConfigError(f"trainer.{key}: `{recipe.algorithm}` sets it from {owned[key]}")
    hints = _field_types(cls)
    for key, value in list(recipe.trainer.items()):
        scalar = _scalar_type(hints.get(key))
        if scalar is None:
            continue  # lists, dicts, enums-or-strings: TRL's own __post_init__ below judges them
        try:
            recipe.trainer[key] = TypeAdapter(scalar).validate_python(value)
        except ValidationError as e:
            shown = "" if is_secret_key(key) else f" {value!r}:"
            raise ConfigError(
                f"trainer.{key}:{shown} {e.errors()[0]['msg']} (trl.{cls.__name__} wants {_type_name(scalar)})"
            ) from None
    _probe_trl_config(cls, recipe.trainer)


# TRL config keys that depend on the machine (GPU features, DeepSpeed, compilers), left out of the offline probe so
# that a GPU recipe validates on a CPU login node; TRL checks them when the trainer starts.
_MACHINE_KEYS = {"use_cpu", "tf32", "deepspeed", "torch_compile", "torch_compile_backend", "torch_compile_mode"}
# What `train/trainers/trl_config.py::shared_defaults` sets that changes TRL's checks (e.g. eval steps fall back to
# logging_steps), so the probe judges the recipe's values as the real build will.
_PROBE_DEFAULTS = {"logging_steps": 1, "save_strategy": "steps", "save_total_limit": 1, "report_to": "none"}


@functools.cache
def _offline(cls: type) -> type:
    """`cls` without its device setup: building it creates no accelerate state and no process group (those belong to
    the trainer, after `dist.configure`), so the probe has no side effect and writes nothing."""
    import torch

    def _setup_devices(self: Any) -> Any:
        self.distributed_state, self._n_gpu = None, 0
        return torch.device("cpu")

    return type(cls.__name__, (cls,), {"_setup_devices": functools.cached_property(_setup_devices)})


def _probe_trl_config(cls: type, trainer: dict[str, Any]) -> None:
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    values = {k: v for k, v in trainer.items() if k not in _MACHINE_KEYS}
    level, disabled = hf_logging.get_verbosity(), logging.root.manager.disable
    # Under `accelerate launch` with a DeepSpeed config, TrainingArguments would build a DeepSpeed plugin and
    # register it globally; that belongs to the trainer. The process is single-threaded here.
    deepspeed_env = os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
    hf_logging.set_verbosity_error()  # deprecation notes would print twice: here and when the trainer starts
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logging.disable(logging.WARNING)
            _offline(cls)(output_dir="unused", use_cpu=True, **(_PROBE_DEFAULTS | values))
    except Exception as e:  # TRL/transformers raise ValueError, TypeError, KeyError, OSError (config files), ...
        text = " ".join(str(e).split()) or type(e).__name__
        named = [k for k in values if re.search(rf"\b{re.escape(str(k))}\b", text)] or [
            k  # TRL named the value, not the key: "nope is not a valid SchedulerType"
            for k, v in values.items()
            if isinstance(v, str) and len(v) > 1 and not is_secret_key(k) and re.search(rf"\b{re.escape(v)}\b", text)
        ]
        where = f"trainer.{named[0]}" if named else "trainer"
        if any(is_secret_key(k) for k in values):
            for k, v in values.items():
                if is_secret_key(k) and isinstance(v, str) and v:
                    text = text.replace(v, REDACTED)
        raise ConfigError(f"{where}: trl.{cls.__name__} refuses it: {text}") from None
    finally:
        logging.disable(disabled)
        hf_logging.set_verbosity(level)
        if deepspeed_env is not None:
            os.environ["ACCELERATE_USE_DEEPSPEED"] = deepspeed_env


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # an annotation this Python cannot resolve: leave the values to the probe
        return {}


def _scalar_type(hint: Any) -> Any:
    """`int`, `float`, `bool` or their Optional: the types checked one by one; None for anything else."""
    args = [a for a in typing.get_args(hint) if a is not type(None)] if typing.get_args(hint) else [hint]
    if len(args) == 1 and args[0] in (int, float, bool):
        return hint
    return None


def _type_name(hint: Any) -> str:
    names = [getattr(a, "__name__", str(a)) for a in (typing.get_args(hint) or (hint,))]
    return " or ".join("null" if n == "NoneType" else n for n in names)


def check_reward(recipe: Recipe) -> None:
    """`score.reward` names a registered reward or an importable callable (imported now, built by the run)."""
    if recipe.score is None:
        return
    from rewards.registry import check_reward as check

    try:
        check(recipe.score.reward)
    except ValueError as e:
        raise ConfigError(f"score.reward: {e}") from None


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `5e-6` / `1E3` (no dot) as floats, as YAML 1.2 does; YAML 1.1 makes them strings,
    which `trainer:` (passed through untyped) would hand to TRL as text. A key given twice in one mapping is an error
    (PyYAML would silently keep the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` entries may be overridden
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # unhashable: SafeLoader's own check names it
                    continue
                if first is not None:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key `{key}` (first on line {first + 1})", key_node.start_mark
                    )
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


def parse_override(text: str) -> tuple[list[str], Any]:
    shown = text.replace("\r", "\\r").replace("\n", "\\n")  # an error is one line, whatever the shell passed
    if "=" not in text:
        raise ConfigError(f"override `{shown}`: expected key.sub=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override `{shown}`: empty key")
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
    bounds = _bounds(first["loc"])
    if bounds and not any(str(b) in msg for b in bounds.values()):  # e.g. 1e20 for an int: "exceeded maximum size"
        msg += " (allowed: " + ", ".join(f"{op} {b}" for op, b in bounds.items()) + ")"
    return f"{source}: `{key}`: {msg}"


def _bounds(loc: tuple[Any, ...]) -> dict[str, Any]:
    """The numeric bounds of the schema field at `loc` (`{">=": 1, "<=": 512}`), or {} when it has none."""
    model: Any = Recipe
    info = None
    for part in loc:
        fields = getattr(model, "model_fields", None)
        if not isinstance(fields, dict) or part not in fields:
            return {}
        info = fields[part]
        model = next((a for a in typing.get_args(info.annotation) if hasattr(a, "model_fields")), info.annotation)
    ops = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    meta = info.metadata if info is not None else []
    return {sym: getattr(m, name) for m in meta for name, sym in ops.items() if getattr(m, name, None) is not None}


# Paths inside a recipe file, resolved against that file's folder (overrides on the command line are relative to the
# working directory, like any shell argument). `output_dir` is not among them: it is where you run from.
RECIPE_PATHS = (("data", "train_file"), ("data", "eval_file"), ("meta_rewarding", "judge_eval_file"),
                ("sft", "ift_file"), ("sft", "eft_file"))  # fmt: skip


def _resolve_paths(tree: dict[str, Any], folder: Path) -> None:
    def absolute(value: str) -> str:
        return os.path.normpath(os.path.join(os.path.abspath(folder), value))

    for section, key in RECIPE_PATHS:
        node = tree.get(section)
        if isinstance(node, dict) and isinstance(node.get(key), str) and node[key] and not os.path.isabs(node[key]):
            node[key] = absolute(node[key])
    model = tree.get("model")
    # A local model path: `./m`, `../m`, or a folder next to the recipe; anything else stays a hub id (or the
    # embedded name), which never names a local folder.
    if isinstance(model, str) and model and not os.path.isabs(model) and not model.startswith("~"):
        try:
            local = model.startswith(("./", "../")) or (folder / model).is_dir()
        except (OSError, ValueError):
            local = False
        if local:
            tree["model"] = absolute(model)


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a YAML recipe, apply `key.sub=value` overrides and validate it strictly. Relative paths in the file are
    made absolute against its folder (`RECIPE_PATHS`, a local `model:`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe file not found: {path}")
    try:
        tree = _yaml(path.read_bytes().decode("utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte 0x{e.object[e.start]:02x})") from None
    except (ValueError, OSError, RecursionError) as e:  # an impossible date, unreadable file
        raise ConfigError(f"{path}: cannot read recipe ({type(e).__name__}: {e})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of keys")
    _resolve_paths(tree, path.parent)
    for text in overrides:
        keys, value = parse_override(text)
        apply_override(tree, keys, value)
    try:
        recipe = Recipe.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_error_line(e, str(path))) from None
    check_trainer_keys(recipe)
    check_reward(recipe)
    return recipe


REDACTED = "<redacted>"


def is_secret_key(key: Any) -> bool:
    """`hub_token`, `*_token`, `*api_key*`, `*secret*`, `*password*`: never written out. Keys ending in `_env` (e.g.
    `sampling.server_api_key_env`) name an environment variable, not its value, and are kept."""
    k = str(key).lower().replace("-", "_")
    if k.endswith("_env"):
        return False
    return k == "token" or k.endswith("_token") or "api_key" in k or "apikey" in k or "secret" in k or "password" in k


def redact(value: Any) -> Any:
    """A copy of `value` with the value of every token-like key (`is_secret_key`) replaced by `REDACTED`."""
    if isinstance(value, dict):
        return {k: REDACTED if is_secret_key(k) and v is not None else redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """The recipe as JSON data, secrets redacted: what recipe.json, wandb's config and the report show."""
    return redact(recipe.model_dump(mode="json"))
