#!/usr/bin/env bash
# SmolLM2-135M-Instruct (GGUF) instruction-tuned on the chatterbot-corpus conversations with LoRA
# and with TT-LoRA (q_proj, v_proj): 30 optimizer steps of 4 conversations, max length 64, 3 % of
# the conversations held out; validation before training and after. Then the adapters are
# reloaded for generation.
# Usage: bash scripts/reference/smollm2_chatterbot.sh [output-root]   (default runs/smollm2)
set -euo pipefail
root=${1:-runs/smollm2}
tpeft=${TPEFT:-target/debug/tpeft}
model=assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
common=(finetune --model "$model" --task causal-lm --train builtin:chatterbot --valid-percent 3
  --epochs 1 --max-steps 30 --batch-size 4 --max-len 64 --seed 7 --eval-before-training --overwrite)
"$tpeft" "${common[@]}" --method lora --rank 8 --alpha 16 --lr 1e-3 --output "$root/lora"
"$tpeft" "${common[@]}" --method tt-lora --rank 5 --lr 5e-3 --output "$root/tt-lora"   # rank 5: the default when recorded
for m in lora tt-lora; do
  echo "== generate with $m"
  "$tpeft" generate --model "$model" --adapter "$root/$m" --chat --prompt "Hello, how are you?" --max-new-tokens 24
done
