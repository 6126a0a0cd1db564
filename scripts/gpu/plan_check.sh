#!/usr/bin/env bash
# The planner's predicted vs measured step time on this GPU machine (docs/planner.md, "GPU").
# For each shape: a random-weight Qwen2.5 model (flowrl.models.shapes) and the arithmetic task's
# prompts; bench/plan_check.py runs the GRPO recipe as written and fits the runtime overheads from it,
# plans, then runs the chosen plan (trainer.plan=auto) and 5 other plans that fit, STEPS steps each,
# and prints predicted and measured seconds per step (median of steps 2..STEPS) with the error.
# Usage: scripts/gpu/plan_check.sh OUT_DIR [STEPS]   (flowrl installed with its gpu extra)
#   SHAPES picks the shapes (default: "qwen2.5-0.5b qwen2.5-1.5b"); OTHERS, the plans run besides the chosen (5).
# Writes OUT_DIR/gpu.txt and, per shape, OUT_DIR/<shape>/ (the runs) and OUT_DIR/<shape>.txt (the table).
set -uo pipefail
out=${1:?usage: $0 OUT_DIR [STEPS]}
steps=${2:-6}
shapes=${SHAPES:-qwen2.5-0.5b qwen2.5-1.5b}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 FLOWRL_PLANNER_CACHE=${FLOWRL_PLANNER_CACHE:-$out/planner_cache}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 - "$out" <<'PY'
import sys
from flowrl.tasks.arithmetic import write_splits
write_splits(f"{sys.argv[1]}/data", n_train=2048, n_test=64, level=2, seed=0)
PY
for shape in $shapes; do
  python3 -c "from flowrl.models.shapes import make_random_model; make_random_model('$out/models/$shape', '$shape', device='cuda')"
  python3 bench/plan_check.py recipes/grpo_arithmetic_tiny.yaml \
    "actor.model.path=$out/models/$shape" "data.train_files=[$out/data/train.parquet]" \
    trainer.use_gpu=true trainer.num_workers=1 actor.model.dtype=bfloat16 rollout.dtype=bfloat16 \
    rollout.gpu_memory_utilization=0.5 rollout.ignore_eos=true rollout.max_response_length=256 \
    data.train_batch_size=32 rollout.n=4 actor.mini_batch_size=64 actor.micro_batch_size=8 \
    --steps "$steps" --others "${OTHERS:-5}" --out-dir "$out/$shape" 2>&1 \
    | grep -v " INFO \| WARNING \|it/s\]\|Warning:\|warnings.warn" | tee "$out/$shape.txt"
  echo "$shape: exit ${PIPESTATUS[0]}"
done
