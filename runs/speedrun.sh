#!/usr/bin/env bash
# The whole nanochat pipeline, as the original's runs/speedrun.sh: a thin wrapper over
# `nanochat speedrun` (see README.md), which does the work, resumably. Arguments pass through:
#   bash runs/speedrun.sh --preset cpu-tiny --data-dir ../shared/data
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo run --release -p nanochat -- speedrun "$@"
