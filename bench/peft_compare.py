#!/usr/bin/env python3
"""LoRA adapters: safetune against Python PEFT, both directions, on the same base weights.

Not run by CI. Needs torch, transformers, peft and safetensors (e.g. installed with
`pip install --target /tmp/torchpeer torch transformers peft safetensors`, then
PYTHONPATH=/tmp/torchpeer), and the safetune binary plus the peft_fixture example:

    cargo build -p safetune && cargo build -p safetune-train --example peft_fixture
    PYTHONPATH=/tmp/torchpeer python3 bench/peft_compare.py [--base smollm2|tiny]

Steps:
1. The base as a Hugging Face directory: `safetune merge` without an adapter converts the GGUF
   (dequantized to f32) or the test suite's tiny model, so both sides read the same weights.
2. PEFT -> safetune: PEFT wraps the base with a LoRA on all seven projections, B made nonzero,
   saves it; `safetune debug-logits --adapter` loads it; logits compared with PEFT's.
3. safetune -> PEFT: the peft_fixture example writes a random adapter; PEFT loads it (any
   warning fails the run); logits compared with `safetune debug-logits --adapter`.

With --write-fixture DIR (tiny base only) the PEFT-written adapter and PEFT's logits are stored
for the Rust test suite (crates/model/tests/fixtures/peft_tiny).
"""

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TEXT = "<|im_start|>user\nWhat is the capital of France? Answer briefly.<|im_end|>\n<|im_start|>assistant\n"


def run(cmd):
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(map(str, cmd))}\n{r.stderr}")
    return r.stdout.strip()


def safetune_logits(exe, model, ids, adapter=None):
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "logits.json"
        cmd = [exe, "debug-logits", "--model", model, "--ids", ",".join(map(str, ids)), "-o", out]
        if adapter:
            cmd += ["--adapter", adapter]
        run(cmd)
        return json.loads(out.read_text())["logits"]


class Captured(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(record.getMessage())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", choices=["smollm2", "tiny"], default="smollm2")
    ap.add_argument("--safetune", default=str(ROOT / "target/debug/safetune"))
    ap.add_argument("--fixture-bin", default=str(ROOT / "target/debug/examples/peft_fixture"))
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--write-fixture", metavar="DIR")
    ap.add_argument("--work", metavar="DIR", help="keep intermediate files here")
    args = ap.parse_args()

    import torch
    import peft
    import transformers
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    work = Path(args.work or tempfile.mkdtemp(prefix="peft_compare."))
    work.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}; work dir {work}")

    # 1. The base as a Hugging Face directory.
    hf = work / "base-hf"
    if not hf.exists():
        if args.base == "tiny":
            src = work / "tiny"
            if not src.exists():
                run([args.fixture_bin, "tiny", src])
        else:
            home = Path(os.environ.get("SAFETUNE_HOME", Path.home() / ".cache/safetune"))
            src = home / "assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
        run([args.safetune, "merge", "--model", src, "-o", hf])
    tok = AutoTokenizer.from_pretrained(hf)
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    if args.base == "tiny":
        ids = ids[:24]
    print(f"{len(ids)} tokens")
    base = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    x = torch.tensor([ids])
    with torch.no_grad():
        base_logits = base(x).logits[0]
    st_base = torch.tensor(safetune_logits(args.safetune, hf, ids))
    print(f"base: safetune vs transformers max abs diff {(st_base - base_logits).abs().max().item():.3g}")

    # 2. PEFT -> safetune.
    cfg = LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=TARGETS, lora_dropout=0.0,
                     bias="none", task_type="CAUSAL_LM")
    pm = get_peft_model(base, cfg)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    pm.eval()
    with torch.no_grad():
        peft_logits = pm(x).logits[0]
    py_dir = work / "adapter-peft"
    pm.save_pretrained(py_dir)
    base = pm.unload()  # the plain base again, for step 3
    st = torch.tensor(safetune_logits(args.safetune, hf, ids, adapter=py_dir))
    effect = (peft_logits - base_logits).abs().max().item()
    d1 = (st - peft_logits).abs().max().item()
    print(f"PEFT-written adapter loaded by safetune: max abs diff {d1:.3g} (adapter moves logits by up to {effect:.3g})")

    if args.write_fixture:
        if args.base != "tiny":
            sys.exit("--write-fixture needs --base tiny")
        out = Path(args.write_fixture)
        out.mkdir(parents=True, exist_ok=True)
        for f in ["adapter_config.json", "adapter_model.safetensors"]:
            (out / f).write_bytes((py_dir / f).read_bytes())
        (out / "expected_logits.json").write_text(json.dumps(
            {"generator": "bench/peft_compare.py --base tiny --write-fixture",
             "peft": peft.__version__, "ids": ids,
             "logits": [[round(v, 6) for v in row] for row in peft_logits.tolist()]}))
        print(f"fixture written to {out}")

    # 3. safetune -> PEFT.
    rs_dir = work / "adapter-safetune"
    if not rs_dir.exists():
        run([args.fixture_bin, "random-adapter", hf, rs_dir, args.rank, args.alpha, args.seed + 1])
    def load_capturing(model, adapter_dir):
        handler = Captured()
        loggers = [logging.getLogger(n) for n in ["peft", "transformers"]]
        for lg in loggers:
            lg.addHandler(handler)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loaded = PeftModel.from_pretrained(model, adapter_dir).eval()
        for lg in loggers:
            lg.removeHandler(handler)
        return loaded, [str(w.message) for w in caught] + handler.records

    # PEFT loading its own adapter is the baseline: only warnings beyond it count.
    own, baseline = load_capturing(base, py_dir)
    base = own.unload()
    loaded, seen = load_capturing(base, rs_dir)
    problems = [w for w in seen if w not in baseline]
    with torch.no_grad():
        peft_logits2 = loaded(x).logits[0]
    st2 = torch.tensor(safetune_logits(args.safetune, hf, ids, adapter=rs_dir))
    d2 = (st2 - peft_logits2).abs().max().item()
    effect2 = (peft_logits2 - base_logits).abs().max().item()
    print(f"safetune-written adapter loaded by PEFT: {len(problems)} warnings beyond PEFT's own adapter's {len(baseline)}; max abs diff {d2:.3g} (adapter moves logits by up to {effect2:.3g})")
    for p in problems:
        print(f"  warning: {p}")
    if problems:
        sys.exit(1)


if __name__ == "__main__":
    main()
