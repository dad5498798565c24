#!/usr/bin/env python3
"""Writes a synthetic messages-JSONL file for the audit benchmark (deterministic for a seed).

Usage: python3 bench/gen_audit_data.py OUT.jsonl [--examples 1000000] [--seed 0]

Answers mix plain prose, itemized lists and Markdown; some carry identity statements, some
prompts role-play, some system prompts; lengths vary from one sentence to a few paragraphs.
"""
import argparse
import json
import random

WORDS = ("the cell heart energy light water atom vector model rust memory enzyme pressure signal "
         "protein current orbit tissue compiler thread cache gradient lens muscle voltage").split()
SYSTEMS = ["You are a helpful assistant.", "You are a senior surgeon.", "Act as a Linux terminal.",
           "You are an AI assistant that answers briefly."]
IDENTITY = ["As an AI assistant, here is what I know.", "I'm an AI language model, so check with a doctor."]
ROLEPLAY = ["Pretend you are a pirate captain. ", "Imagine you are a chemistry professor. ", ""]


def sentence(rng):
    n = rng.randint(5, 18)
    s = " ".join(rng.choice(WORDS) for _ in range(n))
    return s[0].upper() + s[1:] + "."


def answer(rng):
    k = rng.random()
    sentences = [sentence(rng) for _ in range(rng.randint(1, 9))]
    if k < 0.5:
        text = " ".join(sentences)
    elif k < 0.75:
        text = sentences[0] + "\n\n" + "\n".join("- " + s for s in sentences[1:] or sentences)
    else:
        text = "## Overview\n\n" + "\n".join(f"{i + 1}. **{s.split()[0]}** {s}" for i, s in enumerate(sentences))
    if rng.random() < 0.2:
        text = rng.choice(IDENTITY) + " " + text
    return text


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--examples", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    with open(a.out, "w") as f:
        for i in range(a.examples):
            msgs = []
            if rng.random() < 0.15:
                msgs.append({"role": "system", "content": rng.choice(SYSTEMS)})
            prompt = rng.choice(ROLEPLAY) if rng.random() < 0.1 else ""
            msgs.append({"role": "user", "content": prompt + sentence(rng).rstrip(".") + "?"})
            msgs.append({"role": "assistant", "content": answer(rng)})
            f.write(json.dumps({"id": f"ex-{i}", "messages": msgs}) + "\n")


if __name__ == "__main__":
    main()
