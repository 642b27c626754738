#!/usr/bin/env bash
# The frozen base at each --base-dtype on SmolLM2-135M-Instruct (GGUF Q4_1): the README's
# chatterbot recipe (LoRA r=8 on q_proj,v_proj, 30 steps of 4 conversations, max length 64), one
# run after another. Prints a Markdown table: validation perplexity after training, the process's
# peak RSS (GNU time), its ratio to the f32 run's, and training tokens/s.
# Usage: bash scripts/bench/base_dtype.sh [output-root [finetune flags...]]   (default
# runs/base-dtype; needs the assets and target/release/tpeft, or TPEFT=path). The flags go to every
# run, e.g. --gradient-checkpointing.
set -euo pipefail
root=${1:-runs/base-dtype}
shift || true
extra=("$@")
tpeft=${TPEFT:-target/release/tpeft}
model=assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p "$root"
echo "| --base-dtype | valid perplexity | peak RSS (MiB) | vs f32 | tokens/s |"
echo "|---|---:|---:|---:|---:|"
base_rss=
for dtype in f32 bf16 q8_0 native q4_0; do
  log="$root/$dtype.log"
  /usr/bin/time -f "peak_rss_kb %M" "$tpeft" finetune --model "$model" --task causal-lm --train builtin:chatterbot \
    --valid-percent 3 --epochs 1 --max-steps 30 --batch-size 4 --max-len 64 --seed 7 --overwrite \
    --method lora --rank 8 --alpha 16 --lr 1e-3 --base-dtype "$dtype" --output "$root/$dtype" ${extra[@]+"${extra[@]}"} > "$log" 2>&1
  ppl=$(grep -E "valid step +30 " "$log" | sed -E 's/.*perplexity=([0-9.]+).*/\1/')
  tps=$(grep -E "^stopped" "$log" | sed -E 's/.*, ([0-9.]+) tokens\/s.*/\1/')
  rss=$(( $(grep peak_rss_kb "$log" | awk '{print $2}') / 1024 ))
  base_rss=${base_rss:-$rss}
  ratio=$(awk -v a="$rss" -v b="$base_rss" 'BEGIN { printf "%.2f", a / b }')
  echo "| $dtype | $ppl | $rss | ${ratio}× | $tps |"
done
