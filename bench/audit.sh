#!/usr/bin/env bash
# Audit throughput: `safetune audit` against bench/audit_rules.py (the same rules with Python's
# `re`) on one generated messages-JSONL file, both pinned to one core, in one run.
# Usage: bench/audit.sh [EXAMPLES]   (default 1000000; the file is cached in bench/out/)
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-1000000}
mkdir -p bench/out
data=bench/out/audit-$n.jsonl
[ -f "$data" ] || python3 bench/gen_audit_data.py "$data" --examples "$n"
cargo build --release --locked -p safetune >/dev/null 2>&1
bytes=$(stat -L -c %s "$data")
core="taskset -c 0"
command -v taskset >/dev/null || core=""

t0=$(date +%s.%N)
$core target/release/safetune audit --format json "$data" > bench/out/rust.json
t1=$(date +%s.%N)
$core python3 bench/audit_rules.py "$data" > bench/out/python.json
t2=$(date +%s.%N)

python3 - "$n" "$bytes" "$t0" "$t1" "$t2" <<'PY'
import json, sys
n, size, t0, t1, t2 = int(sys.argv[1]), int(sys.argv[2]), *map(float, sys.argv[3:])
r = json.load(open("bench/out/rust.json"))
p = json.load(open("bench/out/python.json"))
rust = {"examples": r["examples"], "plain": r["structure"]["plain"]["count"], "itemized": r["structure"]["itemized"]["count"],
        "markdown": r["structure"]["markdown"]["count"], "identity": r["identity"]["count"], "roleplay": r["roleplay"]["count"],
        "affirmative": r["affirmative"]["count"]}
agree = rust == p
rs, ps = t1 - t0, t2 - t1
print(f"file: {n} examples, {size / 1e6:.1f} MB")
print(f"counts agree: {agree}  rust={rust}")
if not agree:
    print(f"                 python={p}")
print(f"safetune audit : {rs:7.2f} s  {n / rs:12,.0f} examples/s  {size / 1e6 / rs:7.1f} MB/s")
print(f"python re      : {ps:7.2f} s  {n / ps:12,.0f} examples/s  {size / 1e6 / ps:7.1f} MB/s")
print(f"ratio          : {ps / rs:.1f}x the Python script")
sys.exit(0 if agree else 1)
PY
