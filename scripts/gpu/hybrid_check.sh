#!/usr/bin/env bash
# The hybrid engine on one CUDA GPU, end to end, in one go:
#   1. a tiny-model GRPO run through the real workers (FSDP2 over NCCL, vLLM in bf16 with
#      sleep/wake around generation, an in-place weight sync every step);
#   2. bench/bench_hybrid.py on Qwen2.5-0.5B- and 1.5B-shaped models (random weights,
#      fixed lengths): weight-sync GB/s, generation and training tokens/s, peak memory.
# Usage: scripts/gpu/hybrid_check.sh OUT_DIR   (flowrl installed with the gpu extra)
# Writes OUT_DIR/grpo_tiny/ (metrics.jsonl, config), OUT_DIR/*.log and OUT_DIR/figures.json.
set -euo pipefail
out=${1:?usage: $0 OUT_DIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 VLLM_ENABLE_V1_MULTIPROCESSING=0
work=$(mktemp -d)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"

python3 - "$work" <<'PY'
import sys
from flowrl.models.tiny import make_tiny_model
from flowrl.tasks.arithmetic import write_splits
make_tiny_model(f"{sys.argv[1]}/model", seed=0)
write_splits(f"{sys.argv[1]}/data", n_train=256, n_test=64, level=1, seed=0)
PY
python3 -m flowrl.cli train recipes/grpo_arithmetic_tiny.yaml \
  actor.model.path="$work/model" data.train_files="[$work/data/train.parquet]" \
  data.val_files="[$work/data/test.parquet]" trainer.use_gpu=true trainer.num_workers=1 \
  rollout.dtype=bfloat16 rollout.gpu_memory_utilization=0.3 trainer.total_steps=5 \
  trainer.run_dir="$out/grpo_tiny" 2>&1 | tee "$out/grpo_tiny.log"

for shape in qwen2.5-0.5b qwen2.5-1.5b; do
  python3 bench/bench_hybrid.py --device cuda --dtype bfloat16 --shape "$shape" --batch 64 \
    --prompt-len 256 --response-len 512 --micro-batch 8 --gradient-checkpointing \
    --gpu-memory-utilization 0.4 --iters 2 2>&1 | tee "$out/bench_$shape.log"
done
python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
figures = {}
for shape in ("qwen2.5-0.5b", "qwen2.5-1.5b"):
    lines = [l for l in open(f"{out}/bench_{shape}.log") if l.startswith("{")]
    if lines:
        figures[shape] = json.loads(lines[-1])
json.dump(figures, open(f"{out}/figures.json", "w"), indent=1)
print(json.dumps(figures, indent=1))
PY
