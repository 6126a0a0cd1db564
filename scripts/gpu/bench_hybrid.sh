#!/usr/bin/env bash
# The hybrid engine's stage throughputs on one CUDA GPU at a larger rollout batch:
# Qwen2.5-0.5B and -1.5B shapes (random weights, 256 prompts x (256 + 512) tokens, EOS
# ignored), vLLM with CUDA graphs, and the 1.5B shape in eager mode for comparison.
# Usage: scripts/gpu/bench_hybrid.sh OUT_DIR   (flowrl installed with the gpu extra)
# Writes OUT_DIR/bench_*.log, OUT_DIR/gpu.txt and OUT_DIR/figures.json.
set -euo pipefail
out=${1:?usage: $0 OUT_DIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 VLLM_ENABLE_V1_MULTIPROCESSING=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
common=(--device cuda --dtype bfloat16 --batch 256 --prompt-len 256 --response-len 512
        --micro-batch 16 --gradient-checkpointing --gpu-memory-utilization 0.5 --iters 2)
run() {  # name, extra flags...
  local name=$1; shift
  python3 bench/bench_hybrid.py "${common[@]}" "$@" 2>&1 | grep -v " INFO \| WARNING " | tee "$out/bench_$name.log"
}
run 0.5b_graphs --shape qwen2.5-0.5b --cuda-graphs
run 1.5b_graphs --shape qwen2.5-1.5b --cuda-graphs
run 1.5b_eager --shape qwen2.5-1.5b
python3 - "$out" <<'PY'
import glob, json, os, sys
out = sys.argv[1]
figures = {}
for log in sorted(glob.glob(f"{out}/bench_*.log")):
    lines = [l for l in open(log) if l.startswith("{")]
    if lines:
        figures[os.path.basename(log)[6:-4]] = json.loads(lines[-1])
json.dump(figures, open(f"{out}/figures.json", "w"), indent=1)
print(json.dumps(figures, indent=1))
PY
