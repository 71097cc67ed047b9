#!/usr/bin/env bash
# One entry point for the two README commands:
#   ./dev.sh tour [ARGS...]   set up .venv (if needed) and run the guided tour, `lora-edu tour`
#   ./dev.sh test             set up .venv (if needed) and run every test: library, notebooks, exercises
# Environment:
#   VENV=path        virtual environment to use/create (default: .venv)
#   TORCH_SPEC=spec  torch requirement installed when the venv has no torch (default: torch==2.13.0).
#                    GPU users: install the CUDA build of torch you want into the venv first; it is kept.
#   EXTRAS=list      pip extras to install (default: test,notebooks,interop for `test`, none for `tour`)
set -euo pipefail
cd "$(dirname "$0")"
cmd="${1:-}"; shift || true
VENV="${VENV:-.venv}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
PY="$VENV/bin/python"

setup() {
  local extras="$1"
  if [ ! -x "$PY" ]; then
    python3 -m venv "$VENV"
    "$PY" -m pip install -q --upgrade pip
  fi
  if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install -q "$TORCH_SPEC"
  fi
  if [ -n "$extras" ]; then
    "$PY" -m pip install -q -e ".[$extras]"
  else
    "$PY" -m pip install -q -e .
  fi
}

# pytest exit code 5 means "no tests collected": for us that is a broken setup, never a pass.
run_pytest() {
  local label="$1"; shift
  set +e
  "$PY" -m pytest "$@"
  local rc=$?
  set -e
  if [ $rc -eq 5 ]; then echo "ERROR: $label collected no tests" >&2; return 1; fi
  return $rc
}

case "$cmd" in
  tour)
    setup "${EXTRAS:-}"
    exec "$VENV/bin/lora-edu" tour "$@"
    ;;
  test)
    setup "${EXTRAS:-test,notebooks,interop,classroom}"
    export MPLBACKEND="${MPLBACKEND:-}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
    echo "== lint (ruff) and the package's import layers (import-linter)"
    "$VENV/bin/ruff" check .
    "$VENV/bin/lint-imports"
    echo "== library tests"
    run_pytest "library tests" tests -q -n 2 --dist loadfile -p no:cacheprovider
    echo "== notebooks (nbval, outputs compared with the committed ones)"
    run_pytest "notebooks" --nbval --nbval-current-env --nbval-sanitize-with nbval_sanitize.cfg \
      --nbval-cell-timeout=300 -p no:python -p no:cacheprovider -n 2 --dist loadscope -q notebooks/
    echo "== exercise solutions (nbval-lax: the asserts and the checker carry the weight)"
    run_pytest "exercises" --nbval-lax --nbval-current-env --nbval-cell-timeout=300 -p no:python \
      -p no:cacheprovider -q course/exercises/
    ;;
  *)
    echo "usage: ./dev.sh tour [ARGS...] | ./dev.sh test" >&2
    exit 2
    ;;
esac
