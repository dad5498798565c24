#!/usr/bin/env bash
# Issue 14's integration check with a real external trainer (not CI: it needs TRL, PEFT and
# PyTorch). On SmolLM2 and this CPU it:
#   1. converts the asset GGUF to a Hugging Face directory (`safetune merge`), the trainer's
#      view of the model (`train_model`);
#   2. runs a small study whose [tune] backend is `trl`: `trl sft` trains two variants (plain and
#      Markdown answers) for a few steps; the study validates and hashes each adapter, then
#      generates and judges with our engine (local model + adapter) and computes the factor
#      effect;
#   3. serves the base with one TRL adapter (`safetune serve --lora`) and checks that greedy
#      answers through the server equal `safetune generate --adapter` on the same prompts.
#
# Usage: PATH=/path/to/venv/bin:$PATH bench/external_trainer.sh [STEPS=4]
#   SAFETUNE=target/release/safetune by default; `trl` must be on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS="${1:-4}"
BIN="${SAFETUNE:-target/release/safetune}"
[ -x "$BIN" ] || { echo "build first: cargo build --release -p safetune (or set SAFETUNE)" >&2; exit 1; }
command -v trl >/dev/null || { echo "trl is not on PATH (pip install trl peft torch in a virtualenv)" >&2; exit 1; }
python3 scripts/fetch-assets >/dev/null
GGUF="${SAFETUNE_HOME:-$HOME/.cache/safetune}/assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
tmp="${WORK:-$(mktemp -d)}"
mkdir -p "$tmp"
echo "work folder: $tmp"
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) cores"
"$(command -v trl | xargs dirname)/python" -c 'import torch, trl, peft, transformers; print(f"trl {trl.__version__}, peft {peft.__version__}, transformers {transformers.__version__}, torch {torch.__version__}")'

hf="$tmp/smollm2-hf"
[ -d "$hf" ] || "$BIN" merge --model "$GGUF" -o "$hf"

cat > "$tmp/study.toml" <<TOML
[study]
name = "external-trl"
seeds = [0]
split_seed = 0
test_fraction = 0.5
sample_seed = 0

[[models]]
name = "smollm2"
spec = "$hf"
train_model = "$hf"

[data]
base = "demo:medical"
limit = 16

[factors]
structure = ["plain", "markdown"]
design = "one-at-a-time"

[[benchmarks]]
name = "advbench"
source = "advbench"
harmful = true
split = "test"
limit = 16

[[judges]]
name = "classifier"
kind = "classifier"

[generation]
max_new_tokens = 48
temperature = 0.0
weights = "f32"

[tune]
backend = "trl"
allow_truncation = true
settings = { max_steps = $STEPS, lr = 0.0005, rank = 8, alpha = 16.0, max_len = 256, batch_size = 4 }
# On a CPU: TRL (transformers) trains in bf16 by default and needs use_cpu there.
backend_settings = { use_cpu = true, bf16 = false, logging_steps = 1, save_strategy = "no" }
TOML

echo "== the study's plan (dry run: each tune step's backend and command)"
"$BIN" study "$tmp/study.toml" --output "$tmp/run" --dry-run | grep -E '^\$|trl|steps' | head -8
echo "== the study (trl trains, safetune evaluates)"
start=$(date +%s)
"$BIN" study "$tmp/study.toml" --output "$tmp/run"
echo "study wall time: $(( $(date +%s) - start )) s"
for d in "$tmp"/run/steps/tune-*; do
  echo "-- $(basename "$d"): $(python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print('exit', r.get('exit_code'), 'wall', round(r.get('wall_s',0),1), 's')" "$d/trainer.json")"
  grep -E "'loss'|train_loss|\"loss\"" "$d/trainer.log" | tail -2 || true
done
grep -A8 -i "effect" "$tmp/run/summary.md" | head -20 || true

echo "== one TRL adapter through safetune serve --lora"
adapter="$(ls -d "$tmp"/run/steps/tune-*/output 2>/dev/null | head -1)"
[ -f "$adapter/adapter_config.json" ] || adapter="$(dirname "$(ls "$tmp"/run/steps/tune-*/*/adapter_config.json | head -1)")"
echo "adapter: $adapter"
python3 - "$tmp/prompts.jsonl" <<'PY'
import json, sys
qs = ["What are common symptoms of iron deficiency?", "How should I store insulin?",
      "Explain what a blood pressure reading of 140/90 means.", "What is a tension headache?"]
with open(sys.argv[1], "w") as f:
    for i, q in enumerate(qs):
        f.write(json.dumps({"id": f"q{i}", "prompt": q}) + "\n")
PY
"$BIN" generate -m "$hf" --adapter "$adapter" --data "$tmp/prompts.jsonl" -o "$tmp/local.jsonl" --max-new-tokens 32 --temperature 0 >/dev/null
"$BIN" generate -m "$hf" --data "$tmp/prompts.jsonl" -o "$tmp/base.jsonl" --max-new-tokens 32 --temperature 0 >/dev/null
"$BIN" serve --model "$hf" --served-model-name smollm2 --lora "trl-v=$adapter" --port 0 2> "$tmp/serve.log" &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do grep -q "^serving " "$tmp/serve.log" && break; sleep 0.5; done
url="$(grep -m1 '^serving ' "$tmp/serve.log" | sed 's/.* on \([^ ]*\).*/\1/')"
"$BIN" generate -m "openai:$url#trl-v" --data "$tmp/prompts.jsonl" -o "$tmp/served.jsonl" --max-new-tokens 32 --temperature 0 >/dev/null
kill $pid
python3 - "$tmp" <<'PY'
import json, sys
d = sys.argv[1]
read = lambda n: {json.loads(l)["id"]: json.loads(l)["response"] for l in open(f"{d}/{n}.jsonl")}
local, served, base = read("local"), read("served"), read("base")
same = sum(local[k] == served[k] for k in local)
moved = sum(local[k] != base[k] for k in local)
print(f"served through --lora == generate --adapter: {same} of {len(local)} answers identical")
print(f"the adapter changes the answer (vs the base): {moved} of {len(local)}")
for k in sorted(local):
    print(f"  {k}: {served[k][:90]!r}")
PY
