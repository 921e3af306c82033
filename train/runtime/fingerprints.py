"""What a phase's result depends on, so a rerun after a recipe edit redoes exactly the stale phases.

A phase's inputs are: the recipe keys it reads (and only those), values computed from the recipe (e.g. this
iteration's vote threshold, a digest of the prompts), the fingerprints of the phases it reads from (its own
iteration's earlier phases, and the training phase that made the adapter it samples with), the model, and
`RESULT_VERSION`. The fingerprint is a digest of them. The selfreward version is deliberately not an input:
releases that do not change results must not throw finished work away; bump `RESULT_VERSION` when one does.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

RESULT_VERSION = 1  # bump when a code change alters what a finished phase would have produced


def digest(obj: Any) -> str:
    """A short stable digest of any JSON-able value (dict key order does not matter)."""
    text = json.dumps(obj, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def recipe_value(tree: dict[str, Any], dotted: str) -> Any:
    """`tree` (a recipe dumped to JSON types) at `a.b.c`; a missing key reads as None."""
    node: Any = tree
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _is_digest(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 16 and all(c in "0123456789abcdef" for c in value)


def _short(value: Any) -> str:
    text = json.dumps(value, default=str, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


def describe_changes(old: dict[str, Any], new: dict[str, Any]) -> str:
    """One line naming what differs between two input records, e.g.
    `scpo.vote_threshold: [1.0] -> [0.5]; input iter_1/generate changed`."""
    parts = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) == new.get(key):
            continue
        if key.startswith("<"):
            parts.append(f"input {key[1:]} changed")
        elif key.startswith("=") and all(_is_digest(v) for v in (old.get(key), new.get(key))):
            parts.append(f"{key[1:]} changed")  # e.g. the prompts: their digests say nothing to a reader
        elif key.startswith("="):
            parts.append(f"{key[1:]}: {_short(old.get(key))} -> {_short(new.get(key))}")
        else:
            parts.append(f"{key}: {_short(old.get(key))} -> {_short(new.get(key))}")
    return "; ".join(parts) or "nothing recorded differs"
