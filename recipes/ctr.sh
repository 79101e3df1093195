#!/usr/bin/env bash
# recipes/ctr.py under `accelerate launch`; every argument goes to the recipe
# (recipes/ctr.sh --help lists them).
#   ACCELERATE_CONFIG=recipes/accelerate/<cpu|one_gpu|multi_gpu_ddp|fsdp>.yaml  (default:
#   one_gpu when a GPU is visible, cpu otherwise); PYTHON=... picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
if [ -z "${ACCELERATE_CONFIG:-}" ]; then
  if "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    ACCELERATE_CONFIG=recipes/accelerate/one_gpu.yaml
  else
    ACCELERATE_CONFIG=recipes/accelerate/cpu.yaml
  fi
fi
exec "$PYTHON" -m accelerate.commands.launch --config_file "$ACCELERATE_CONFIG" -m recipes.ctr "$@"
