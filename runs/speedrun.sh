#!/usr/bin/env bash
# The nanochat pipeline on a tiny CPU preset, stage by stage, with the stages built so far.
# Usage: bash runs/speedrun.sh [--data-dir DIR]   (DIR: a local mirror laid out like ../shared/data)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA_DIR="${NANOCHAT_DATA_MIRROR:-}"
while [ $# -gt 0 ]; do
  case "$1" in
    --data-dir) DATA_DIR="$2"; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
cargo build --release -p nanochat
NC=target/release/nanochat

# Data: copy the shards from the mirror when offline, else download a few from the hub.
if [ -n "$DATA_DIR" ]; then
  $NC data download --from "$DATA_DIR/pretrain/gutenberg"
else
  $NC data download -n 4
fi
# Tokenizer: a small vocabulary for the tiny preset.
$NC tok train --vocab-size 4096 --max-chars 20000000
$NC tok eval
