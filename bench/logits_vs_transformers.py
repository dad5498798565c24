#!/usr/bin/env python3
"""Logits of safetune's decoder against Python transformers loading the same GGUF file.

Not run by CI. Needs torch, transformers and the `gguf` package (transformers' GGUF loader), e.g.
`pip install --target /tmp/torchpeer torch transformers gguf`, then PYTHONPATH=/tmp/torchpeer:

    cargo build -p safetune
    PYTHONPATH=/tmp/torchpeer python3 bench/logits_vs_transformers.py [--gguf FILE] [--quantized]

transformers dequantizes the GGUF to f32; so does safetune by default (--quantized compares
safetune's quantized path instead). For each fixed prompt, rendered with the model's chat template
by transformers' tokenizer, both sides compute the logits at every position of the same token ids;
the script prints the maximum absolute difference per prompt and overall, and whether the
next-token argmax agrees at every position. Target (issue 3): at most 1e-3 on the f32 path.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain recursion to a child, with one example in Python: def f(n): ...",
    "Translate 'Guten Morgen, wie geht's?' into English. 🙂",
    "List three prime numbers greater than 100.",
]


def safetune_logits(exe, gguf, ids, quantized):
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "logits.json"
        cmd = [exe, "debug-logits", "--model", gguf, "--ids", ",".join(map(str, ids)), "-o", str(out)]
        if quantized:
            cmd.append("--quantized")
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"safetune failed: {r.stderr}")
        return json.loads(out.read_text())["logits"]


def main():
    home = Path(os.environ.get("SAFETUNE_HOME", Path.home() / ".cache/safetune"))
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", default=str(home / "assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--exe", default=str(ROOT / "target/debug/safetune"))
    ap.add_argument("--quantized", action="store_true")
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(args.gguf)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.eval()

    worst, agree, positions = 0.0, 0, 0
    for prompt in PROMPTS:
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            ref = model(torch.tensor([ids])).logits[0]
        ours = torch.tensor(safetune_logits(args.exe, str(gguf), ids, args.quantized))
        diff = (ours - ref).abs().max().item()
        same = (ours.argmax(-1) == ref.argmax(-1)).sum().item()
        worst, agree, positions = max(worst, diff), agree + same, positions + len(ids)
        print(f"{len(ids):4d} tokens  max |diff| {diff:.3e}  argmax agrees {same}/{len(ids)}  {prompt[:40]!r}")
    path = "quantized" if args.quantized else "f32 (dequantized)"
    print(f"safetune {path} vs transformers: max |diff| {worst:.3e} over {positions} positions, "
          f"argmax agrees at {agree}/{positions}")


if __name__ == "__main__":
    main()
