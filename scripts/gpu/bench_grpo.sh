#!/usr/bin/env bash
# GRPO-step throughput on one GPU, flowrl against TRL's GRPOTrainer (colocated vLLM) in the same run:
# Qwen2.5-0.5B and -1.5B shapes with random weights, 64 prompts x 8 samples, 256 prompt + 512
# response tokens (EOS ignored), bf16 compute with fp32 master weights, KL to a reference,
# gradient checkpointing, micro-batch 16, one optimizer step per rollout; medians after 1 warm-up step.
# Usage: scripts/gpu/bench_grpo.sh OUT_DIR [SHAPES] [STEPS]   (flowrl with the gpu extra; trl, datasets)
#   SHAPES defaults to "qwen2.5-0.5b qwen2.5-1.5b"; ENGINES="flowrl trl" picks the engines.
# Writes OUT_DIR/gpu.txt, OUT_DIR/bench_<engine>_<shape>.log/.json and OUT_DIR/bench.json (every shape
# benchmarked into OUT_DIR so far, both engines and their ratio).
set -uo pipefail
out=${1:?usage: $0 OUT_DIR [SHAPES] [STEPS]}
shapes=${2:-qwen2.5-0.5b qwen2.5-1.5b}
steps=${3:-4}
engines=${ENGINES:-flowrl trl}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 VLLM_ENABLE_V1_MULTIPROCESSING=0
work=${WORKDIR:-$(mktemp -d)}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "from bench.perf import matmul_peak_flops as p; print(f'{p() / 1e12:.1f}')" | tee "$out/peak_tflops.txt"
peak=$(cat "$out/peak_tflops.txt")
quiet() { grep -v " INFO \| WARNING \|it/s\]\|Warning:\|warnings.warn"; }
for shape in $shapes; do
  if [[ " $engines " == *" flowrl "* ]]; then
    python3 bench/bench_grpo.py --shape "$shape" --workdir "$work" --steps "$steps" --peak-tflops "$peak" \
      --out "$out/bench_flowrl_$shape.json" 2>&1 | quiet > "$out/bench_flowrl_$shape.log"
    echo "flowrl $shape: exit ${PIPESTATUS[0]}"; tail -3 "$out/bench_flowrl_$shape.log" | cut -c1-400
  fi
  if [[ " $engines " == *" trl "* ]]; then
    python3 -c "from flowrl.models.shapes import make_random_model as m; m('$work/$shape', '$shape', 'cuda')"
    python3 -c "import sys; sys.path.insert(0, 'bench'); from bench_grpo import write_prompts as w; from pathlib import Path; w(Path('$work/prompts_256.parquet'), 64 * $steps, 256, 0)"
    python3 bench/bench_trl_grpo.py --model "$work/$shape" --data "$work/prompts_256.parquet" --steps "$steps" \
      --out "$out/bench_trl_$shape.json" 2>&1 | quiet > "$out/bench_trl_$shape.log"
    echo "trl $shape: exit ${PIPESTATUS[0]}"; tail -3 "$out/bench_trl_$shape.log" | cut -c1-400
  fi
done
python3 - "$out" <<'PY'
import glob, json, os, sys
out = sys.argv[1]  # every bench_<engine>_<shape>.json in the folder, from this run or an earlier one
shapes = sorted({os.path.basename(p)[:-5].split("_", 2)[2] for p in glob.glob(f"{out}/bench_*_*.json")})
table = {}
for shape in shapes:
    row = {}
    for engine in ("flowrl", "trl"):
        path = f"{out}/bench_{engine}_{shape}.json"
        row[engine] = json.load(open(path)) if os.path.exists(path) else None
    if row["flowrl"] and row["trl"]:
        row["flowrl_over_trl"] = row["flowrl"]["tokens_per_s_per_gpu"] / row["trl"]["tokens_per_s_per_gpu"]
    table[shape] = row
    f, t = row["flowrl"], row["trl"]
    print(shape, "flowrl tok/s/GPU:", f and round(f["tokens_per_s_per_gpu"]), "MFU:", f and round(f["step_mfu"], 3),
          "| trl tok/s/GPU:", t and round(t["tokens_per_s_per_gpu"]), "| ratio:", row.get("flowrl_over_trl"))
json.dump(table, open(f"{out}/bench.json", "w"), indent=1)
PY
