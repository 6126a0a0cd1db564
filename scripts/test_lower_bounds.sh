#!/usr/bin/env bash
# The unit and config tests on the lowest versions pyproject.toml declares for the core
# dependencies (omegaconf, tensordict, transformers, numpy, pyarrow), so a declared range is a
# tested range. vLLM is not installed here: the unit tests do not start it.
#   FLOWRL_LB_VENV=path   where the virtual environment goes (default .venv-lower-bounds)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${FLOWRL_LB_VENV:-.venv-lower-bounds}
pins=$("$PY" - <<'PY'
import re, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
core = ("omegaconf", "tensordict", "transformers", "numpy", "pyarrow")
for dep in deps:
    m = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*>=\s*([0-9][^,;\s]*)", dep.split(";")[0].strip())
    if m and m.group(1).lower() in core:
        print(f"{m.group(1)}=={m.group(2)}")
PY
)
[ "$(echo "$pins" | wc -l)" -eq 5 ] || { echo "[lower-bounds] expected 5 core lower bounds in pyproject.toml, got: $pins" >&2; exit 1; }
stamp="$VENV/.flowrl-lower-bounds"
want=$(echo "$pins" | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[lower-bounds] installing $(echo $pins)" >&2
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  pip=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
  "${pip[@]}" install torch==2.13.0
  "${pip[@]}" install $pins -e ".[test]"
  "${pip[@]}" install $pins  # the pins again, in case the extras pulled something newer
  echo "$want" > "$stamp"
fi
"$VENV/bin/python" -c "import omegaconf, tensordict, transformers, numpy, pyarrow as pa; print('[lower-bounds] omegaconf', omegaconf.__version__, '| tensordict', tensordict.__version__, '| transformers', transformers.__version__, '| numpy', numpy.__version__, '| pyarrow', pa.__version__)"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/unit
