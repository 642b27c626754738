#!/usr/bin/env python3
"""The transformers + PEFT side of `tpeft bench --suite train-step --model llama2-7b --base-dtype
bf16 --train-shape BxT` on this CPU: a LLaMA-2-7B-shaped model with random weights (HF's init,
created directly in bf16: an f32 7B model would not fit in 24 GiB; speed does not depend on the
values), one fine-tuning step of LoRA r=8 (alpha 16, no dropout, adapters in fp32 as PEFT keeps
them over a bf16 base) on q_proj,v_proj -- forward, causal-LM loss on every next token, backward,
global-norm clipping at 1.0, AdamW (lr 1e-4, weight decay 0.01, eps 1e-8). Same token ids as the
Rust suite. Prints one JSON line: the median step time over `repeats` steps after one warm-up step,
tokens/s, the peak RSS of one more step with the kernel's peak counter reset before it (as the Rust
suite measures), and the process's peak RSS.

Usage: python scripts/bench/llama7b_peft_train_step_cpu.py [BxT] [repeats] [threads]
(needs torch, transformers, peft; default 1x128, 2 repeats, all cores)
"""
import json
import os
import sys
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from peft_step import peak_rss_mib, time_steps, token_ids, train_step


def main():
    batch, seq = (int(v) for v in (sys.argv[1] if len(sys.argv) > 1 else "1x128").split("x"))
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    threads = int(sys.argv[3]) if len(sys.argv) > 3 else os.cpu_count()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = LlamaConfig(  # LLaMA-2-7B's config.json
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    start = time.perf_counter()
    torch.set_default_dtype(torch.bfloat16)
    model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    build_s = time.perf_counter() - start
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    model.train()
    ids = token_ids(batch, seq, config.vocab_size)
    run_step, trainable = train_step(model, ids)
    params = sum(p.numel() for p in trainable)

    def step():
        return float(run_step().detach())

    loss, step_ms, times, step_peak = time_steps(step, repeats)
    print(json.dumps({
        "suite": "train-step", "stack": f"torch {torch.__version__} + transformers + peft",
        "threads": torch.get_num_threads(), "model": "llama2-7b (random weights)", "base_dtype": "bf16",
        "adapter_dtype": str(trainable[0].dtype), "method": "lora r=8", "batch": batch, "seq": seq,
        "adapter_params": params, "build_s": build_s, "step_ms": step_ms, "step_ms_all": times,
        "tokens_per_s": batch * seq / (step_ms / 1e3), "loss": loss,
        "peak_rss_mib": step_peak, "process_peak_rss_mib": peak_rss_mib(),
    }), flush=True)


if __name__ == "__main__":
    main()
