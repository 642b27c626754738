#!/usr/bin/env python3
"""The transformers + PEFT side of `tpeft bench --suite train-step` on SmolLM2-135M-Instruct (GGUF,
dequantised to f32): one fine-tuning step of LoRA r=8 (alpha 16, no dropout) on q_proj,v_proj with
batch 4 x 64 tokens -- forward, causal-LM loss on every next token, backward, global-norm clipping at
1.0, AdamW (lr 1e-4, weight decay 0.01, eps 1e-8). Same token ids as the Rust suite. Prints the
median step time over `repeats` steps after one warm-up step, tokens/s, and the peak RSS of one
more step with the kernel's peak counter reset before it (as the Rust suite does).

Usage: python scripts/bench/smollm2_peft_train_step.py [threads] [repeats]
(needs torch, transformers, peft, gguf, accelerate)
"""
import json
import os
import sys

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from peft_step import peak_rss_mib, time_steps, token_ids, train_step

ASSETS = os.path.join(os.path.dirname(__file__), "..", "..", "assets", "smollm2")
BATCH, SEQ = 4, 64


def main():
    threads = int(sys.argv[1]) if len(sys.argv) > 1 else os.cpu_count()
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 7
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(
        ASSETS, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32
    )
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    model.train()
    ids = token_ids(BATCH, SEQ, model.config.vocab_size)
    step, trainable = train_step(model, ids)
    params = sum(p.numel() for p in trainable)

    _, step_ms, _, step_peak = time_steps(step, repeats)
    print(json.dumps({
        "suite": "train-step", "stack": f"torch {torch.__version__} + peft", "threads": torch.get_num_threads(),
        "method": "lora r=8", "batch": BATCH, "seq": SEQ, "adapter_params": params,
        "step_ms": step_ms, "tokens_per_s": BATCH * SEQ / (step_ms / 1e3),
        "peak_rss_mib": step_peak,
        "process_peak_rss_mib": None if step_peak is not None else peak_rss_mib(),
    }))


if __name__ == "__main__":
    main()
