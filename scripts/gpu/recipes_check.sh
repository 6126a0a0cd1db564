#!/usr/bin/env bash
# Every tiny CPU recipe, moved to one CUDA GPU by overrides: PPO (policy + reference + critic
# colocated, KL in the reward), GRPO, ReMax, RLOO and REINFORCE++ for a few steps each with
# vLLM in bf16. A check that each role runs on CUDA, not a learning run.
# Usage: scripts/gpu/recipes_check.sh OUT_DIR [STEPS]   (flowrl installed with the gpu extra)
set -euo pipefail
out=${1:?usage: $0 OUT_DIR [STEPS]}
steps=${2:-3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 VLLM_ENABLE_V1_MULTIPROCESSING=0
work=$(mktemp -d)
python3 - "$work" <<'PY'
import sys
from flowrl.models.tiny import make_tiny_model
from flowrl.tasks.arithmetic import write_splits
make_tiny_model(f"{sys.argv[1]}/model", seed=0)
write_splits(f"{sys.argv[1]}/data", n_train=256, n_test=64, level=1, seed=0)
PY
for algo in ppo grpo remax rloo reinforce_pp; do
  python3 -m flowrl.cli train "recipes/${algo}_arithmetic_tiny.yaml" \
    actor.model.path="$work/model" critic.model.path="$work/model" \
    data.train_files="[$work/data/train.parquet]" data.val_files="[$work/data/test.parquet]" \
    trainer.use_gpu=true trainer.num_workers=1 rollout.dtype=bfloat16 rollout.gpu_memory_utilization=0.2 \
    trainer.total_steps="$steps" trainer.run_dir="$out/$algo" 2>&1 | grep -v " INFO \| WARNING " > "$out/$algo.log"
  echo "$algo: $(tail -1 "$out/$algo.log")"
done
python3 - "$out" <<'PY'
import json, sys
for algo in ("ppo", "grpo", "remax", "rloo", "reinforce_pp"):
    rows = [json.loads(l) for l in open(f"{sys.argv[1]}/{algo}/metrics.jsonl")]
    steps = [r for r in rows if "actor/grad_norm" in r]
    keys = ("actor/first_ppo_kl", "rollout/logprob_diff_mean", "rollout/logprob_diff_max", "critic/grad_norm",
            "kl_reward/kl", "perf/weight_sync_s", "timing/step")
    print(algo, len(steps), "steps;", {k: round(steps[-1][k], 6) for k in keys if k in steps[-1]})
PY
