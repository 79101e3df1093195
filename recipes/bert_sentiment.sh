#!/usr/bin/env bash
# recipes/bert_sentiment.py under `accelerate launch` (see recipes/launch.sh; --help lists the options).
exec "$(dirname "$0")/launch.sh" bert_sentiment "$@"
