"""`selfreward report OUTPUT_DIR`: one self-contained HTML page (plots as base64 PNGs) for any algorithm's run.

Reads metrics.jsonl (or, when it is missing, iter_*/phases/*.json) and a few rows of the pair files. Each plot is
drawn only when its keys exist, so a partial or unfamiliar run directory yields a shorter page. A torn or non-UTF-8
metrics.jsonl or recipe.json (the page's own data) is a one-line error naming the file and line; a bad line of a
sample file or a phase record is skipped.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from datetime import datetime
from pathlib import Path
from typing import Any

from train.config import ConfigError

Row = dict[str, Any]

# Rates in [0, 1] on the held-out split (eval/) and on the training samples (vote/, judge/).
RATE_KEYS = (
    "eval/accuracy",
    "eval/sample_accuracy",
    "eval/majority_accuracy",
    "eval/consistency",
    "vote/consistency",
    "eval/judge_agreement",
    "eval/self_preference",
    "eval/judge_parse_rate",
    "judge/judge_parse_rate",
)
SCORE_KEYS = ("judge/score_mean", "eval/own_mean_score")
LENGTH_KEYS = (
    "generate/mean_tokens",
    "generate/mean_length",
    "eval/greedy_length",
    "actor_pairs/chosen_length",
    "actor_pairs/rejected_length",
    "eval/len_t1",
    "eval/len_t2",
)
MARGIN_KEYS = ("train/rewards/margins", "train/rewards/margins_first", "train/rewards/chosen", "train/rewards/rejected")
SAMPLE_FILES = ("pairs.jsonl", "actor_pairs.jsonl", "judge_pairs.jsonl", "eval_rollouts.jsonl")
SAMPLE_ROWS, CELL_CHARS = 5, 400


def _text(path: Path) -> str:
    """A file's text; not UTF-8 (or unreadable) is a ConfigError naming the file and line."""
    try:
        data = path.read_bytes()
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from None


def _json(text: str, path: Path, line: int = 1) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{line + e.lineno - 1}: invalid JSON ({e.msg}); torn or edited by hand?") from None
    except RecursionError:
        raise ConfigError(f"{path}:{line}: invalid JSON (nested too deeply)") from None


def load_rows(out: Path) -> list[Row]:
    """metrics.jsonl rows; without one, the same rows rebuilt from the per-phase records."""
    path = out / "metrics.jsonl"
    if path.is_file():
        lines = _text(path).split("\n")
        rows = [_json(line, path, n) for n, line in enumerate(lines, 1) if line.strip()]
        return [r for r in rows if isinstance(r, dict)]
    rows = []
    for it in sorted(out.glob("iter_*"), key=lambda p: int(p.name[5:]) if p.name[5:].isdigit() else -1):
        if not it.name[5:].isdigit() or not (it / "phases").is_dir():
            continue
        row: Row = {"iteration": int(it.name[5:])}
        for ph in sorted((it / "phases").glob("*.json")):
            try:
                rec = json.loads(ph.read_text(encoding="utf-8"))
            except (OSError, ValueError, RecursionError):  # ValueError: bad JSON or bytes that are not UTF-8
                continue
            if not isinstance(rec, dict):
                continue
            row |= {f"{ph.stem}/{k}": v for k, v in (rec.get("metrics") or {}).items()}
            if isinstance(rec.get("seconds"), (int, float)):
                row[f"time/{ph.stem}_s"] = rec["seconds"]
        rows.append(row)
    return rows


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _label(row: Row, i: int) -> str:
    """Iteration 0 is the model iteration 1 starts from: the SFT seed when the run trained one (its `sft` phase)."""
    k = row.get("iteration", i)
    if k == 0:
        return "sft" if any(key.startswith(("sft/", "time/sft_")) for key in row) else "base"
    return f"iter {k}"


def series(rows: list[Row], key: str) -> tuple[list[str], list[float]]:
    """(x labels, values) of the rows where `key` is a finite number."""
    pts = [(_label(r, i), _num(r.get(key))) for i, r in enumerate(rows)]
    return [x for x, v in pts if v is not None], [v for _, v in pts if v is not None]


def _first_key(rows: list[Row], *keys: str) -> str | None:
    return next((k for k in keys if series(rows, k)[1]), None)


