#!/usr/bin/env bash
# The VADER movie-review recipe of the README, run with tpeft: MiniLM, query+value adapters,
# 80/10/10 split (seed 1234), max length 64, batch 32, 2 epochs (EPOCHS), AdamW (wd 0.01), 6% warmup then
# linear decay, global-norm clipping at 1.0; the head always at lr 1e-3.
#   LoRA r=8, alpha 16, lr 1e-3        (the recipe of scripts/reference/vader_peft_lora.py)
#   TT-LoRA (a) rank 4, shape 4,4,4,6,6,4,4,4 (8 cores), alpha 16, adapter lr 5e-3   (5,760 params)
#   TT-LoRA (b) rank 4, shape 8,6,8,8,6,8 (6 cores), alpha 16, adapter lr 1e-2         (6,144 params)
#   TT-LoRA (k) as (b) with LoRA+: inner cores lr 5e-3, the zero-initialised last core 4x (2e-2)
# Usage: bash scripts/reference/vader_recipe.sh [output-root]   (default runs/vader)
#   EPOCHS=3 bash scripts/reference/vader_recipe.sh runs/vader-3ep   the 3-epoch variant (README)
#   (python scripts/reference/vader_peft_lora.py --epochs 3 for PEFT's side; compare the runs pairwise
#   with scripts/reference/paired_test.py)
set -euo pipefail
root=${1:-runs/vader}
tpeft=${TPEFT:-target/debug/tpeft}
epochs=${EPOCHS:-2}
common=(finetune --model assets/all-minilm-l6-v2 --task classification --train builtin:vader-movie-reviews
  --valid-percent 10 --test-percent 10 --targets query,value --epochs "$epochs" --batch-size 32 --max-len 64
  --seed 1234 --weight-decay 0.01 --warmup-ratio 0.06 --max-grad-norm 1.0 --head-lr 1e-3 --overwrite)
"$tpeft" "${common[@]}" --method tt-lora --rank 4 --alpha 16 --tt-shape 4,4,4,6,6,4,4,4 --lr 5e-3 --output "$root/tt-lora"
"$tpeft" "${common[@]}" --method tt-lora --rank 4 --alpha 16 --tt-shape 8,6,8,8,6,8 --lr 1e-2 --output "$root/tt-lora-b"
"$tpeft" "${common[@]}" --method tt-lora --rank 4 --alpha 16 --tt-shape 8,6,8,8,6,8 --lr 5e-3 --loraplus-lr-ratio 4 --output "$root/tt-lora-k"
"$tpeft" "${common[@]}" --method lora --rank 8 --alpha 16 --lr 1e-3 --output "$root/lora"
