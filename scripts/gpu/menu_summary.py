"""Summary and plot of a `scripts/gpu/smollm2_menu.sh` output folder: one entry per algorithm.

    python scripts/gpu/menu_summary.py OUT_DIR ALGO [ALGO ...]

Reads OUT_DIR/ALGO/run/metrics.jsonl; for a run whose metrics file is missing (a run cut off before
its folder was copied out) it reads the same figures from the console lines of OUT_DIR/ALGO/train.log:
each step's `reward/mean`, each held-out `val/accuracy` and the `val/accuracy_before`. Writes
OUT_DIR/summary.json and OUT_DIR/menu_curves.png and prints the summary.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import sys

STEP = re.compile(r"\|\s*(\d+)/(\d+) \[")
FIELD = re.compile(r"([\w/]+)=(-?[0-9.e+-]+)")


def rows_from_log(path: str) -> list[dict]:
    """The metrics a train.log's console lines show: one dict per line that names a step."""
    rows = []
    for line in open(path, errors="replace"):
        fields = {k: float(v) for k, v in FIELD.findall(line)}
        step = STEP.search(line)
        if step is not None:
            rows.append({"step": int(step.group(1)), **fields})
        elif "val/accuracy_before" in fields:  # the closing line: no progress bar
            rows.append({"step": -1, **fields})
    return rows


def read_run(out: str, algo: str) -> tuple[list[dict], str] | None:
    metrics, log = f"{out}/{algo}/run/metrics.jsonl", f"{out}/{algo}/train.log"
    if os.path.exists(metrics):
        return [json.loads(line) for line in open(metrics)], "metrics.jsonl"
    if os.path.exists(log):
        return rows_from_log(log), "train.log"
    return None


def summarize(rows: list[dict], source: str) -> tuple[dict, tuple]:
    train = sorted({r["step"]: r for r in rows if "reward/mean" in r and r["step"] > 0}.values(), key=lambda r: r["step"])
    evals = sorted({r["step"]: r["val/accuracy"] for r in rows if "val/accuracy" in r and r["step"] > 0}.items())
    before = next((r["val/accuracy_before"] for r in rows if "val/accuracy_before" in r), None)
    if before is None:  # the console shows the first evaluation as step 0's val/accuracy
        before = next((r["val/accuracy"] for r in rows if r["step"] == 0 and "val/accuracy" in r), None)
    mean = lambda rs, key: statistics.mean(r[key] for r in rs) if rs and all(key in r for r in rs) else None  # noqa: E731
    summary = {
        "source": source,
        "steps": len(train),
        "val_accuracy_before": before,
        "val_accuracy_by_step": evals,
        "reward_mean_first10": mean(train[:10], "reward/mean"),
        "reward_mean_last10": mean(train[-10:], "reward/mean"),
        "response_length_mean_last10": mean(train[-10:], "response_length/mean"),
    }
    return summary, (train, evals, before)


def main(out: str, algos: list[str]) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary, curves = {}, {}
    for algo in algos:
        got = read_run(out, algo)
        if got is None or not got[0]:
            summary[algo] = {"error": "no metrics (see train.log)"}
            continue
        summary[algo], curves[algo] = summarize(*got)
    json.dump(summary, open(f"{out}/summary.json", "w"), indent=1)
    print(json.dumps(summary, indent=1))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for algo, (train, evals, before) in curves.items():
        left.plot([r["step"] for r in train], [r["reward/mean"] for r in train], lw=0.8, label=algo)
        right.plot([0] + [s for s, _ in evals], [before] + [a for _, a in evals], "o-", label=algo)
    left.set_title("train reward (mean over the step's samples)", fontsize=10)
    right.set_title("held-out greedy accuracy (256 problems)", fontsize=10)
    for ax in (left, right):
        ax.set_xlabel("step")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        if curves:
            ax.legend(loc="lower right")
    fig.suptitle("SmolLM2-135M-Instruct on basic_arithmetic, one GPU, same data and seed", fontsize=10)
    fig.tight_layout()
    fig.savefig(f"{out}/menu_curves.png", dpi=120)
    return summary


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: python scripts/gpu/menu_summary.py OUT_DIR ALGO [ALGO ...]")
    main(sys.argv[1], sys.argv[2:])
