"""Reward names a recipe can use (`score.reward`), each mapped to a factory that returns a TRL-style reward.

A reward is `f(prompts, completions, **kwargs) -> list[float | None]` (TRL's signature; None = unscorable).
Factories take keyword context (`answer_type`, `generate`, ...) and ignore what they do not need.
Anything else is a dotted import path, `pkg.module:name` or `pkg.module.name`: an attribute whose name starts with
`get_` is a factory and is called with the same context; any other callable is used as the reward itself.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from rewards.self_verify import get_self_verify_reward
from rewards.verifier import Reward, get_verifier_reward

REWARDS: dict[str, Callable[..., Reward]] = {
    "verifier": get_verifier_reward,
    "self_verify": get_self_verify_reward,
}


def _import(path: str) -> tuple[str, Any]:
    module, sep, name = path.partition(":") if ":" in path else path.rpartition(".")
    if not sep or not module or not name:
        raise ValueError(f"reward `{path}`: not one of {sorted(REWARDS)} nor a dotted path `pkg.module:name`")
    try:
        return name, getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"reward `{path}`: cannot import ({e})") from None
    except Exception as e:  # the module itself failed (SyntaxError, an error at import time, a relative name)
        raise ValueError(f"reward `{path}`: cannot import ({type(e).__name__}: {e})") from None


def _callable(name: str) -> tuple[str, Callable[..., Any]]:
    attr_name, obj = _import(name)
    if not callable(obj):
        raise ValueError(f"reward `{name}`: {type(obj).__name__} is not callable")
    return attr_name, obj


def check_reward(name: str) -> None:
    """Raise ValueError unless `name` is a registered reward or imports as a callable; nothing is built (recipe
    validation calls it, so a typo fails before any model loads)."""
    if name not in REWARDS:
        _callable(name)


def make_reward(name: str, **context: Any) -> Reward:
    """Build the reward named in a recipe; `context` goes to the factory (e.g. answer_type=..., generate=...)."""
    if name in REWARDS:
        return REWARDS[name](**context)
    attr_name, obj = _callable(name)
    return obj(**context) if attr_name.startswith("get_") else obj
