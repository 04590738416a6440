#!/usr/bin/env bash
# Side-by-side rounds: the PyTorch reference and nanochat, interleaved (reference, ours, reference,
# ours, ...), each round noting the load average, so that a noisy minute hits both sides alike.
# Writes every JSON line to bench/out/rounds-<what>-<date>.jsonl and prints the medians and ratios.
#
#   bash bench/rounds.sh train  [ROUNDS]   # training step, fp32 and bf16 (torch autocast vs --bf16)
#   bash bench/rounds.sh decode [ROUNDS]   # time to first token and decode at depth 4
#
# Needs a release build (cargo build --release -p nanochat) and the reference virtualenv
# (PYTHON=/work/venv-ref/bin/python by default; DESIGN.md §3 says how to make one).
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:?usage: bench/rounds.sh train|decode [ROUNDS]}"
rounds="${2:-3}"
python="${PYTHON:-/work/venv-ref/bin/python}"
nanochat="${NANOCHAT:-target/release/nanochat}"
mkdir -p bench/out
out="bench/out/rounds-$what-$(date -u +%Y%m%dT%H%M%SZ).jsonl"

# One measurement: its label, the load average before it, and the tool's JSON line.
run() {
  local label="$1"
  shift
  local load
  load="$(cut -d' ' -f1 /proc/loadavg)"
  echo "== $label (load $load): $*" >&2
  "$@" | tail -n 1 | "$python" -c 'import json,sys; d=json.loads(sys.stdin.read()); d["label"]=sys.argv[1]; d["load"]=float(sys.argv[2]); print(json.dumps(d))' "$label" "$load" >>"$out"
}

for r in $(seq 1 "$rounds"); do
  echo "== round $r of $rounds" >&2
  case "$what" in
    train)
      run torch-fp32 "$python" bench/torch_train.py --warmup 3 --steps 5
      run ours-fp32 "$nanochat" bench train --warmup 1 --steps 4
      run torch-bf16 "$python" bench/torch_train.py --warmup 3 --steps 5 --dtype bfloat16
      run ours-bf16 "$nanochat" bench train --warmup 1 --steps 4 --bf16
      ;;
    decode)
      run torch-fp32 "$python" bench/torch_decode.py --runs 5
      run ours "$nanochat" bench decode --runs 5 --weights int8,bf16,f32 --skip-candle
      run torch-bf16 "$python" bench/torch_decode.py --runs 5 --dtype bfloat16
      ;;
    *)
      echo "unknown benchmark $what: train or decode" >&2
      exit 2
      ;;
  esac
done

# Medians per label of every numeric field, then the ratios of ours to the reference.
"$python" - "$out" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
by = {}
for r in rows:
    by.setdefault(r["label"], []).append(r)
print(f"{sys.argv[1]}: {len(rows)} runs, load averages {sorted({r['load'] for r in rows})}")
def numbers(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, bool):
            continue
        if isinstance(v, (int, float)):
            yield prefix + k, v
        elif isinstance(v, dict):
            yield from numbers(v, prefix + k + ".")
for label, rs in by.items():
    keys = {}
    for r in rs:
        for k, v in numbers(r):
            keys.setdefault(k, []).append(v)
    interesting = {k: v for k, v in keys.items() if any(w in k for w in ("per_s", "tok_s", "ttft", "rss", "bandwidth", "triad"))}
    print(label)
    for k, v in sorted(interesting.items()):
        print(f"  {k}: median {statistics.median(v):.4g}  (runs {', '.join(f'{x:.4g}' for x in v)})")
EOF
