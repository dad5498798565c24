#!/usr/bin/env bash
# Longer runs of the parser mutation tests than CI's (see bench/README.md).
# Usage: bench/mutation.sh [MUTANTS_PER_FILE]   (default 20000)
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-20000}"
export SAFETUNE_MUTATIONS="$n"
start=$(date +%s)
cargo test --release --locked -p safetune-data --test mutation -- --test-threads 2
cargo test --release --locked -p safetune-model --test mutation -- --test-threads 2
echo "mutation: $n mutants per file, $(( $(date +%s) - start )) s, no panic"
