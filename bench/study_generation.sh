#!/usr/bin/env bash
# The study's generation speed and the Q8_0 agreement (issue 15, item 4), in one sitting.
#
# 1. `study_generation`: the quickstart's generate steps of one condition (its two benchmarks'
#    seeded test samples, 48 new tokens, greedy, batch 32) on MODEL loaded as a study loads it,
#    RUNS times alternated: (a) f32 with static batches (the path issue 15 found), (b) Q8_0 at
#    load with static batches, (c) Q8_0 with continuous batching (the default), each step fed as
#    the study feeds it. Prints CPU model, ISA, every run, medians and ratios. Then one step of ROWS AdvBench prompts at batch 32, Q8_0: (d)
#    continuous batching fed one batch-sized chunk at a time (the study before `run_fed`), (e) the
#    whole step fed (the study now), (f) static batches.
# 2. `quantize_agreement`: greedy answers to 64 prompts (32 new tokens) on Q8_0 weights against
#    the f32 path: mean common prefix of the first 32 tokens and the share of identical answers.
#
# MODEL: a safetensors model, e.g. a quickstart study's merged aligned model
# (`STUDY/steps/align-*/merged`; `safetune quickstart --tiny -o DIR` makes one). Not run by CI.
#
#   bench/study_generation.sh MODEL [RUNS=3] [ROWS=128]
set -euo pipefail
if [ $# -lt 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
  sed -n '2,16p' "$0"; exit 2
fi
MODEL=$1
RUNS=${2:-3}
cd "$(dirname "$0")/.."
cargo build --release --locked -p safetune --example study_generation --example quantize_agreement
echo "== study generation =="
target/release/examples/study_generation "$MODEL" "$RUNS" "${3:-128}"
echo "== Q8_0 against f32, greedy =="
target/release/examples/quantize_agreement "$MODEL"
