#!/usr/bin/env bash
# One run of recipes/grid_small.sh: recipes/grid_run.sh OUT COMMAND...
# Runs COMMAND (stdout and stderr to OUT/log.txt) unless OUT/results.json exists (done) or
# another invocation is running it (it holds OUT/.lock; flock releases it when that
# process ends, a crash included). The log of an earlier, unfinished run is kept as
# log.txt.N.
set -uo pipefail
out=$1
shift
mkdir -p "$out"
exec 9>"$out/.lock"
if ! flock -n 9; then
  echo "skip $out (running in another invocation)" >&2
  exit 0
fi
if [ -f "$out/results.json" ]; then
  exit 0
fi
if [ -f "$out/log.txt" ]; then
  n=1
  while [ -e "$out/log.txt.$n" ]; do n=$((n + 1)); done
  mv "$out/log.txt" "$out/log.txt.$n"
fi
"$@" > "$out/log.txt" 2>&1
status=$?
[ $status -eq 0 ] || echo "failed ($status): $out (see $out/log.txt)" >&2
exit 0
