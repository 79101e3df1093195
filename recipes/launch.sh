#!/usr/bin/env bash
# recipes/launch.sh RECIPE [ARGS...]: check the arguments, data and output folder of
# recipes/RECIPE.py (its --check), then run it under `accelerate launch`.
#   ACCELERATE_CONFIG=recipes/accelerate/<cpu|cpu_ddp|one_gpu|multi_gpu_ddp|fsdp>.yaml  (default:
#   one_gpu when a GPU is visible, cpu otherwise); PYTHON=... picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
recipe=${1:?usage: recipes/launch.sh RECIPE [ARGS...]}
shift
if [ ! -f "recipes/$recipe.py" ]; then
  echo "recipes/launch.sh: no recipe recipes/$recipe.py" >&2
  exit 2
fi
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
if [ -z "${ACCELERATE_CONFIG:-}" ]; then
  if "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    ACCELERATE_CONFIG=recipes/accelerate/one_gpu.yaml
  else
    ACCELERATE_CONFIG=recipes/accelerate/cpu.yaml
  fi
fi
case " $* " in
  *" -h "*|*" --help "*) exec "$PYTHON" -m "recipes.$recipe" "$@" ;;
esac
# accelerate keeps a multi-process launch on the CPU only with this variable (its config
# key use_cpu does not reach the processes)
if grep -Eq '^use_cpu:[[:space:]]*true' "$ACCELERATE_CONFIG"; then
  export ACCELERATE_USE_CPU=true
fi
# bad input is reported by one plain process, before the launcher starts any
"$PYTHON" -m "recipes.$recipe" --check "$@" >/dev/null || exit $?
exec "$PYTHON" -m accelerate.commands.launch --config_file "$ACCELERATE_CONFIG" -m "recipes.$recipe" "$@"
