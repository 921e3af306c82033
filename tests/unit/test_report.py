"""`selfreward report`: a self-contained HTML page with embedded PNG plots, for any algorithm's output dir."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

from train.cli import main
from train.report import write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
IMG = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _scpo_dir(out: Path) -> Path:
    rows = [
        {"iteration": 0, "eval/n": 16, "eval/accuracy": 0.56, "eval/sample_accuracy": 0.32,
         "eval/majority_accuracy": 0.5, "eval/consistency": 0.46, "eval/greedy_length": 27.3, "time/eval_s": 121.3},
    ]  # fmt: skip
    for k in (1, 2):
        rows.append(
            {
                "iteration": k,
                "eval/accuracy": 0.56 + 0.05 * k,
                "eval/sample_accuracy": 0.35,
                "eval/majority_accuracy": 0.56,
                "eval/consistency": 0.44 + 0.1 * k,
                "generate/samples": 128,
                "generate/mean_tokens": 30.7 - 3 * k,
                "vote/consistency": 0.52,
                "vote/vote_share_hist": {"0.375": 7, "0.5": 3 + k, "0.625": 3, "0.75": 3},
                "pairs/pairs": 9,
                "train/rewards/margins": 0.29 * k,
                "train/rewards/margins_first": 0.0,
                "train/rewards/chosen": 0.22,
                "train/rewards/rejected": -0.07,
                "train/loss": float("nan"),  # NaN and nulls are skipped, never plotted
                "judge/score_mean": None,
                "time/eval_s": 241.2,
                "time/generate_s": 45.0,
                "time/vote_s": 0.002,
                "time/pairs_s": 0.001,
                "time/train_s": 83.9,
            }
        )
    _jsonl(out / "metrics.jsonl", rows)
    (out / "recipe.json").write_text(json.dumps({"algorithm": "scpo", "model": "smollm2-135m-instruct"}))
    pair = {
        "prompt_id": "arith-1",
        "prompt": [{"role": "user", "content": "What is 3 + 4? <script>alert(1)</script>"}],
        "chosen": "7",
        "rejected": "8 & more",
        "chosen_votes": 5,
        "rejected_votes": 1,
        "weight": 0.5,
    }
    _jsonl(out / "iter_2" / "pairs.jsonl", [pair] * 3)
    return out


def _score_dir(out: Path) -> Path:
    rows = []
    for k in (0, 1, 2):
        row = {
            "iteration": k,
            "eval/accuracy": 0.4 + 0.05 * k,
            "eval/acc_t1": 0.40 + 0.05 * k,
            "eval/acc_t2": 0.38 + 0.08 * k,
            "eval/delta": -0.02 + 0.03 * k,
            "eval/delta_i2c": 0.05 + 0.02 * k,
            "eval/delta_c2i": 0.07 - 0.01 * k,
            "eval/len_t1": 20.0,
            "eval/len_t2": 22.0 - k,
            "time/eval_s": 30.0,
        }
        if k:
            row |= {"train/stage": k, "train/score/acc_t1": 0.4, "train/score/acc_t2": 0.45, "time/train_s": 200.0}
        rows.append(row)
    _jsonl(out / "metrics.jsonl", rows)
    return out


def _pngs(html: str) -> list[bytes]:
    return [base64.b64decode(b64) for b64 in IMG.findall(html)]


def _check_images(html: str, at_least: int) -> None:
    pngs = _pngs(html)
    assert len(pngs) >= at_least, f"{len(pngs)} images"
    for png in pngs:
        assert png.startswith(PNG_MAGIC) and len(png) > 1000


def test_scpo_report(tmp_path, capsys):
    out = _scpo_dir(tmp_path / "run")
    assert main(["report", str(out)]) == 0
    path = out / "report.html"
    assert capsys.readouterr().out.strip() == str(path)
    html = path.read_text()
    _check_images(html, 5)  # accuracy, length, vote shares, DPO rewards, timing; nothing for absent keys
    for title in ("Accuracy and consistency", "Response length", "Vote shares", "DPO rewards", "Phase timing"):
        assert f"<h3>{title}</h3>" in html
    assert "Judge score" not in html and "SCoRe" not in html  # their keys are absent or null
    assert "iter_2/pairs.jsonl" in html and "train/rewards/margins" in html
    assert "<script>" not in html and "&lt;script&gt;" in html and "8 &amp; more" in html


def test_score_report(tmp_path):
    html = write_report(_score_dir(tmp_path / "score")).read_text()
    _check_images(html, 4)
    assert "<h3>SCoRe accuracy</h3>" in html and "<h3>SCoRe delta</h3>" in html and "eval/delta_c2i" in html


def test_report_without_metrics_file_and_missing_keys(tmp_path):
    out = tmp_path / "partial"
    (out / "iter_1" / "phases").mkdir(parents=True)
    (out / "iter_1" / "phases" / "generate.json").write_text(
        json.dumps({"metrics": {"mean_length": 120.5, "odd": {"nested": [1]}}, "seconds": 12.0})
    )
    html = write_report(out).read_text()
    _check_images(html, 2)  # length and timing, rebuilt from the phase records
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "No plottable metrics" in write_report(empty).read_text()


def test_iteration_zero_is_labelled_sft_when_the_run_trained_a_seed(tmp_path):
    """Iteration 0's eval measures the model iteration 1 starts from: the SFT seed when `sft.enabled`."""
    from train.report import metrics_table

    rows = [{"iteration": 0, "sft/loss": 1.2, "time/sft_s": 3.0, "eval/agreement": 0.5},
            {"iteration": 1, "eval/agreement": 0.6}]  # fmt: skip
    head = metrics_table(rows).split("</tr>")[0]
    assert "<th>sft</th>" in head and "<th>iter 1</th>" in head and "base" not in head
    assert "<th>base</th>" in metrics_table([{"iteration": 0, "eval/agreement": 0.5}])


def test_report_missing_dir_is_a_usage_error(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "output dir not found" in capsys.readouterr().err
