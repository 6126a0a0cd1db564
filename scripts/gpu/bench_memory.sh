#!/usr/bin/env bash
# Memory handover and LoRA on one GPU: the GRPO benchmark step (bench/bench_grpo.py: random weights, fixed
# lengths, KL to a reference) with and without actor.offload at the Qwen2.5-1.5B shape, and LoRA GRPO at the
# Qwen2.5-1.5B and -7B shapes (rank 64 on every Linear layer, the frozen base in bf16, adapter-only sync), the 7B
# with and without offload; and a full-parameter GRPO step at the 7B shape (full_7b, not in the default list: its
# fp32 weights, gradients and AdamW state take ~122 GB on the device during the update, so it needs a GPU of more
# than 80 GB; the bf16 reference waits in host memory, reference.cpu_offload).
# Per run: tokens/s, seconds per stage, and device memory per stage (memory/<stage>_used_gib, _peak_gib,
# memory/offloaded_gib). Medians after 1 warm-up step.
# Usage: scripts/gpu/bench_memory.sh OUT_DIR [STEPS]   (flowrl with the gpu and lora extras)
#   RUNS picks runs by name (default: "full_1.5b offload_1.5b lora_1.5b lora_7b lora_7b_offload").
# Writes OUT_DIR/gpu.txt, OUT_DIR/<run>.log, OUT_DIR/<run>.json and OUT_DIR/memory.json (every run's figures).
set -uo pipefail
out=${1:?usage: $0 OUT_DIR [STEPS]}
steps=${2:-4}
runs=${RUNS:-full_1.5b offload_1.5b lora_1.5b lora_7b lora_7b_offload}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 VLLM_ENABLE_V1_MULTIPROCESSING=0
work=${WORKDIR:-$(mktemp -d)}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
quiet() { grep -v " INFO \| WARNING \|it/s\]\|Warning:\|warnings.warn"; }
lora="actor.lora.rank=64 actor.lora.alpha=128 actor.lora.target_modules=all-linear actor.optim.lr=1e-5"
for run in $runs; do
  case $run in
    full_1.5b) args=(--shape qwen2.5-1.5b) ;;
    offload_1.5b) args=(--shape qwen2.5-1.5b --gpu-memory-utilization 0.7 --set actor.offload=true) ;;
    full_7b) args=(--shape qwen2.5-7b --prompts 32 --micro-batch 8 --gpu-memory-utilization 0.4
                   --set actor.offload=true "reference.path=$work/qwen2.5-7b" reference.dtype=bfloat16 reference.cpu_offload=true) ;;
    lora_1.5b) args=(--shape qwen2.5-1.5b --set $lora) ;;
    lora_7b) args=(--shape qwen2.5-7b --prompts 32 --micro-batch 8 --gpu-memory-utilization 0.45 --set $lora) ;;
    lora_7b_offload) args=(--shape qwen2.5-7b --prompts 32 --micro-batch 8 --gpu-memory-utilization 0.45 --set actor.offload=true $lora) ;;
    *) echo "unknown run $run"; continue ;;
  esac
  python3 bench/bench_grpo.py --workdir "$work" --steps "$steps" --out "$out/$run.json" "${args[@]}" 2>&1 \
    | quiet > "$out/$run.log"
  echo "$run: exit ${PIPESTATUS[0]}"; tail -2 "$out/$run.log" | cut -c1-300
done
python3 - "$out" $runs <<'PY'
import json, os, sys
out, runs = sys.argv[1], sys.argv[2:]
table = {}
for run in runs:
    path = f"{out}/{run}.json"
    if not os.path.exists(path):
        table[run] = {"error": f"no result (see {run}.log)"}
        continue
    r = json.load(open(path))
    keys = ("params", "step_s", "tokens_per_s_per_gpu", "stage_s", "weight_sync_gb_per_s", "memory_gib")
    table[run] = {k: r[k] for k in keys if k in r}
json.dump(table, open(f"{out}/memory.json", "w"), indent=1)
print(json.dumps(table, indent=1))
PY
