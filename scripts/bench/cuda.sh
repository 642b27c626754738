#!/usr/bin/env bash
# Runs the CUDA checks and benchmarks on a machine with an NVIDIA GPU and the CUDA toolkit
# (nvcc, NVRTC), with binaries built elsewhere (a GPU machine may have no Rust toolchain):
#   CUDARC_CUDA_VERSION=13000 cargo test --release --no-run --workspace \
#       --features cuda,tensor-peft-adapters/test-cuda        # add cuda-autotune / cuda-fusion to try them
# (the tpeft binary and the adapters' `numerics` test binary come out of that one build;
# CUDARC_CUDA_VERSION must match the machine's driver/toolkit, 13000 = CUDA 13.0).
#
# Usage: scripts/bench/cuda.sh <tests|finetune|adapters|train-step|all> <tpeft> <numerics> <out-dir>
#   tests       the adapters' numerical test-suite instantiated on the CUDA backend
#   finetune    the README's SmolLM2 chatterbot recipe (30 steps of 4 x 64, LoRA r=8 on q,v) twice:
#               cold (empty kernel cache), then warm (kernels from the first run's cache), with
#               the wall time of each; needs assets/ (scripts/fetch-assets.sh) next to the binary
#   adapters    tpeft bench: linear (d 1024 and 4096, N 512 and 2048), contraction, merged, scoring
#   train-step  tpeft bench --suite train-step on llama2-7b (random weights), bf16, batch 4x512, then
#               scripts/bench/llama7b_peft_train_step_gpu.py (transformers + PEFT) on the same card;
#               the GPU memory of each process is sampled by nvidia-smi every 100 ms
# Each step runs under `timeout` (limits below): Burn's CUDA backend compiles every kernel with
# NVRTC at first use, which took the whole 8 minutes of the first H100 session with autotuning and
# fusion on (so both are off by default: features cuda-autotune, cuda-fusion). tpeft keeps the
# compiled kernels (PTX) and autotune results in $TPEFT_KERNEL_CACHE (here $out/kernel-cache,
# emptied first so that the first run is cold): a later run skips NVRTC for every kernel it has.
set -uo pipefail
mode=$1 tpeft=$2 numerics=$3 out=$4
# Per-step time limits (seconds) that keep `all` inside 8 minutes of device time (7.5 in sum);
# STEP_TIMEOUT overrides them all.
t_tests=${STEP_TIMEOUT:-60} t_cold=${STEP_TIMEOUT:-90} t_warm=${STEP_TIMEOUT:-45} t_adapters=${STEP_TIMEOUT:-45}
t_step=${STEP_TIMEOUT:-120} t_torch=${STEP_TIMEOUT:-90}
mkdir -p "$out"
export TPEFT_KERNEL_CACHE=$out/kernel-cache
rm -rf "$TPEFT_KERNEL_CACHE"

# NVRTC and the headers it compiles against come from the toolkit; the driver from the system.
nvcc_path=$(command -v nvcc || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
export CUDA_PATH=${CUDA_PATH:-$(dirname "$(dirname "$nvcc_path")")}
nvrtc_dir=$(dirname "$(find "$CUDA_PATH"/ /usr/local/cuda*/ -name 'libnvrtc.so*' 2>/dev/null | head -1)")
export LD_LIBRARY_PATH=$nvrtc_dir:${LD_LIBRARY_PATH:-}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$out/device.txt"
echo "CUDA_PATH=$CUDA_PATH nvrtc=$nvrtc_dir" | tee -a "$out/device.txt"

# Peak GPU memory used by the processes started by `$@` (nvidia-smi samples, MiB), into $out/$name.mem.
sampled() {
    local name=$1
    shift
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >"$out/$name.mem.log" &
    local sampler=$!
    local idle
    idle=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
    "$@"
    local rc=$?
    kill $sampler
    sort -n "$out/$name.mem.log" | tail -1 | awk -v idle="$idle" -v n="$name" \
        '{ printf "%s: peak GPU memory %d MiB (%d MiB before the process)\n", n, $1 - idle, idle }' | tee "$out/$name.mem"
    return $rc
}

status=0
if [[ $mode == tests || $mode == all ]]; then
    timeout "$t_tests" "$numerics" cuda:: --test-threads=1 2>&1 | tee "$out/tests-cuda.log" || status=1
fi
if [[ $mode == finetune || $mode == all ]]; then
    model=assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    for run in cold warm; do
        start=$(date +%s.%N)
        limit=$t_cold
        [[ $run == warm ]] && limit=$t_warm
        timeout "$limit" "$tpeft" --backend cuda finetune --model "$model" --task causal-lm --train builtin:chatterbot \
            --valid-percent 3 --epochs 1 --max-steps 30 --batch-size 4 --max-len 64 --seed 7 --method lora \
            --rank 8 --alpha 16 --lr 1e-3 --overwrite --output "$out/finetune-$run" 2>&1 | tee "$out/finetune-$run.log" \
            || status=1
        echo "finetune ($run kernel cache): $(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }') s" | tee -a "$out/finetune-times.txt"
    done
fi
if [[ $mode == adapters || $mode == all ]]; then
    timeout "$t_adapters" "$tpeft" --backend cuda bench --suite linear,contraction,merged,scoring --dims 1024,4096 \
        --tokens 512,2048 --repeats 20 --json "$out/adapters-cuda.json" 2>&1 | tee "$out/adapters-cuda.txt" || status=1
fi
if [[ $mode == train-step || $mode == all ]]; then
    sampled tpeft timeout "$t_step" "$tpeft" --backend cuda bench --suite train-step --model llama2-7b --train-shape 4x512 \
        --dtype bf16 --repeats 5 --json "$out/train-step-cuda.json" 2>&1 | tee "$out/train-step-cuda.txt" || status=1
    here=$(dirname "$0")
    PYTHONUNBUFFERED=1 sampled torch timeout "$t_torch" python3 "$here/llama7b_peft_train_step_gpu.py" 10 sdpa \
        2>&1 | tee "$out/train-step-torch.jsonl" || status=1
fi
exit $status
