#!/usr/bin/env python3
"""The transformers side of `tpeft bench --suite model` on SmolLM2-135M-Instruct (GGUF, dequantised
to f32): load time, a 1x64-token forward (median of 7 after a warm-up), 32 greedy tokens with the KV
cache after a 16-token prompt, and peak RSS. Same token ids as the Rust suite.

Usage: python scripts/bench/smollm2_transformers.py [threads]   (needs torch, transformers, gguf, accelerate)
"""
import json
import os
import resource
import statistics
import sys
import time

import torch
from transformers import AutoModelForCausalLM

ASSETS = os.path.join(os.path.dirname(__file__), "..", "..", "assets", "smollm2")


def main():
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else os.cpu_count())
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(ASSETS, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32).eval()
    load_s = time.perf_counter() - start
    vocab = model.config.vocab_size
    ids = torch.tensor([[(i * 7919 + 13) % vocab for i in range(64)]])
    times = []
    with torch.no_grad():
        for k in range(8):
            start = time.perf_counter()
            model(ids)
            if k > 0:
                times.append(time.perf_counter() - start)
        start = time.perf_counter()
        out = model.generate(ids[:, :16], max_new_tokens=32, min_new_tokens=32, do_sample=False)
        gen_s = time.perf_counter() - start
    forward_ms = statistics.median(times) * 1e3
    print(json.dumps({
        "threads": torch.get_num_threads(), "load_s": load_s, "forward_1x64_ms": forward_ms,
        "forward_tokens_per_s": 64 / (forward_ms / 1e3), "generate_tokens_per_s": (out.shape[1] - 16) / gen_s,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))


if __name__ == "__main__":
    main()
