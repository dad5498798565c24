#!/usr/bin/env bash
# LoRA on a quantized base (`tune --quantized`, issue 15 item 3) against our f32 LoRA and
# PyTorch + PEFT f32 LoRA. Not run by CI. Two parts:
#
#   bench/train_qlora.sh memory [STEPS=1] [LAYERS=22]
#     Peak RSS (/usr/bin/time -v) of 1-2 LoRA steps (r=16, alpha 32, all seven projections,
#     batch 8 x 256) on a synthetic Llama with random weights, written once by
#     `cargo run -p safetune-train --example synthetic_llama` (hidden 2048, MLP 5632, 32/4 heads,
#     LAYERS layers: 22 = 0.97B parameters): ours f32 (safetensors), ours --quantized on the same
#     weights as GGUF Q8_0 and Q4_0 and on the safetensors quantized to Q8_0 at load, and the
#     peer (f32). Prints the ratios against the targets (<= 0.35x ours f32, <= 0.2x the peer).
#
#   bench/train_qlora.sh smollm2 [STEPS=50] [RUNS=1]
#     SmolLM2-135M-Instruct (the asset GGUF, Q4_1): ours --quantized, ours f32 and the peer
#     (f32, on the GGUF merged to a Hugging Face directory), alternated RUNS times; input
#     tokens/s (after the first two steps), the loss after STEPS steps and peak RSS of each.
#
# SAFETUNE_BIN picks the binary (default target/release/safetune, else target/debug);
# PYTHON (default /work/peer/bin/python if present, else python3) must import torch,
# transformers and peft (SKIP_PEER=1 leaves the peer out); MODEL_DIR keeps the synthetic model
# (default /tmp/safetune-synthetic-L$LAYERS; about 5.7 GB for 22 layers). Threads: all cores
# (RAYON_NUM_THREADS and --threads for the peer follow THREADS, default nproc).
set -euo pipefail
MODE=${1:-memory}
shift || true
cd "$(dirname "$0")/.."
BIN=${SAFETUNE_BIN:-}
if [ -z "$BIN" ]; then
  if [ -x target/release/safetune ]; then BIN=target/release/safetune; else BIN=target/debug/safetune; fi
fi
[ -x "$BIN" ] || { echo "build first: cargo build --release -p safetune" >&2; exit 1; }
if [ -z "${PYTHON:-}" ]; then
  if [ -x /work/peer/bin/python ]; then PYTHON=/work/peer/bin/python; else PYTHON=python3; fi
fi
THREADS=${THREADS:-$(nproc)}
SKIP_PEER=${SKIP_PEER:-0}
if [ "$SKIP_PEER" != 1 ]; then
  "$PYTHON" -c "import torch, transformers, peft" 2>/dev/null \
    || { echo "$PYTHON cannot import torch, transformers and peft (set PYTHON=... or SKIP_PEER=1)" >&2; exit 1; }
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 bench/gen_train_data.py "$tmp/data.jsonl"
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'); $(nproc) cores; flags:$(grep -m1 -o -w -E 'avx2|fma|avx512f|avx512_bf16|avx512_vnni|amx_bf16' /proc/cpuinfo | sort -u | tr '\n' ' ' | sed 's/^/ /')"
echo "binary: $BIN; threads: $THREADS; load before: $(cut -d' ' -f1-3 /proc/loadavg)"

# run NAME ARGS...: one `safetune tune` under /usr/bin/time -v; writes $tmp/NAME.{out,time}.
ours() {
  local name=$1
  shift
  echo "run $name (load $(cut -d' ' -f1-3 /proc/loadavg))" >&2
  RAYON_NUM_THREADS=$THREADS /usr/bin/time -v "$BIN" tune --data "$tmp/data.jsonl" -o "$tmp/$name" \
    --rank 16 --alpha 32 --targets all --batch-size 8 --max-len 256 --epochs 1000 \
    --lr 2e-4 --schedule constant --max-grad-norm 0 --eval-fraction 0 "$@" \
    > "$tmp/$name.log" 2> "$tmp/$name.time" || { tail -30 "$tmp/$name.time" >&2; exit 1; }
}
peer() {
  local name=$1
  shift
  echo "run $name (load $(cut -d' ' -f1-3 /proc/loadavg))" >&2
  /usr/bin/time -v "$PYTHON" bench/train_pytorch_lora.py --data "$tmp/data.jsonl" --batch 8 --seq 256 \
    --rank 16 --alpha 32 --lr 2e-4 --threads "$THREADS" --out "$tmp/$name.json" "$@" \
    > "$tmp/$name.log" 2> "$tmp/$name.time" || { tail -30 "$tmp/$name.time" >&2; exit 1; }
}

