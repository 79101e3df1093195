#!/usr/bin/env bash
# recipes/lstm_lm.py under `accelerate launch` (see recipes/launch.sh; --help lists the options).
exec "$(dirname "$0")/launch.sh" lstm_lm "$@"
