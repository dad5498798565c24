#!/usr/bin/env bash
# Where a training step's and a generation run's time goes (issue 15: "what stands between the
# code and the target"), on this machine: `perf record -e cpu-clock` of short runs, reported as
# the top symbols (self time) and as shares per kind of work (gemm kernels, AMX, int8 blocks,
# MKL, kernel page zeroing, memset, candle's elementwise ops, thread pools, ...).
#
# Runs, each on THREADS threads (default 2), batch 8 x 256 tokens of bench/gen_train_data.py's
# conversations, 4 optimizer steps (the first two include start-up and allocation):
#   lora-f32, full-f32, lora-bf16 and full-bf16 (need AMX-BF16; skipped with a note otherwise),
#   lora-q4_1 (`--quantized` on the asset GGUF), peer-lora and peer-full (PyTorch, if PYTHON
#   imports torch, transformers and peft), gen-q8 and gen-f32 (`safetune generate` of
#   demo:overrefusal's 154 probes, 48 new tokens, batch 32, on MODEL with `--quantize q8_0` and
#   without).
# MODEL: a safetensors model to generate with (default: the asset GGUF written out by
# `safetune merge`; a study's `steps/align-*/merged` is what a study generates with).
# Needs `perf` (Debian's linux-perf) and `cargo build --release -p safetune`. Not run by CI.
#
#   PYTHON=/path/to/venv/bin/python bench/profile.sh [OUT=/tmp/safetune-profile] [MODEL] [THREADS=2]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/safetune-profile}
THREADS=${3:-2}
PYTHON=${PYTHON:-python3}
B=${SAFETUNE_BIN:-target/release/safetune}
[ -x "$B" ] || { echo "build first: cargo build --release -p safetune" >&2; exit 1; }
command -v perf >/dev/null || { echo "perf is required (apt-get install linux-perf)" >&2; exit 1; }
HOME_DIR=${SAFETUNE_HOME:-$HOME/.cache/safetune}
GGUF=$HOME_DIR/assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
[ -f "$GGUF" ] || { echo "missing $GGUF (run scripts/fetch-assets)" >&2; exit 1; }
mkdir -p "$OUT"
"$B" merge --model "$GGUF" -o "$OUT/model" >/dev/null 2>&1
MODEL=${2:-$OUT/model}
python3 bench/gen_train_data.py "$OUT/data.jsonl"
export RAYON_NUM_THREADS=$THREADS
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'); flags:$(grep -m1 -o -w -E 'avx2|fma|avx512f|avx512_bf16|avx512_vnni|amx_bf16' /proc/cpuinfo | sort -u | tr '\n' ' ' | sed 's/^/ /'); threads $THREADS"
prof() { # prof NAME COMMAND...
  local name=$1; shift
  echo "== $name (load $(cut -d' ' -f1-3 /proc/loadavg))"
  perf record -q -e cpu-clock -F 499 -g -o "$OUT/$name.data" -- "$@" > "$OUT/$name.log" 2>&1 \
    || { tail -5 "$OUT/$name.log"; return 0; }
  perf report -i "$OUT/$name.data" --no-children --sort symbol -g none --stdio 2>/dev/null \
    | grep '%' > "$OUT/$name.flat"
  head -12 "$OUT/$name.flat" | cut -c1-120
}
steps=(--data "$OUT/data.jsonl" --batch-size 8 --max-len 256 --max-steps 4 --epochs 1000 --lr 2e-4
  --schedule constant --max-grad-norm 0 --eval-fraction 0)
lora=(--rank 16 --alpha 32 --targets all)
prof lora-f32 "$B" tune --model "$OUT/model" -o "$OUT/o1" "${lora[@]}" "${steps[@]}"
prof full-f32 "$B" tune --model "$OUT/model" -o "$OUT/o2" --full "${steps[@]}"
if grep -q -w amx_bf16 /proc/cpuinfo; then
  prof lora-bf16 "$B" tune --model "$OUT/model" -o "$OUT/o3" "${lora[@]}" --bf16 "${steps[@]}"
  prof full-bf16 "$B" tune --model "$OUT/model" -o "$OUT/o5" --full --bf16 "${steps[@]}"
else
  echo "== lora-bf16, full-bf16: skipped, this CPU lacks AMX-BF16"
fi
prof lora-q4_1 "$B" tune --model "$GGUF" -o "$OUT/o4" "${lora[@]}" --quantized "${steps[@]}"
if "$PYTHON" -c "import torch, transformers, peft" 2>/dev/null; then
  peer=("$PYTHON" bench/train_pytorch_lora.py --model "$OUT/model" --data "$OUT/data.jsonl" --steps 4
    --batch 8 --seq 256 --lr 2e-4 --threads "$THREADS")
  prof peer-lora "${peer[@]}" --rank 16 --alpha 32 --out "$OUT/peer-lora.json"
  prof peer-full "${peer[@]}" --full --out "$OUT/peer-full.json"
else
  echo "== peer-lora, peer-full: skipped ($PYTHON cannot import torch, transformers and peft)"
fi
rm -f "$OUT"/gen-*.jsonl
gen=(generate --model "$MODEL" --data demo:overrefusal --max-new-tokens 48 --batch-size 32)
prof gen-q8 "$B" "${gen[@]}" --quantize q8_0 -o "$OUT/gen-q8.jsonl"
prof gen-f32 "$B" "${gen[@]}" -o "$OUT/gen-f32.jsonl"

echo "== shares of samples (self time) by kind of work"
python3 - "$OUT" <<'PY'
import glob, os, re, sys
kinds = [
    ("gemm f32 (gemm crate: kernels and packing)", r"gemm_f32::|gemm_common::"),
    ("AMX bf16", r"bf16::amx"),
    ("int8 blocks (VNNI, quantize)", r"quant::packed|quant::simd|quant::panel|quant::matmul|k_quants"),
    ("MKL sgemm", r"mkl_blas"),
    ("kernel page zeroing and faults", r"\[k\] (clear_page|exc_page_fault|do_anonymous|native_write_msr)"),
    ("memset/memmove", r"__mem(set|move|cpy)"),
    ("candle elementwise and barrier", r"candle_core::"),
    ("our vector math and attention", r"safetune_model::vecmath|safetune_model::decode"),
    ("thread pools and scheduling", r"pool::|rayon|\[k\] (_raw_spin|finish_task|__schedule|do_sched|futex)|sched_yield|GOMP|kmp"),
    ("ATen elementwise (PyTorch)", r"at::|c10::"),
]
for f in sorted(glob.glob(os.path.join(sys.argv[1], "*.flat"))):
    tot = {k: 0.0 for k, _ in kinds}
    other = 0.0
    for line in open(f):
        m = re.match(r"\s*([\d.]+)%\s+(.*)", line)
        if not m:
            continue
        p, sym = float(m.group(1)), m.group(2)
        for k, r in kinds:
            if re.search(r, sym):
                tot[k] += p
                break
        else:
            other += p
    parts = "; ".join(f"{k} {v:.1f}%" for k, v in tot.items() if v >= 0.5)
    print(f"{os.path.basename(f)[:-5]}: {parts}; other {other:.1f}%")
PY
