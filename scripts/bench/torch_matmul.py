#!/usr/bin/env python3
"""GFLOP/s of one 512 x 4096 x 4096 matmul in PyTorch on 2 threads, f32 and bf16: tells whether
this CPU's bf16 GEMMs run on AMX tiles (several times the f32 rate) or not (about the f32 rate
or twice it with AVX512-BF16). Usage: python scripts/bench/torch_matmul.py"""
import time

import torch

torch.set_num_threads(2)
for dtype in [torch.float32, torch.bfloat16]:
    a = torch.randn(512, 4096, dtype=dtype)
    b = torch.randn(4096, 4096, dtype=dtype)
    for _ in range(2):
        a @ b
    start, n = time.perf_counter(), 5
    for _ in range(n):
        a @ b
    seconds = (time.perf_counter() - start) / n
    print(f"{dtype}: {2 * 512 * 4096 * 4096 / seconds / 1e9:.0f} GFLOP/s")