case "$MODE" in
memory)
  STEPS=${1:-1}
  LAYERS=${2:-22}
  MODEL_DIR=${MODEL_DIR:-/tmp/safetune-synthetic-L$LAYERS}
  if [ ! -f "$MODEL_DIR/q4_0.gguf" ]; then
    ex=target/release/examples/synthetic_llama
    [ -x "$ex" ] || ex=target/debug/examples/synthetic_llama
    if [ -x "$ex" ]; then "$ex" "$MODEL_DIR" "$LAYERS"; else
      cargo run --release -q -p safetune-train --example synthetic_llama -- "$MODEL_DIR" "$LAYERS"; fi
  fi
  echo "model: $MODEL_DIR ($LAYERS layers); $STEPS step(s) of 8 x 256 tokens per run"
  ours f32 --model "$MODEL_DIR/hf" --max-steps "$STEPS" --packing
  ours q8_0 --model "$MODEL_DIR/q8_0.gguf" --quantized --max-steps "$STEPS" --packing
  ours q4_0 --model "$MODEL_DIR/q4_0.gguf" --quantized --max-steps "$STEPS" --packing
  ours st_q8_0 --model "$MODEL_DIR/hf" --quantized --max-steps "$STEPS" --packing
  [ "$SKIP_PEER" = 1 ] || peer peer --model "$MODEL_DIR/hf" --steps "$STEPS" --warmup 0
  ;;
smollm2)
  STEPS=${1:-50}
  RUNS=${2:-1}
  HOME_DIR=${SAFETUNE_HOME:-$HOME/.cache/safetune}
  GGUF=$HOME_DIR/assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  [ -f "$GGUF" ] || { echo "missing $GGUF (run scripts/fetch-assets)" >&2; exit 1; }
  [ "$SKIP_PEER" = 1 ] || "$BIN" merge --model "$GGUF" -o "$tmp/model" >/dev/null 2>&1
  echo "model: $GGUF; $STEPS steps of 8 x 256 tokens per run, $RUNS run(s) per side"
  for i in $(seq 1 "$RUNS"); do
    ours "quantized$i" --model "$GGUF" --quantized --max-steps "$STEPS"
    ours "f32_$i" --model "$GGUF" --max-steps "$STEPS"
    [ "$SKIP_PEER" = 1 ] || peer "peer$i" --model "$tmp/model" --steps "$STEPS"
  done
  ;;
*) echo "unknown part $MODE (memory or smollm2)" >&2; exit 2 ;;
esac
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"

python3 - "$tmp" "$MODE" <<'PY'
import glob, json, os, re, statistics, sys
tmp, mode = sys.argv[1], sys.argv[2]
def rss_gib(name):
    t = open(f"{tmp}/{name}.time").read()
    return int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", t).group(1)) / 1024 / 1024
def ours(name):
    rows = [json.loads(l) for l in open(f"{tmp}/{name}/metrics.jsonl") if '"train"' in l]
    timed = rows[2:] if len(rows) > 2 else rows
    tps = sum(r["input_tokens"] for r in timed) / sum(r["input_tokens"] / r["tokens_per_s"] for r in timed)
    return {"rss": rss_gib(name), "tps": tps, "loss": rows[-1]["loss"], "steps": len(rows)}
def peer(name):
    s = json.load(open(f"{tmp}/{name}.json"))
    return {"rss": rss_gib(name), "tps": s["tokens_per_s"], "loss": s["final_loss"], "steps": s["steps"],
            "isa": s["isa"], "torch": s["torch"]}
names = sorted(os.path.basename(p)[:-5] for p in glob.glob(f"{tmp}/*.time"))
res = {n: (peer(n) if n.startswith("peer") else ours(n)) for n in names}
for n in names:
    r = res[n]
    extra = f", ISA {r['isa']}, torch {r['torch']}" if "isa" in r else ""
    print(f"{n:10s} peak RSS {r['rss']:6.2f} GiB  tokens/s {r['tps']:7.1f}  loss after {r['steps']} steps {r['loss']:.4f}{extra}")
if mode == "memory":
    f32 = res["f32"]["rss"]
    for q in ["q8_0", "q4_0", "st_q8_0"]:
        line = f"{q}: {res[q]['rss'] / f32:.2f}x ours f32 (target <= 0.35x)"
        if "peer" in res:
            line += f", {res[q]['rss'] / res['peer']['rss']:.2f}x PyTorch + PEFT f32 (target <= 0.2x)"
        print(line)
    if "peer" in res:
        print(f"ours f32: {f32 / res['peer']['rss']:.2f}x PyTorch + PEFT f32")
else:
    med = lambda pre, k: statistics.median(res[n][k] for n in names if n.startswith(pre))
    q, f = med("quantized", "tps"), med("f32_", "tps")
    ql, fl = med("quantized", "loss"), med("f32_", "loss")
    print(f"medians: --quantized {q:.1f} tokens/s, f32 {f:.1f} tokens/s ({q / f:.2f}x)")
    print(f"loss after the last step: --quantized {ql:.4f}, f32 {fl:.4f} ({abs(ql - fl) / fl * 100:.1f}% apart; target within 5%)")
    if any(n.startswith("peer") for n in names):
        p = med("peer", "tps")
        print(f"--quantized / PyTorch + PEFT f32 (medians): {q / p:.2f}x (target >= 1.2x); peer loss {med('peer', 'loss'):.4f}")
PY
