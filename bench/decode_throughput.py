#!/usr/bin/env python3
"""Decode throughput of safetune against llama.cpp and transformers on the same GGUF, in one run.

Not run by CI. Needs two Python peers, each in its own target directory (they bring different
numpy and OpenMP builds, so each runs in its own subprocess):

    pip install --target /tmp/torchpeer torch transformers gguf accelerate
    CMAKE_BUILD_PARALLEL_LEVEL=2 pip install --target /tmp/llamapeer llama-cpp-python
    cargo build --release -p safetune
    python3 bench/decode_throughput.py [--threads 2] [--runs 2] [--gguf FILE]

Every engine gets the same prompts (safetune's built-in ones: 16 rows of exactly 128 token ids,
row 0 is the batch-1 prompt), decodes greedily exactly 128 new tokens per row with end-of-turn
tokens ignored, and uses the same number of threads. Measured per engine and batch size: prefill
seconds (the prompt forward pass) and decode new tokens/s (batch * 128 / the seconds after the
prefill); the fastest of --runs runs after an untimed warm-up counts. The load average is printed
next to each figure: the machine may be shared.

- safetune: `safetune debug-decode-bench`, once with the GGUF kept quantized (`--quantized`) and
  once dequantized to f32; the same batched generation loop as `safetune generate`.
- llama.cpp (llama-cpp-python): batch 1 through the ordinary `Llama.generate` API; batch 16
  through the low-level bindings, one `llama_batch` holding 16 sequences (`n_seq_max=16`).
- transformers: `AutoModelForCausalLM.from_pretrained(..., gguf_file=...)` (dequantized to f32),
  `generate(do_sample=False, min_new_tokens=max_new_tokens=128)`; the prefill is a separate
  `generate` of one new token, subtracted from the full run.

Targets (issue 3): at least 3x transformers at both batch sizes; at least 0.8x llama.cpp at
batch 1 and ahead of it at batch 16.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load():
    return os.getloadavg()[0]


def thread_env(threads):
    env = dict(os.environ)
    for k in ("RAYON_NUM_THREADS", "CANDLE_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[k] = str(threads)
    return env


# ---------------------------------------------------------------------------------------------
# Peers (each runs in a subprocess: `decode_throughput.py --peer NAME ...`)


def peer_llama(gguf, prompts, new_tokens, threads, runs):
    import ctypes

    import numpy as np
    import llama_cpp as L

    results = {}
    b = len(prompts)
    p = len(prompts[0])
    if b == 1:
        llm = L.Llama(model_path=gguf, n_ctx=p + new_tokens + 16, n_batch=512, n_threads=threads,
                      n_threads_batch=threads, verbose=False)

        def once(ids, n):
            llm.reset()
            t0 = time.perf_counter()
            out, t_first = [], None
            for tok in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0,
                                    repeat_penalty=1.0):
                if t_first is None:
                    t_first = time.perf_counter()
                out.append(tok)
                if len(out) == n:
                    break
            t1 = time.perf_counter()
            return t_first - t0, t1 - t_first, [out]

        api = "Llama.generate"
    else:
        L.llama_backend_init()
        model = L.llama_model_load_from_file(gguf.encode(), L.llama_model_default_params())
        cp = L.llama_context_default_params()
        cp.n_ctx = b * (p + new_tokens)
        cp.n_batch = b * p
        cp.n_seq_max = b
        cp.n_threads = threads
        cp.n_threads_batch = threads
        cp.kv_unified = False
        ctx = L.llama_init_from_model(model, cp)
        n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
        batch = L.llama_batch_init(b * p, 0, 1)

        def logits_of(i):
            ptr = L.llama_get_logits_ith(ctx, i)
            return np.ctypeslib.as_array(ptr, shape=(n_vocab,))

        def once(ids_rows, n):
            L.llama_memory_clear(L.llama_get_memory(ctx), True)
            rows, plen = len(ids_rows), len(ids_rows[0])
            t0 = time.perf_counter()
            k = 0
            for s, ids in enumerate(ids_rows):
                for j, tok in enumerate(ids):
                    batch.token[k] = tok
                    batch.pos[k] = j
                    batch.n_seq_id[k] = 1
                    batch.seq_id[k][0] = s
                    batch.logits[k] = j == plen - 1
                    k += 1
            batch.n_tokens = k
            if L.llama_decode(ctx, batch) != 0:
                sys.exit("llama_decode failed (prefill)")
            last = [s * plen + plen - 1 for s in range(rows)]
            nxt = [int(logits_of(i).argmax()) for i in last]
            t1 = time.perf_counter()
            out = [[t] for t in nxt]
            for step in range(1, n):
                for s in range(rows):
                    batch.token[s] = out[s][-1]
                    batch.pos[s] = plen + step - 1
                    batch.n_seq_id[s] = 1
                    batch.seq_id[s][0] = s
                    batch.logits[s] = True
                batch.n_tokens = rows
                if L.llama_decode(ctx, batch) != 0:
                    sys.exit("llama_decode failed (decode)")
                for s in range(rows):
                    out[s].append(int(logits_of(s).argmax()))
            t2 = time.perf_counter()
            return t1 - t0, t2 - t1, out

        api = "llama_batch, n_seq_max=%d" % b

    warm = [r[:8] for r in prompts]
    once(warm[0] if b == 1 else warm, 4)
    best = None
    for _ in range(runs):
        r = once(prompts[0] if b == 1 else prompts, new_tokens)
        if best is None or r[1] < best[1]:
            best = r
    results = {"prefill_s": best[0], "decode_s": best[1], "output_ids": best[2], "api": api}
    return results


def peer_transformers(gguf, prompts, new_tokens, threads, runs):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    g = Path(gguf)
    model = AutoModelForCausalLM.from_pretrained(g.parent, gguf_file=g.name, dtype=torch.float32)
    model.eval()
    ids = torch.tensor(prompts)
    pad = model.generation_config.eos_token_id
    pad = pad[0] if isinstance(pad, list) else pad

    def gen(x, n):
        with torch.no_grad():
            return model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                  max_new_tokens=n, min_new_tokens=n, pad_token_id=pad)

    gen(ids[:, :8], 4)
    best = None
    for _ in range(runs):
        t0 = time.perf_counter()
        gen(ids, 1)
        t1 = time.perf_counter()
        out = gen(ids, new_tokens)
        t2 = time.perf_counter()
        if out.shape[1] != ids.shape[1] + new_tokens:
            sys.exit(f"transformers generated {out.shape[1] - ids.shape[1]} tokens")
        r = (t1 - t0, (t2 - t1) - (t1 - t0), out[:, ids.shape[1]:].tolist())
        if best is None or r[1] < best[1]:
            best = r
    return {"prefill_s": best[0], "decode_s": best[1], "output_ids": best[2],
            "api": "generate, gguf_file= (f32)"}


# ---------------------------------------------------------------------------------------------
# Driver


def run_safetune(exe, gguf, prompts_file, quantized, threads, runs):
    cmd = [exe, "debug-decode-bench", "--model", gguf, "--prompts", prompts_file,
           "--new-tokens", str(ARGS.new_tokens), "--runs", str(runs)]
    if quantized:
        cmd.append("--quantized")
    r = subprocess.run(cmd, capture_output=True, text=True, env=thread_env(threads))
    if r.returncode != 0:
        sys.exit(f"safetune failed: {r.stderr}")
    return json.loads(r.stdout)


def run_peer(name, path, gguf, prompts_file, threads, runs):
    env = thread_env(threads)
    env["PYTHONPATH"] = path + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, __file__, "--peer", name, "--gguf", gguf, "--peer-prompts",
           prompts_file, "--threads", str(threads), "--runs", str(runs),
           "--new-tokens", str(ARGS.new_tokens)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        sys.exit(f"{name} peer failed: {r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def common_prefix(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main():
    home = Path(os.environ.get("SAFETUNE_HOME", Path.home() / ".cache/safetune"))
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", default=str(home / "assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--exe", default=str(ROOT / "target/release/safetune"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=2, help="timed runs per measurement (best counts)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--engines", default="safetune-q,safetune-f32,llama.cpp,transformers")
    ap.add_argument("--llama-path", default="/tmp/llamapeer")
    ap.add_argument("--torch-path", default="/tmp/torchpeer")
    ap.add_argument("--peer", help=argparse.SUPPRESS)
    ap.add_argument("--peer-prompts", help=argparse.SUPPRESS)
    global ARGS
    ARGS = args = ap.parse_args()

    if args.peer:
        prompts = json.loads(Path(args.peer_prompts).read_text())
        fn = {"llama": peer_llama, "transformers": peer_transformers}[args.peer]
        print(json.dumps(fn(args.gguf, prompts, args.new_tokens, args.threads, args.runs)))
        return

    batches = [int(b) for b in args.batches.split(",")]
    engines = args.engines.split(",")
    # The prompts: safetune's built-in ones, so every engine decodes the same token ids.
    r = subprocess.run([args.exe, "debug-decode-bench", "--model", args.gguf, "--quantized",
                        "--batch", str(max(batches)), "--prompt-tokens", str(args.prompt_tokens),
                        "--new-tokens", "1"], capture_output=True, text=True,
                       env=thread_env(args.threads))
    if r.returncode != 0:
        sys.exit(f"safetune failed: {r.stderr}")
    all_prompts = json.loads(r.stdout)["prompt_ids"]

    print(f"decode throughput: {Path(args.gguf).name}, {args.prompt_tokens}-token prompts, "
          f"{args.new_tokens} new tokens (greedy), {args.threads} threads, best of {args.runs}")
    print(f"{'engine':<34}{'batch':>6}{'prefill s':>11}{'decode tok/s':>14}"
          f"{'end-to-end tok/s':>18}{'load':>7}")
    res = {}
    with tempfile.TemporaryDirectory() as d:
        for b in batches:
            pf = str(Path(d) / f"prompts{b}.json")
            Path(pf).write_text(json.dumps(all_prompts[:b]))
            for eng in engines:
                before = load()
                if eng == "safetune-q":
                    o = run_safetune(args.exe, args.gguf, pf, True, args.threads, args.runs)
                    label = "safetune --quantized"
                elif eng == "safetune-f32":
                    o = run_safetune(args.exe, args.gguf, pf, False, args.threads, args.runs)
                    label = "safetune f32"
                elif eng == "llama.cpp":
                    o = run_peer("llama", args.llama_path, args.gguf, pf, args.threads, args.runs)
                    label = f"llama.cpp ({o['api']})"
                elif eng == "transformers":
                    o = run_peer("transformers", args.torch_path, args.gguf, pf, args.threads,
                                 args.runs)
                    label = "transformers (f32)"
                else:
                    sys.exit(f"unknown engine {eng}")
                total = b * args.new_tokens
                o["tps"] = total / o["decode_s"]
                o["e2e"] = total / (o["prefill_s"] + o["decode_s"])
                o["load"] = max(before, load())
                res[(eng, b)] = o
                print(f"{label:<34}{b:>6}{o['prefill_s']:>11.3f}{o['tps']:>14.1f}"
                      f"{o['e2e']:>18.1f}{o['load']:>7.2f}", flush=True)

    print("\nratios of decode new tokens/s (targets: >= 3x transformers at both batch sizes; "
          ">= 0.8x llama.cpp at batch 1, > 1x at batch 16)")
    for eng in ("safetune-q", "safetune-f32"):
        for b in batches:
            if (eng, b) not in res:
                continue
            parts = []
            for peer in ("transformers", "llama.cpp"):
                if (peer, b) in res:
                    ratio = res[(eng, b)]["tps"] / res[(peer, b)]["tps"]
                    target = 3.0 if peer == "transformers" else (0.8 if b == 1 else 1.0)
                    ok = ratio >= target if not (peer == "llama.cpp" and b > 1) else ratio > target
                    parts.append(f"{ratio:5.2f}x {peer} ({'met' if ok else 'NOT met'})")
            print(f"  {eng:<13} batch {b:>2}: " + ", ".join(parts))
    if ("safetune-q", 1) in res:
        ours = res[("safetune-q", 1)]["output_ids"][0]
        for peer in ("llama.cpp", "transformers", "safetune-f32"):
            if (peer, 1) in res:
                n = common_prefix(ours, res[(peer, 1)]["output_ids"][0])
                print(f"  greedy tokens of safetune --quantized equal to {peer}'s for the first "
                      f"{n} of {len(ours)} (batch 1)")


if __name__ == "__main__":
    main()
