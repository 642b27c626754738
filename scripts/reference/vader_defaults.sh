#!/usr/bin/env bash
# The VADER recipe of the README with every method flag left at its default: only `--method`
# names the adapter (no --rank/--alpha/--tt-shape/--lr/--head-lr/--loraplus-lr-ratio/--targets),
# so each method runs with the recommended settings it prints when the run starts.
# The data and schedule are the recipe's: MiniLM, 80/10/10 split (seed 1234), max length 64,
# batch 32, 2 epochs, AdamW (wd 0.01), 6% warmup then linear decay, clipping at 1.0.
# Usage: bash scripts/reference/vader_defaults.sh [output-root] [method …]   (default runs/vader-defaults, every method)
set -euo pipefail
root=${1:-runs/vader-defaults}
shift || true
methods=("$@")
[ ${#methods[@]} -gt 0 ] || methods=(lora tt-lora loretta-rep loretta-adp lotr lorta)
tpeft=${TPEFT:-target/release/tpeft}
common=(finetune --model assets/all-minilm-l6-v2 --task classification --train builtin:vader-movie-reviews
  --valid-percent 10 --test-percent 10 --epochs 2 --batch-size 32 --max-len 64
  --seed 1234 --weight-decay 0.01 --warmup-ratio 0.06 --max-grad-norm 1.0 --overwrite)
for m in "${methods[@]}"; do
  "$tpeft" "${common[@]}" --method "$m" --output "$root/$m"
done
