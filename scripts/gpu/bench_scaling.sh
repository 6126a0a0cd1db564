#!/usr/bin/env bash
# Scaling of the hybrid engine on the GPUs of one host (2, 4 or 8): FSDP2 over N GPUs, vLLM
# with tensor_parallel_size T, fixed per-GPU batch. Qwen2.5-1.5B shape at N = 1, 2, 4, 8
# (T = 1), Qwen2.5-7B shape at N = 2, 4, 8 with T = 2 (and T = 4 on four GPUs); then the
# multi-GPU correctness checks: vLLM (T > 1) vs FSDP (N ranks) log-probs in bf16, and the
# loss / gradient norm of one fixed global batch for every N (loss invariance).
# Usage: scripts/gpu/bench_scaling.sh OUT_DIR [PART]   (flowrl on PYTHONPATH, vLLM importable)
# PART: 1.5b | 7b | check | all (default). Runs that need more GPUs than are visible
# (CUDA_VISIBLE_DEVICES counts) are left out, and a run whose <name>.json is already in
# OUT_DIR is kept, not run again: parts, and GPU subsets, can run in turn into one folder;
# summary.json is rebuilt from every <name>.json there. vLLM runs with CUDA graphs; a run
# that fails with them is retried once in eager mode (the JSON then says cuda_graphs: false).
# Writes OUT_DIR/<name>.json and .log per run, OUT_DIR/gpu.txt and OUT_DIR/summary.json.
set -euo pipefail
out=${1:?usage: $0 OUT_DIR [1.5b|7b|check|all]}
part=${2:-all}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_USE_FLASHINFER_SAMPLER=0 NCCL_NVLS_ENABLE=0
gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
common=(--device cuda --dtype bfloat16 --prompt-len 256 --response-len 512 --n 4
        --micro-batch 8 --gradient-checkpointing --gpu-memory-utilization 0.45 --iters 2
        --workdir /tmp/flowrl-bench)
bench() {  # name, flags...
  local name=$1; shift
  python3 bench/bench_scaling.py "${common[@]}" "$@" --out "$out/$name.json" 2>&1 \
    | grep -v " INFO \| WARNING \|it/s\]" >> "$out/$name.log"
}
run() {  # name, flags...
  local name=$1; shift
  if [ -s "$out/$name.json" ]; then echo "== $name: kept from an earlier run"; return; fi
  echo "== $name: $*  ($(date +%T))"
  bench "$name" --cuda-graphs "$@" || { echo "retrying $name in eager mode"; bench "$name" "$@"; } \
    || echo "FAILED: $name (see $name.log)"
  cat "$out/$name.json" 2>/dev/null; echo
}
fits() { [ "$1" -le "$gpus" ]; }
if [ "$part" = 1.5b ] || [ "$part" = all ]; then
  for n in 1 2 4 8; do
    if fits "$n"; then run "1.5b_n${n}_t1" --shape qwen2.5-1.5b --batch 16 --nproc "$n" --tp 1; fi
  done
  if fits 2; then run "1.5b_n2_t2" --shape qwen2.5-1.5b --batch 16 --nproc 2 --tp 2; fi
fi
if [ "$part" = 7b ] || [ "$part" = all ]; then
  for n in 2 4 8; do
    if fits "$n"; then run "7b_n${n}_t2" --shape qwen2.5-7b --batch 8 --nproc "$n" --tp 2; fi
  done
  if fits 4; then run "7b_n4_t4" --shape qwen2.5-7b --batch 8 --nproc 4 --tp 4; fi
fi
if [ "$part" = check ] || [ "$part" = all ]; then
  run "check_1.5b_n1_t1" --shape qwen2.5-1.5b --batch 16 --nproc 1 --tp 1 --check
  if fits 2; then run "check_1.5b_n2_t2" --shape qwen2.5-1.5b --batch 16 --nproc 2 --tp 2 --check; fi
  if fits 4; then run "check_1.5b_n4_t2" --shape qwen2.5-1.5b --batch 16 --nproc 4 --tp 2 --check; fi
  if fits 8; then run "check_1.5b_n8_t2" --shape qwen2.5-1.5b --batch 16 --nproc 8 --tp 2 --check; fi
fi
python3 - "$out" <<'PY'
import glob, json, os, sys
out = sys.argv[1]
runs = {os.path.basename(p)[:-5]: json.load(open(p)) for p in sorted(glob.glob(f"{out}/*.json"))
        if not p.endswith(("summary.json",))}
base = runs.get("1.5b_n1_t1", {}).get("tokens_per_s_per_gpu")
for name, r in runs.items():
    if base and name.startswith("1.5b_") and "tokens_per_s_per_gpu" in r:
        r["scaling_efficiency"] = round(r["tokens_per_s_per_gpu"] / base, 3)
b7 = runs.get("7b_n2_t2", {}).get("tokens_per_s_per_gpu")
for name in ("7b_n4_t2", "7b_n8_t2"):
    if b7 and name in runs:
        runs[name]["scaling_efficiency_vs_n2"] = round(runs[name]["tokens_per_s_per_gpu"] / b7, 3)
norms = {k: v["fixed_batch_grad_norm"] for k, v in runs.items() if k.startswith("check_")}
if norms:
    ref = next(iter(norms.values()))
    runs["loss_invariance"] = {"grad_norm": norms, "max_rel_diff": max(abs(v - ref) / ref for v in norms.values())}
json.dump(runs, open(f"{out}/summary.json", "w"), indent=1)
print(json.dumps(runs, indent=1))
PY
