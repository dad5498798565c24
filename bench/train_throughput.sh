#!/usr/bin/env bash
# LoRA training throughput against PyTorch + PEFT (issue 4, point 9), in one run on this machine:
# SmolLM2-135M-Instruct in f32 (the asset GGUF written as a Hugging Face directory by
# `safetune merge`), LoRA r=16 alpha=32 on q,k,v,o,gate,up,down, batch 8 x 256 tokens (16
# conversations each cut to exactly 256 tokens), AdamW at a constant 2e-4, no clipping, the same
# number of steps and threads on both sides. Prints input tokens/s of each (steps after the
# first two), their ratio and the loss after the last step. Not run by CI.
#
#   PYTHONPATH=/tmp/torchpeer:/tmp/peftpeer bench/train_throughput.sh [STEPS=50] [THREADS=2]
#
# The peer needs torch, transformers and peft importable (see bench/README.md).
set -euo pipefail
STEPS=${1:-50}
THREADS=${2:-2}
cd "$(dirname "$0")/.."
BIN=${SAFETUNE_BIN:-target/release/safetune}
[ -x "$BIN" ] || { echo "build first: cargo build --release -p safetune" >&2; exit 1; }
HOME_DIR=${SAFETUNE_HOME:-$HOME/.cache/safetune}
GGUF=$HOME_DIR/assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
[ -f "$GGUF" ] || { echo "missing $GGUF (run scripts/fetch-assets)" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$BIN" merge --model "$GGUF" -o "$tmp/model" >/dev/null 2>&1
python3 bench/gen_train_data.py "$tmp/data.jsonl"
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
python3 bench/train_pytorch_lora.py --model "$tmp/model" --data "$tmp/data.jsonl" --steps "$STEPS" \
  --batch 8 --seq 256 --rank 16 --alpha 32 --lr 2e-4 --threads "$THREADS" --out "$tmp/peer.json" \
  > "$tmp/peer.log"
echo "load between: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
RAYON_NUM_THREADS=$THREADS "$BIN" tune --model "$tmp/model" --data "$tmp/data.jsonl" -o "$tmp/out" \
  --rank 16 --alpha 32 --targets all --batch-size 8 --max-len 256 --max-steps "$STEPS" --epochs 1000 \
  --lr 2e-4 --schedule constant --max-grad-norm 0 --eval-fraction 0 > "$tmp/ours.log" 2>&1
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
python3 - "$tmp/peer.json" "$tmp/out/metrics.jsonl" <<'PY'
import json, sys
peer = json.load(open(sys.argv[1]))
rows = [json.loads(l) for l in open(sys.argv[2]) if '"train"' in l]
timed = rows[2:] or rows
# per-step seconds from the cumulative elapsed time
el = [r["elapsed_s"] for r in rows]
secs = [el[i] - (el[i - 1] if i else 0.0) for i in range(len(el))][2:] or [el[0]]
ours = sum(r["input_tokens"] for r in timed) / sum(secs)
print(f"steps: {len(rows)} each, batch 8 x 256, input tokens/step {rows[0]['input_tokens']}")
print(f"pytorch+peft (torch {peer['torch']}, {peer['threads']} threads): {peer['tokens_per_s']:.1f} tokens/s, loss after the last step {peer['final_loss']:.4f}")
print(f"safetune: {ours:.1f} tokens/s, loss after the last step {rows[-1]['loss']:.4f}")
print(f"ratio safetune / pytorch: {ours / peer['tokens_per_s']:.2f}x (target at least 1.0x)")
PY
