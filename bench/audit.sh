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

# Wall time and CPU time (user + sys) of each process: on a busy machine the CPU time is the
# one-core figure; on a quiet one the two agree.
tf=bench/out/time
/usr/bin/time -f "%e %U %S" -o $tf.rust $core target/release/safetune audit --format json "$data" > bench/out/rust.json
/usr/bin/time -f "%e %U %S" -o $tf.python $core python3 bench/audit_rules.py "$data" > bench/out/python.json

python3 - "$n" "$bytes" <<'PY'
import json, sys
n, size = int(sys.argv[1]), int(sys.argv[2])
def times(name):
    wall, user, sys_ = map(float, open(f"bench/out/time.{name}").read().split()[-3:])
    return wall, user + sys_
r = json.load(open("bench/out/rust.json"))
p = json.load(open("bench/out/python.json"))
rust = {"examples": r["examples"], "plain": r["structure"]["plain"]["count"], "itemized": r["structure"]["itemized"]["count"],
        "markdown": r["structure"]["markdown"]["count"], "identity": r["identity"]["count"], "roleplay": r["roleplay"]["count"],
        "affirmative": r["affirmative"]["count"]}
agree = rust == p
(rw, rc), (pw, pc) = times("rust"), times("python")
print(f"file: {n} examples, {size / 1e6:.1f} MB")
print(f"counts agree: {agree}  rust={rust}")
if not agree:
    print(f"                 python={p}")
print(f"{'':15}  {'wall s':>8} {'cpu s':>8} {'examples/s (cpu)':>17} {'MB/s (cpu)':>11} {'MB/s (wall)':>11}")
for name, w, c in [("safetune audit", rw, rc), ("python re", pw, pc)]:
    print(f"{name:15}  {w:8.2f} {c:8.2f} {n / c:17,.0f} {size / 1e6 / c:11.1f} {size / 1e6 / w:11.1f}")
print(f"ratio          : {pc / rc:.1f}x the Python script by CPU time, {pw / rw:.1f}x by wall time")
sys.exit(0 if agree else 1)
PY