def _png(fig: Any) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)  # Agg, with no pyplot state: safe inside any process
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _figure(title: str, ylabel: str) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.6))
    ax = fig.subplots()
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def line_plot(rows: list[Row], keys: tuple[str, ...], title: str, ylabel: str, ylim: tuple | None = None) -> str | None:
    present = [k for k in keys if series(rows, k)[1]]
    if not present:
        return None
    fig, ax = _figure(title, ylabel)
    order = [_label(r, i) for i, r in enumerate(rows)]
    for key in present:
        xs, ys = series(rows, key)
        std = series(rows, key.replace("_mean", "_std"))[1] if key.endswith("_mean") else []
        pos = [order.index(x) for x in xs]
        if len(std) == len(ys):
            ax.errorbar(pos, ys, yerr=std, marker="o", capsize=3, label=key)
        else:
            ax.plot(pos, ys, marker="o", label=key)
    ax.set_xticks(range(len(order)), order)
    if ylim:
        ax.set_ylim(*ylim)
    ax.legend(fontsize=7)
    return _png(fig)


def bar_plot(rows: list[Row], keys: tuple[str, ...], title: str, ylabel: str) -> str | None:
    """Grouped bars: one group per row, one bar per key present."""
    present = [k for k in keys if series(rows, k)[1]]
    if not present:
        return None
    fig, ax = _figure(title, ylabel)
    order = [_label(r, i) for i, r in enumerate(rows) if any(_num(r.get(k)) is not None for k in present)]
    width = 0.8 / len(present)
    for j, key in enumerate(present):
        xs, ys = series(rows, key)
        ax.bar([order.index(x) + (j - (len(present) - 1) / 2) * width for x in xs], ys, width, label=key)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(order)), order)
    ax.legend(fontsize=7)
    return _png(fig)


def hist_plot(rows: list[Row], key: str, title: str, xlabel: str) -> str | None:
    """Grouped bars of a {bucket: count} dict per iteration (vote shares, judge scores)."""
    hists = [(_label(r, i), r[key]) for i, r in enumerate(rows) if isinstance(r.get(key), dict) and r[key]]
    buckets = sorted({b for _, h in hists for b in h}, key=lambda b: _num(_safe_float(b)) or 0.0)
    if not hists or not buckets:
        return None
    fig, ax = _figure(title, "prompts" if "vote" in key else "judgements")
    ax.set_xlabel(xlabel)
    width = 0.8 / len(hists)
    for j, (name, h) in enumerate(hists):
        counts = [_num(h.get(b)) or 0.0 for b in buckets]
        ax.bar([i + (j - (len(hists) - 1) / 2) * width for i in range(len(buckets))], counts, width, label=name)
    ax.set_xticks(range(len(buckets)), buckets)
    ax.legend(fontsize=7)
    return _png(fig)


def _safe_float(s: str) -> float | None:
    try:
        return float(s)
    except (TypeError, ValueError):
        return None


def timing_plot(rows: list[Row]) -> str | None:
    phases = sorted({k for r in rows for k in r if k.startswith("time/") and k.endswith("_s")})
    if not any(series(rows, p)[1] for p in phases):
        return None
    fig, ax = _figure("Phase wall time per iteration", "seconds")
    order = [_label(r, i) for i, r in enumerate(rows)]
    bottom = [0.0] * len(rows)
    for p in phases:
        vals = [_num(r.get(p)) or 0.0 for r in rows]
        ax.bar(range(len(rows)), vals, 0.6, bottom=bottom, label=p[5:-2])
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_xticks(range(len(order)), order)
    ax.legend(fontsize=7)
    return _png(fig)


def make_plots(rows: list[Row]) -> list[tuple[str, str]]:
    """(title, data URI) for every plot whose data exists."""
    pre = "eval/" if _first_key(rows, "eval/acc_t1") else "train/score/"  # SCoRe: held-out, else training rollouts
    plots = [
        (
            "Accuracy and consistency",
            line_plot(rows, RATE_KEYS, "Accuracy / consistency per iteration", "rate", (0, 1.02)),
        ),
        ("Judge score", line_plot(rows, SCORE_KEYS, "Judge score per iteration (mean ± std)", "score")),
        ("Response length", line_plot(rows, LENGTH_KEYS, "Mean response length per iteration", "tokens / chars")),
        ("Vote shares", hist_plot(rows, "vote/vote_share_hist", "Majority vote share per prompt", "vote share")),
        ("Judge scores", hist_plot(rows, "judge/score_hist", "Judge score histogram", "score")),
        ("DPO rewards", bar_plot(rows, MARGIN_KEYS, "DPO implicit rewards (last logged step)", "reward")),
        ("SCoRe accuracy", bar_plot(rows, (pre + "acc_t1", pre + "acc_t2"), f"SCoRe {pre}acc per attempt", "acc")),
        ("SCoRe delta", bar_plot(rows, tuple(pre + k for k in ("delta", "delta_i2c", "delta_c2i")), "SCoRe Δ", "rate")),
        ("Phase timing", timing_plot(rows)),
    ]
    return [(t, uri) for t, uri in plots if uri]


