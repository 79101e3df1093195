#!/usr/bin/env bash
# The project's one entry point:
#   ./dev.sh demo      the main job: a small PTB language model, dense vs TT vs DPQ
#   ./dev.sh test      the test suite (what CI runs)
#   ./dev.sh bench     the lookup benchmark
#   ./dev.sh setup     only the set-up
# Every command first makes sure `.venv` exists in the checkout with all extras installed
# (fairseq included); it is (re)built when setup.cfg or the install scripts change.
set -euo pipefail
cd "$(dirname "$0")"
VENV=.venv
PY=$VENV/bin/python

setup() {
  local stamp
  stamp=$(cat setup.cfg dev.sh scripts/install_fairseq.sh 2>/dev/null | sha256sum | cut -c1-16)
  if [ -x "$PY" ] && [ "$(cat $VENV/.compemb-stamp 2>/dev/null)" = "$stamp" ]; then
    return
  fi
  echo "setting up $VENV (first use, or the install files changed) ..."
  [ -x "$PY" ] || python3 -m venv "$VENV"
  # torch first, pinned to the release whose CPU wheel is on these machines: a looser
  # request would let pip fetch a multi-GB CUDA build.
  "$PY" -m pip install -q torch==2.13.0
  "$PY" -m pip install -q -e ".[all]"
  if [ -f scripts/install_fairseq.sh ]; then bash scripts/install_fairseq.sh "$PY"; fi
  echo "$stamp" > $VENV/.compemb-stamp
}

# OpenMP workers that spin while waiting starve the main thread on a small shared machine
# (measured by bench.lookup: a TT step 460 ms spinning, 28 ms passive); override if wanted.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}

cmd=${1:-help}
[ $# -gt 0 ] && shift
case "$cmd" in
  setup) setup ;;
  demo) setup; exec "$PY" -m recipes.demo_ptb "$@" ;;
  test) setup; exec "$PY" -m pytest -q "$@" ;;
  bench) setup; exec "$PY" -m bench.lookup "$@" ;;
  *) sed -n '2,9p' "$0"; exit 2 ;;
esac
