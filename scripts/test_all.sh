#!/usr/bin/env bash
# The whole test suite (`make test`): the rule checks; the unit tests in ./.venv while the
# lower-bounds environment (scripts/test_lower_bounds.sh) installs and runs its unit tests
# alongside (each takes about one core of two); then the integration and end-to-end tests.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
"$PY" scripts/check_rules.py || exit 1
lb_log=$(mktemp)
bash scripts/test_lower_bounds.sh >"$lb_log" 2>&1 &
lb=$!
"$PY" -m pytest -q -ra tests/unit
unit=$?
wait "$lb"
lower=$?
echo "---- lower bounds (scripts/test_lower_bounds.sh) ----"
grep -v "^WARNING: Location" "$lb_log"
rm -f "$lb_log"
if [ "$unit" -ne 0 ] || [ "$lower" -ne 0 ]; then
  echo "unit tests failed (./.venv: exit $unit; lower bounds: exit $lower)" >&2
  exit 1
fi
"$PY" -m pytest -q -ra --durations=30 tests/integration tests/e2e
