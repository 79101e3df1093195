#!/usr/bin/env bash
# recipes/transfo_xl_lm.py under `accelerate launch` (see recipes/launch.sh; --help lists the options).
exec "$(dirname "$0")/launch.sh" transfo_xl_lm "$@"
