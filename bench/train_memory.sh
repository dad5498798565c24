#!/usr/bin/env bash
# Peak RSS of a LoRA training run: `safetune tune` on SmolLM2-135M-Instruct (the asset GGUF,
# dequantized to f32), LoRA r=16 alpha=32 on q,k,v,o,gate,up,down, batch 8 x 256 tokens, a few
# steps, measured with /usr/bin/time -v and pinned to one core. Not run by CI.
#
#   bench/train_memory.sh [STEPS=3] [CPU=1] [EXTRA TUNE FLAGS...]
#
# e.g. `bench/train_memory.sh 3 1 --recompute` measures with activation recomputation.
#
# Peer figure (issue 4): PyTorch + PEFT needed 7.5 GB for the same run on this machine
# (bench/train_pytorch_lora.py prints its own peak RSS).
# SAFETUNE_BIN picks the binary (default target/release/safetune if built, else target/debug).
set -euo pipefail
STEPS=${1:-3}
CPU=${2:-1}
shift $(( $# < 2 ? $# : 2 ))
cd "$(dirname "$0")/.."
BIN=${SAFETUNE_BIN:-}
if [ -z "$BIN" ]; then
  if [ -x target/release/safetune ]; then BIN=target/release/safetune; else BIN=target/debug/safetune; fi
fi
HOME_DIR=${SAFETUNE_HOME:-$HOME/.cache/safetune}
GGUF=$HOME_DIR/assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
[ -f "$GGUF" ] || { echo "missing $GGUF (run scripts/fetch-assets)" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 bench/gen_train_data.py "$tmp/data.jsonl"
echo "binary: $BIN; steps: $STEPS; pinned to CPU $CPU; extra flags: ${*:-none}" >&2
taskset -c "$CPU" /usr/bin/time -v "$BIN" tune --model "$GGUF" --data "$tmp/data.jsonl" -o "$tmp/out" \
  --rank 16 --alpha 32 --targets all --batch-size 8 --max-len 256 --max-steps "$STEPS" \
  --eval-fraction 0 --schedule constant "$@" 2> "$tmp/stderr.txt" || { cat "$tmp/stderr.txt" >&2; exit 1; }
rss_kb=$(grep "Maximum resident set size" "$tmp/stderr.txt" | awk '{print $NF}')
wall=$(grep "Elapsed (wall clock)" "$tmp/stderr.txt" | awk '{print $NF}')
python3 - "$tmp/out/metrics.jsonl" "$rss_kb" "$wall" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"train"' in l]
rss_gb = int(sys.argv[2]) / 1024 / 1024
tps = [r["tokens_per_s"] for r in rows]
print(f"steps: {len(rows)}, input tokens/step: {rows[0]['input_tokens']}, losses: "
      + ", ".join(f"{r['loss']:.3f}" for r in rows))
print(f"tokens/s per step: " + ", ".join(f"{t:.1f}" for t in tps))
print(f"peak RSS: {rss_gb:.2f} GiB (PyTorch + PEFT peer: 7.5 GB -> ratio {rss_gb * 1.0737 / 7.5:.2f}); wall {sys.argv[3]}")
PY
