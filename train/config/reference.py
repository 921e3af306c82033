"""Render every recipe key with its type, default and help text, straight from the schema."""

from __future__ import annotations

import re
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel

from train.config import Recipe

HEADER = """# Recipe key reference

Generated from `train/config/schema.py` by `selfreward docs --out docs/recipe-reference.md`; a test fails
when this file and the schema disagree. Every recipe uses this one schema. Unknown keys are errors.
Override any key on the command line: `selfreward run RECIPE.yaml sampling.temperature=0.8`.
"""


def _type_name(annotation: Any) -> str:
    if get_origin(annotation) is Literal:
        text = " / ".join(repr(a) if isinstance(a, str) else str(a).lower() for a in get_args(annotation))
    elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
        text = "section"
    else:
        text = getattr(annotation, "__name__", None) if get_origin(annotation) is None else None
        text = text or re.sub(r"\btrain\.config\.\w+\.", "", str(annotation).replace("typing.", ""))
    return text.replace("|", "or")


def _section(model: type[BaseModel], prefix: str, lines: list[str], nested: list[tuple[str, type[BaseModel]]]) -> None:
    lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        sub = _submodel(field.annotation)
        default = "(required)" if field.is_required() else repr(field.get_default(call_default_factory=True))
        if sub:
            default = "(section)"
        lines.append(f"| `{prefix}{name}` | {_type_name(field.annotation)} | `{default}` | {field.description or ''} |")
        if sub:
            nested.append((f"{prefix}{name}", sub))


def _submodel(annotation: Any) -> type[BaseModel] | None:
    for cand in (annotation, *getattr(annotation, "__args__", ())):
        if isinstance(cand, type) and issubclass(cand, BaseModel):
            return cand
    return None


def render_reference() -> str:
    lines = [HEADER, "## Top level", ""]
    nested: list[tuple[str, type[BaseModel]]] = []
    _section(Recipe, "", lines, nested)
    for prefix, model in nested:
        lines += ["", f"## `{prefix}`", ""]
        _section(model, prefix + ".", lines, [])
    lines += [
        "",
        "## `trainer`",
        "",
        "Free-form mapping passed to `trl.DPOConfig` (ScPO, Meta-/Self-Rewarding) or `trl.GRPOConfig` (SCoRe).",
        "Keys are checked against the TRL dataclass before anything loads; see TRL's docs for each field.",
        "",
    ]
    return "\n".join(lines)
