#!/usr/bin/env bash
# GRPO-step throughput on one GPU: flowrl, TRL's GRPOTrainer (colocated vLLM) and verl's PPO trainer
# (GRPO, hybrid engine) in the same run. Qwen2.5-0.5B and -1.5B shapes with random weights, 64 prompts
# x 8 samples, 256 prompt tokens, responses of at most 512 tokens, bf16 compute with fp32 master
# weights, KL to a reference, gradient checkpointing, micro-batch 16 (a 16 x 768-token budget for verl),
# one optimizer step per rollout; medians after 1 warm-up step. Two workloads: "fixed" (EOS ignored,
# every response 512 tokens) and "real" (the weights end responses after 240 tokens on average,
# flowrl.models.shapes.add_stop: a mean of ~210 after the 512 cut, spread geometrically).
# Usage: scripts/gpu/bench_grpo.sh OUT_DIR [SHAPES] [STEPS]   (flowrl with the gpu extra; trl, datasets; verl)
#   SHAPES defaults to "qwen2.5-0.5b qwen2.5-1.5b"; ENGINES="flowrl trl verl" picks the engines and
#   LENGTHS="fixed real" the workloads.
# Writes OUT_DIR/gpu.txt, OUT_DIR/bench_<engine>_<shape>[-real].log/.json and OUT_DIR/bench.json (every
# shape and workload benchmarked into OUT_DIR so far, all engines and flowrl's ratio to each peer).
set -uo pipefail
out=${1:?usage: $0 OUT_DIR [SHAPES] [STEPS]}
shapes=${2:-qwen2.5-0.5b qwen2.5-1.5b}
steps=${3:-4}
engines=${ENGINES:-flowrl trl verl}
workloads=${LENGTHS:-fixed real}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 VLLM_ENABLE_V1_MULTIPROCESSING=0
work=${WORKDIR:-$(mktemp -d)}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "from bench.perf import matmul_peak_flops as p; print(f'{p() / 1e12:.1f}')" | tee "$out/peak_tflops.txt"
peak=$(cat "$out/peak_tflops.txt")
quiet() { grep -v " INFO \| WARNING \|it/s\]\|Warning:\|warnings.warn"; }
python3 -c "import sys; sys.path.insert(0, 'bench'); from bench_grpo import write_prompts as w; from pathlib import Path; w(Path('$work/prompts_256.parquet'), 64 * $steps, 256, 0)"
for shape in $shapes; do
  for lengths in $workloads; do
    tag=$shape; [ "$lengths" = real ] && tag=$shape-real
    python3 -c "import sys; sys.path.insert(0, 'bench'); from pathlib import Path; from bench_grpo import build_model as b; b(Path('$work'), '$shape', 'cuda', lengths='$lengths')"
    for engine in $engines; do
      case $engine in
        flowrl) cmd=(bench/bench_grpo.py --shape "$shape" --workdir "$work" --peak-tflops "$peak") ;;
        trl) cmd=(bench/bench_trl_grpo.py --model "$work/$tag" --data "$work/prompts_256.parquet") ;;
        verl) cmd=(bench/bench_verl_grpo.py --model "$work/$tag" --data "$work/prompts_256.parquet" --peak-tflops "$peak"
                   --workdir "$work/verl-$tag") ;;
        *) echo "unknown engine $engine"; continue ;;
      esac
      python3 "${cmd[@]}" --lengths "$lengths" --steps "$steps" --out "$out/bench_${engine}_$tag.json" 2>&1 \
        | quiet > "$out/bench_${engine}_$tag.log"
      echo "$engine $tag: exit ${PIPESTATUS[0]}"; tail -3 "$out/bench_${engine}_$tag.log" | cut -c1-400
    done
  done
done
python3 - "$out" <<'PY'
import glob, json, os, sys
out = sys.argv[1]  # every bench_<engine>_<tag>.json in the folder, from this run or an earlier one
tags = sorted({os.path.basename(p)[:-5].split("_", 2)[2] for p in glob.glob(f"{out}/bench_*_*.json")})
table = {}
for tag in tags:
    row = {}
    for engine in ("flowrl", "trl", "verl"):
        path = f"{out}/bench_{engine}_{tag}.json"
        row[engine] = json.load(open(path)) if os.path.exists(path) else None
    f = row["flowrl"]
    for peer in ("trl", "verl"):
        if f and row[peer]:
            row[f"flowrl_over_{peer}"] = f["tokens_per_s_per_gpu"] / row[peer]["tokens_per_s_per_gpu"]
    table[tag] = row
    cells = [f"{e} {round(row[e]['tokens_per_s_per_gpu'])} tok/s/GPU" for e in ("flowrl", "trl", "verl") if row[e]]
    ratios = [f"flowrl/{p} {row[f'flowrl_over_{p}']:.2f}" for p in ("trl", "verl") if f"flowrl_over_{p}" in row]
    print(tag, "|", ", ".join(cells), "|", ", ".join(ratios))
json.dump(table, open(f"{out}/bench.json", "w"), indent=1)
PY
