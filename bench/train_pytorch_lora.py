#!/usr/bin/env python3
"""PyTorch + PEFT peer for safetune's LoRA training step (issue 4, point 9), and with --full for
full fine-tuning (every weight trained, no PEFT). Not run in CI.

    python3 bench/train_pytorch_lora.py --model DIR --data data/medical.jsonl \
        [--steps 50 --batch 8 --seq 256 --rank 16 --alpha 32 --lr 2e-4 --threads 2 --full --out FILE]

DIR is a Hugging Face directory of SmolLM2-135M-Instruct in f32, e.g. written from the GGUF in
the asset cache by `safetune merge --model <gguf> -o DIR` (dequantized, the same weights the Rust
trainer starts from). Each conversation (messages JSONL) is rendered with the model's chat
template; loss is on assistant tokens only; rows are packed to --seq tokens (examples may share a
row; like a plain causal LM they then attend across the boundary, which costs the same). LoRA r on
q, k, v, o, gate, up, down; AdamW. Prints one JSON line per step and a summary with tokens/s
(input tokens, after --warmup steps), the loss after the last step, peak RSS and the kernel ISA
ATen dispatched to (`torch.backends.cpu.get_cpu_capability()`; ATEN_CPU_CAPABILITY,
MKL_ENABLE_INSTRUCTIONS and ONEDNN_MAX_CPU_ISA restrict it, see bench/README.md).
"""
import argparse
import json
import resource
import sys
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, torch_dtype=torch.float32)
    if not a.full:
        cfg = LoraConfig(
            r=a.rank,
            lora_alpha=a.alpha,
            lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, cfg)
    model.train()

    # Encode: assistant-only labels from the lengths of rendered prefixes.
    examples = []
    with open(a.data) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            msgs = json.loads(line)["messages"]
            ids, labels = [], []
            for i, m in enumerate(msgs):
                prefix = tok.apply_chat_template(msgs[: i + 1], tokenize=True)
                if hasattr(prefix, "input_ids"):
                    prefix = prefix["input_ids"]
                new = prefix[len(ids):]
                ids = list(prefix)
                labels += new if m["role"] == "assistant" else [-100] * len(new)
            examples.append((ids[: a.seq], labels[: a.seq]))
    # Pack into rows of --seq tokens.
    rows, cur_i, cur_l = [], [], []
    for ids, labels in examples:
        if len(cur_i) + len(ids) > a.seq and cur_i:
            rows.append((cur_i, cur_l))
            cur_i, cur_l = [], []
        cur_i += ids
        cur_l += labels
    if cur_i:
        rows.append((cur_i, cur_l))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0

    def batch(step):
        sel = [rows[(step * a.batch + j) % len(rows)] for j in range(a.batch)]
        ids = torch.full((a.batch, a.seq), pad, dtype=torch.long)
        lab = torch.full((a.batch, a.seq), -100, dtype=torch.long)
        att = torch.zeros((a.batch, a.seq), dtype=torch.long)
        for j, (i_, l_) in enumerate(sel):
            ids[j, : len(i_)] = torch.tensor(i_)
            lab[j, : len(l_)] = torch.tensor(l_)
            att[j, : len(i_)] = 1
        return ids, lab, att

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=a.lr, weight_decay=0.0)
    times, tokens, losses = [], [], []
    for step in range(a.steps):
        ids, lab, att = batch(step)
        t0 = time.perf_counter()
        out = model(input_ids=ids, attention_mask=att, labels=lab)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        n = int(att.sum())
        losses.append(float(out.loss))
        if step >= a.warmup:
            times.append(dt)
            tokens.append(ids.numel())
        print(json.dumps({"step": step + 1, "loss": losses[-1], "seconds": dt, "tokens": ids.numel(), "real_tokens": n}), flush=True)
    summary = {
        "peer": "pytorch" if a.full else "pytorch+peft",
        "mode": "full" if a.full else "lora",
        "torch": torch.__version__,
        "isa": torch.backends.cpu.get_cpu_capability(),
        "mkl": torch.backends.mkl.is_available(),
        "threads": a.threads,
        "steps": a.steps,
        "batch": a.batch,
        "seq": a.seq,
        "tokens_per_s": sum(tokens) / max(sum(times), 1e-9),
        "step_s_median": sorted(times)[len(times) // 2] if times else None,
        "final_loss": losses[-1] if losses else None,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    print(json.dumps(summary), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(summary, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
