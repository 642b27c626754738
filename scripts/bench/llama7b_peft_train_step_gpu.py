#!/usr/bin/env python3
"""The transformers + PEFT side of `tpeft bench --backend cuda --dtype bf16 --suite train-step
--model llama2-7b --train-shape 4x512` on a CUDA GPU: a LLaMA-2-7B-shaped model with random weights
(HF's init; speed does not depend on the values) in bf16, one fine-tuning step of LoRA r=8 (alpha
16, no dropout) on q_proj,v_proj with batch 4 x 512 tokens -- forward, causal-LM loss on every next
token, backward, global-norm clipping at 1.0, AdamW (lr 1e-4, weight decay 0.01, eps 1e-8). Same
token ids as the Rust suite. Prints one JSON line per attention implementation with the median
step time over `repeats` steps after two warm-up steps, tokens/s, and the peak GPU memory that
torch's allocator saw (allocated and reserved) during the timed steps.

Usage: python scripts/bench/llama7b_peft_train_step_gpu.py [repeats] [attn,attn...]
(needs torch with CUDA, transformers, peft; attention implementations default to sdpa,eager)
"""
import json
import statistics
import sys

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from peft_step import token_ids, train_step

BATCH, SEQ = 4, 512


def run(attn, repeats):
    torch.manual_seed(0)
    config = LlamaConfig(  # LLaMA-2-7B's config.json
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
        tie_word_embeddings=False, attn_implementation=attn,
    )
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    torch.cuda.empty_cache()
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    model.train()
    ids = token_ids(BATCH, SEQ, config.vocab_size, device="cuda")
    step, trainable = train_step(model, ids)
    params = sum(p.numel() for p in trainable)
    adapter_dtype = str(trainable[0].dtype)
    vocab = config.vocab_size

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        loss = step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    step_ms = statistics.median(times)
    record = {
        "suite": "train-step", "stack": f"torch {torch.__version__} + transformers + peft", "attention": attn,
        "device": torch.cuda.get_device_name(), "model": "llama2-7b (random weights)", "dtype": "bf16",
        "adapter_dtype": adapter_dtype, "method": "lora r=8", "batch": BATCH, "seq": SEQ, "adapter_params": params,
        "vocab": vocab, "step_ms": step_ms, "step_ms_all": times, "tokens_per_s": BATCH * SEQ / (step_ms / 1e3),
        "loss": float(loss.detach()), "peak_allocated_mib": torch.cuda.max_memory_allocated() / 2**20,
        "peak_reserved_mib": torch.cuda.max_memory_reserved() / 2**20,
    }
    print(json.dumps(record), flush=True)
    del model, optimizer
    torch.cuda.empty_cache()


def main():
    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    attns = sys.argv[2].split(",") if len(sys.argv) > 2 else ["sdpa", "eager"]
    for attn in attns:
        try:
            run(attn, repeats)
        except Exception as error:  # report and go on with the next implementation
            print(json.dumps({"attention": attn, "error": repr(error)}), flush=True)


if __name__ == "__main__":
    main()
