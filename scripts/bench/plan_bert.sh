#!/usr/bin/env bash
# `tpeft plan`'s estimate against the measured peak RSS of all-MiniLM-L6-v2 classification runs
# whose every batch is full length (300-word texts truncated to --max-len): the plan assumes
# full-length batches, so on short texts (padded to the longest in the batch) it is an upper bound.
# Usage: bash scripts/bench/plan_bert.sh [output dir]   (needs target/release/tpeft and the assets)
set -euo pipefail
root=${1:-runs/plan-bert}
tpeft=${TPEFT:-target/release/tpeft}
model=assets/all-minilm-l6-v2
mkdir -p "$root"
python3 - "$root/long.jsonl" <<'PY'
import json, random, sys
random.seed(0)
words = "the movie was good bad great awful plot actor scene film story long short funny boring".split()
with open(sys.argv[1], "w") as f:
    for _ in range(640):
        text = " ".join(random.choice(words) for _ in range(300))
        f.write(json.dumps({"text": text, "label": random.choice(["pos", "neg"])}) + "\n")
PY
echo "| run | estimate (MiB) | peak RSS (MiB) | error |"
echo "|---|---:|---:|---:|"
for cfg in "lora f32 32 64" "lora f32 64 128" "tt-lora q8_0 64 128" "lora f32 16 256"; do
  set -- $cfg
  method=$1 dtype=$2 batch=$3 len=$4
  if [ "$method" = tt-lora ]; then extra="--rank 4 --tt-shape 8,6,8,8,6,8 --alpha 16"; else extra="--rank 8"; fi
  # shellcheck disable=SC2086
  est=$("$tpeft" plan --model $model --method "$method" $extra --targets query,value --base-dtype "$dtype" \
    --batch-size "$batch" --max-len "$len" | tail -1 | sed -E 's/[^0-9]//g')
  log="$root/$method-$dtype-$batch-$len.log"
  # shellcheck disable=SC2086
  /usr/bin/time -f "peak_rss_kb %M" "$tpeft" finetune --model $model --task classification --train "$root/long.jsonl" \
    --test-percent 10 --method "$method" $extra --targets query,value --lr 5e-3 --epochs 1 --max-steps 10 \
    --batch-size "$batch" --max-len "$len" --base-dtype "$dtype" --seed 3 --overwrite \
    --output "$root/$method-$dtype-$batch-$len" > "$log" 2>&1
  rss=$(( $(grep peak_rss_kb "$log" | awk '{print $2}') / 1024 ))
  err=$(awk -v e="$est" -v m="$rss" 'BEGIN { printf "%+.1f %%", 100 * (e - m) / m }')
  echo "| $method $dtype ${batch}×$len | $est | $rss | $err |"
done
