#!/usr/bin/env python3
"""Training data for the LoRA benchmarks: 16 conversations whose answers run past 256 tokens, so
every row is cut to exactly 256 tokens (batch 8 x 256 = 2048 input tokens a step).

    python3 bench/gen_train_data.py OUT.jsonl
"""
import json
import sys

WORDS = ("the patient should rest drink water and watch for fever while the body heals "
         "doctors advise gentle exercise balanced meals and regular sleep for recovery").split()

with open(sys.argv[1], "w") as f:
    for i in range(16):
        answer = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(400))
        f.write(json.dumps({"id": f"m{i}", "messages": [
            {"role": "user", "content": f"Question {i}: how should I recover?"},
            {"role": "assistant", "content": answer}]}) + "\n")
