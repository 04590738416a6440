#!/usr/bin/env bash
# The whole nanochat pipeline on a tiny CPU preset (depth 2, a few minutes on 2 cores):
# data → tokenizer → base train → base eval → mid → SFT → chat eval → report.
# Usage: bash runs/speedrun.sh --data-dir DIR   (DIR: a local mirror laid out like ../shared/data)
# Until `nanochat speedrun` lands, the chat-stage task data is read from the mirror only.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA_DIR="${NANOCHAT_DATA_MIRROR:-}"
while [ $# -gt 0 ]; do
  case "$1" in
    --data-dir) DATA_DIR="$2"; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
if [ -z "$DATA_DIR" ]; then
  echo "give --data-dir DIR (a mirror laid out like ../shared/data); online task downloads are not built yet" >&2
  exit 2
fi
DATA_DIR="$(cd "$DATA_DIR" && pwd)"
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
cargo build --release -p nanochat
NC="$PWD/target/release/nanochat"
SHAPE=(--max-seq-len 256 --device-batch-size 8 --total-batch-size 4096)

$NC data download --from "$DATA_DIR/pretrain/gutenberg"
$NC tok train --vocab-size 4096 --max-chars 20000000
$NC tok eval
$NC base train --depth 2 "${SHAPE[@]}" --num-iterations 200 --eval-every 100 --sample-every 200
$NC base eval --eval core,bpb,sample --max-per-task 20 --bundle-dir "$DATA_DIR/eval/eval_bundle"
$NC mid train --data-dir "$DATA_DIR" "${SHAPE[@]}" --num-iterations 100 --eval-every 50
$NC sft train --data-dir "$DATA_DIR" --device-batch-size 4 --max-iterations 40
$NC chat eval -i sft -a "ARC-Easy|ARC-Challenge|MMLU|GSM8K|HumanEval|SpellingBee" --max-problems 20 --data-dir "$DATA_DIR"
$NC report
echo "done: report in $NANOCHAT_BASE_DIR/report/report.md; talk to the model with: $NC chat  (or $NC serve)"
