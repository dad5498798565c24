#!/usr/bin/env bash
# Training throughput against PyTorch (+ PEFT for LoRA) on this machine (issue 4, point 9; issue
# 15, item 1): SmolLM2-135M-Instruct in f32 (the asset GGUF written as a Hugging Face directory
# by `safetune merge`), batch 8 x 256 tokens (16 conversations each cut to exactly 256 tokens),
# AdamW at a constant 2e-4, no clipping, the same number of steps and threads on both sides.
# LoRA r=16 alpha=32 on q,k,v,o,gate,up,down by default; --full trains every weight on both sides.
#
# Each side runs RUNS times (default 3), alternated: ours, peer, ours, peer, ... Prints the
# kernel ISA each side used (ours: `SAFETUNE_ISA`'s choice as recorded in the run's manifest;
# the peer: `torch.backends.cpu.get_cpu_capability()`), every run's input tokens/s (steps after
# the first two) and loss after the last step, the medians and the ratio of the medians.
# --avx2 restricts both sides to AVX2 (ours: SAFETUNE_ISA=avx2; PyTorch: ATEN_CPU_CAPABILITY=avx2,
# MKL_ENABLE_INSTRUCTIONS=AVX2, ONEDNN_MAX_CPU_ISA=AVX2), the figure for an AVX2-only machine.
# --bf16 compares safetune with `tune --bf16` (bf16 products on AMX-BF16) against safetune in
# f32 instead of PyTorch (issue 15, item 2: target 1.6x the f32 step, loss after 50 steps within
# 2% of f32); it needs no Python packages.
# Not run by CI.
#
#   PYTHON=/path/to/venv/bin/python bench/train_throughput.sh [--full] [--avx2|--bf16] [STEPS=50] [THREADS=2] [RUNS=3]
#
# PYTHON (default python3) must import torch, transformers and peft (see bench/README.md), except
# with --bf16.
set -euo pipefail
FULL=0
AVX2=0
BF16=0
pos=()
for a in "$@"; do
  case "$a" in
    --full) FULL=1 ;;
    --avx2) AVX2=1 ;;
    --bf16) BF16=1 ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    -*) echo "unknown option $a (expected --full, --avx2, --bf16)" >&2; exit 2 ;;
    *) pos+=("$a") ;;
  esac
done
STEPS=${pos[0]:-50}
THREADS=${pos[1]:-2}
RUNS=${pos[2]:-3}
[ "$RUNS" -ge 1 ] || { echo "RUNS must be at least 1" >&2; exit 2; }
[ "$STEPS" -ge 3 ] || { echo "STEPS must be at least 3 (the first two are not timed)" >&2; exit 2; }
PYTHON=${PYTHON:-python3}
cd "$(dirname "$0")/.."
BIN=${SAFETUNE_BIN:-target/release/safetune}
[ -x "$BIN" ] || { echo "build first: cargo build --release -p safetune" >&2; exit 1; }
[ "$BF16" = 1 ] && [ "$AVX2" = 1 ] && { echo "--bf16 needs the AVX-512 kernels: leave out --avx2" >&2; exit 2; }
[ "$BF16" = 1 ] || "$PYTHON" -c "import torch, transformers, peft" 2>/dev/null \
  || { echo "$PYTHON cannot import torch, transformers and peft (set PYTHON=...)" >&2; exit 1; }
