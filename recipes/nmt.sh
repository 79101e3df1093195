#!/usr/bin/env bash
# recipes/nmt.py under `accelerate launch` (see recipes/launch.sh; --help lists the options).
exec "$(dirname "$0")/launch.sh" nmt "$@"