def _cell(v: Any) -> str:
    if isinstance(v, float):
        text = f"{v:.4g}"
    elif isinstance(v, str):
        text = v
    else:
        text = json.dumps(v, ensure_ascii=False)
    return html.escape(text if len(text) <= CELL_CHARS else text[:CELL_CHARS] + " …")


def metrics_table(rows: list[Row]) -> str:
    """Keys down, iterations across (rows have many keys and few iterations)."""
    keys = sorted({k for r in rows for k in r} - {"iteration"})
    head = "".join(f"<th>{html.escape(_label(r, i))}</th>" for i, r in enumerate(rows))
    body = "".join(
        f"<tr><td>{html.escape(k)}</td>" + "".join(f"<td>{_cell(r[k]) if k in r else ''}</td>" for r in rows) + "</tr>"
        for k in keys
    )
    return f"<table><tr><th>metric</th>{head}</tr>{body}</table>"


def _prompt_text(v: Any) -> Any:
    if isinstance(v, list) and v and all(isinstance(m, dict) for m in v):
        return next((m.get("content", "") for m in reversed(v) if m.get("role") == "user"), v)
    return v


def sample_tables(out: Path) -> list[tuple[str, str]]:
    """A few rows of each pair/rollout file, from the latest iteration that has it."""
    iters = sorted((p for p in out.glob("iter_*") if p.name[5:].isdigit()), key=lambda p: int(p.name[5:]))
    tables = []
    for name in SAMPLE_FILES:
        path = next((it / name for it in reversed(iters) if (it / name).is_file()), None)
        if path is None:
            continue
        rows = []
        with open(path, "rb") as f:
            for line in f:
                if len(rows) >= SAMPLE_ROWS:
                    break
                try:
                    row = json.loads(line.decode("utf-8"))
                except (ValueError, RecursionError):  # a torn line or bytes that are not UTF-8: skipped
                    continue
                if isinstance(row, dict):
                    rows.append({k: _prompt_text(v) if k == "prompt" else v for k, v in row.items()})
        if not rows:
            continue
        keys = list(dict.fromkeys(k for r in rows for k in r))
        head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
        body = "".join("<tr>" + "".join(f"<td>{_cell(r.get(k, ''))}</td>" for k in keys) + "</tr>" for r in rows)
        rel = path.relative_to(out).as_posix()
        tables.append((rel, f"<table><tr>{head}</tr>{body}</table>"))
    return tables


CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}
img{max-width:100%;border:1px solid #ddd;margin:.5em 0}
table{border-collapse:collapse;font-size:12px;margin-bottom:1.5em}
td,th{border:1px solid #ccc;padding:2px 6px;text-align:left;vertical-align:top;max-width:480px;word-break:break-word}
th{background:#f3f3f3}.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(520px,1fr));gap:1em}"""


def render(out: Path) -> str:
    rows = load_rows(out)
    recipe: Row = {}
    if (out / "recipe.json").is_file():
        recipe = _json(_text(out / "recipe.json"), out / "recipe.json")
    title = f"selfreward report: {out.name}"
    algo = recipe.get("algorithm", "?") if isinstance(recipe, dict) else "?"
    model = recipe.get("model", "?") if isinstance(recipe, dict) else "?"
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>",
        f"<p>algorithm <b>{html.escape(str(algo))}</b>, model <b>{html.escape(str(model))}</b>, "
        f"{len(rows)} metrics rows; generated {datetime.now():%Y-%m-%d %H:%M}</p>",
    ]
    plots = make_plots(rows)
    if plots:
        parts.append("<h2>Plots</h2><div class='grid'>")
        parts += [f'<div><h3>{html.escape(t)}</h3><img src="{uri}" alt="{html.escape(t)}"></div>' for t, uri in plots]
        parts.append("</div>")
    else:
        parts.append("<p>No plottable metrics yet.</p>")
    if rows:
        parts.append("<h2>Metrics (metrics.jsonl)</h2>" + metrics_table(rows))
    for rel, table in sample_tables(out):
        parts.append(f"<h2>Samples: {html.escape(rel)} (first {SAMPLE_ROWS})</h2>{table}")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(output_dir: str | Path) -> Path:
    """Render OUTPUT_DIR/report.html; returns its path."""
    out = Path(output_dir)
    if not out.is_dir():
        raise ConfigError(f"output dir not found: {out}")
    path = out / "report.html"
    tmp = path.with_name(path.name + ".tmp")
    page = render(out)
    try:
        tmp.write_text(page, encoding="utf-8")
        tmp.replace(path)
    except OSError as e:
        raise ConfigError(f"{path}: cannot write the report ({e.strerror or e})") from None
    return path