HOME_DIR=${SAFETUNE_HOME:-$HOME/.cache/safetune}
GGUF=$HOME_DIR/assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
[ -f "$GGUF" ] || { echo "missing $GGUF (run scripts/fetch-assets)" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$BIN" merge --model "$GGUF" -o "$tmp/model" >/dev/null 2>&1
python3 bench/gen_train_data.py "$tmp/data.jsonl"

# What each side may use.
if [ "$AVX2" = 1 ]; then
  OURS_ENV=(SAFETUNE_ISA=avx2)
  PEER_ENV=(ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2)
else
  OURS_ENV=(SAFETUNE_ISA="${SAFETUNE_ISA:-auto}")
  PEER_ENV=()
fi
if [ "$FULL" = 1 ]; then
  OURS_MODE=(--full)
  PEER_MODE=(--full)
else
  OURS_MODE=(--rank 16 --alpha 32 --targets all)
  PEER_MODE=(--rank 16 --alpha 32)
fi
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'); flags:$(grep -m1 -o -w -E 'avx2|fma|avx512f|avx512_bf16|avx512_vnni|amx_bf16' /proc/cpuinfo | sort -u | tr '\n' ' ' | sed 's/^/ /')"
echo "mode: $([ "$FULL" = 1 ] && echo full || echo lora); restricted to AVX2: $([ "$AVX2" = 1 ] && echo yes || echo no); $STEPS steps, $THREADS threads, $RUNS runs per side"

ours() { # ours OUT [extra tune flags...]
  local out=$1; shift
  env "${OURS_ENV[@]}" RAYON_NUM_THREADS="$THREADS" "$BIN" tune --model "$tmp/model" --data "$tmp/data.jsonl" \
    -o "$tmp/$out" "${OURS_MODE[@]}" --batch-size 8 --max-len 256 --max-steps "$STEPS" --epochs 1000 \
    --lr 2e-4 --schedule constant --max-grad-norm 0 --eval-fraction 0 "$@" > "$tmp/$out.log" 2>&1 \
    || { cat "$tmp/$out.log" >&2; exit 1; }
}
for i in $(seq 1 "$RUNS"); do
  if [ "$BF16" = 1 ]; then
    echo "run $i/$RUNS: safetune --bf16 (load $(cut -d' ' -f1-3 /proc/loadavg))" >&2
    ours "bf16_$i" --bf16
    echo "run $i/$RUNS: safetune f32 (load $(cut -d' ' -f1-3 /proc/loadavg))" >&2
    ours "f32_$i"
    continue
  fi
  echo "run $i/$RUNS: safetune (load $(cut -d' ' -f1-3 /proc/loadavg))" >&2
  ours "ours$i"
  echo "run $i/$RUNS: peer (load $(cut -d' ' -f1-3 /proc/loadavg))" >&2
  env "${PEER_ENV[@]}" "$PYTHON" bench/train_pytorch_lora.py --model "$tmp/model" --data "$tmp/data.jsonl" \
    --steps "$STEPS" --batch 8 --seq 256 "${PEER_MODE[@]}" --lr 2e-4 --threads "$THREADS" \
    --out "$tmp/peer$i.json" > "$tmp/peer$i.log" 2>&1 || { cat "$tmp/peer$i.log" >&2; exit 1; }
done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2

if [ "$BF16" = 1 ]; then
python3 - "$tmp" "$RUNS" <<'PY'
import json, statistics, sys
tmp, runs = sys.argv[1], int(sys.argv[2])

def run(name):
    rows = [json.loads(l) for l in open(f"{tmp}/{name}/metrics.jsonl") if '"train"' in l]
    el = [r["elapsed_s"] for r in rows]
    secs = [el[k] - (el[k - 1] if k else 0.0) for k in range(len(el))][2:]
    toks = sum(r["input_tokens"] for r in rows[2:])
    m = json.load(open(f"{tmp}/{name}/manifest.json"))
    return toks / sum(secs), rows[-1]["loss"], m.get("kernel_isa", "?"), m.get("bf16", False), len(rows)

b = [run(f"bf16_{i}") for i in range(1, runs + 1)]
f = [run(f"f32_{i}") for i in range(1, runs + 1)]
assert all(x[3] for x in b) and not any(x[3] for x in f), "bf16 flag not as asked (manifest)"
print(f"steps: {b[0][4]} each, batch 8 x 256")
print(f"kernels: bf16 runs {', '.join(sorted({x[2] for x in b}))} + AMX-BF16 products; "
      f"f32 runs {', '.join(sorted({x[2] for x in f}))}")
for i in range(runs):
    print(f"run {i + 1}: bf16 {b[i][0]:.1f} tokens/s (loss {b[i][1]:.4f}); f32 {f[i][0]:.1f} tokens/s (loss {f[i][1]:.4f})")
bm, fm = statistics.median(x[0] for x in b), statistics.median(x[0] for x in f)
bl, fl = statistics.median(x[1] for x in b), statistics.median(x[1] for x in f)
print(f"median: bf16 {bm:.1f} tokens/s, loss after the last step {bl:.4f}")
print(f"median: f32 {fm:.1f} tokens/s, loss after the last step {fl:.4f}")
print(f"ratio bf16 / f32 (medians): {bm / fm:.2f}x (issue 15 target: at least 1.6x)")
print(f"loss difference (medians): {abs(bl - fl) / fl * 100:.2f}% of f32 (issue 15 target after 50 steps: at most 2%)")
PY
exit 0
fi

python3 - "$tmp" "$RUNS" "$FULL" <<'PY'
import json, statistics, sys
tmp, runs, full = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"

def ours(i):
    rows = [json.loads(l) for l in open(f"{tmp}/ours{i}/metrics.jsonl") if '"train"' in l]
    el = [r["elapsed_s"] for r in rows]
    secs = [el[k] - (el[k - 1] if k else 0.0) for k in range(len(el))][2:]
    toks = sum(r["input_tokens"] for r in rows[2:])
    isa = json.load(open(f"{tmp}/ours{i}/manifest.json")).get("kernel_isa", "?")
    return toks / sum(secs), rows[-1]["loss"], isa, len(rows), rows[0]["input_tokens"]

o = [ours(i) for i in range(1, runs + 1)]
p = [json.load(open(f"{tmp}/peer{i}.json")) for i in range(1, runs + 1)]
peer_name = p[0]["peer"]
print(f"steps: {o[0][3]} each, batch 8 x 256, input tokens/step {o[0][4]}")
print(f"kernels: safetune {', '.join(sorted({x[2] for x in o}))}; "
      f"{peer_name} (torch {p[0]['torch']}, MKL {p[0]['mkl']}) {', '.join(sorted({x['isa'] for x in p}))}")
for i in range(runs):
    print(f"run {i + 1}: safetune {o[i][0]:.1f} tokens/s (loss {o[i][1]:.4f}); "
          f"{peer_name} {p[i]['tokens_per_s']:.1f} tokens/s (loss {p[i]['final_loss']:.4f})")
om = statistics.median(x[0] for x in o)
pm = statistics.median(x["tokens_per_s"] for x in p)
ol = statistics.median(x[1] for x in o)
pl = statistics.median(x["final_loss"] for x in p)
print(f"median: safetune {om:.1f} tokens/s, loss after the last step {ol:.4f}")
print(f"median: {peer_name} {pm:.1f} tokens/s, loss after the last step {pl:.4f}")
target = 1.2 if full else 1.3
print(f"ratio safetune / {peer_name} (medians): {om / pm:.2f}x (issue 15 target: at least {target}x)")
print(f"loss difference (medians): {abs(ol - pl):.4f} (issue 15 target after 50 steps: at most 0.05)")
PY
