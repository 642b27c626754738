#!/usr/bin/env bash
# Runs the CUDA checks and benchmarks on a machine with an NVIDIA GPU and the CUDA toolkit
# (nvcc, NVRTC), with binaries built elsewhere (a GPU machine may have no Rust toolchain):
#   CUDARC_CUDA_VERSION=13000 cargo test --release --no-run --workspace \
#       --features cuda,tensor-peft-adapters/test-cuda        # add cuda-autotune / cuda-fusion to try them
# (the tpeft binary and the adapters' `numerics` test binary come out of that one build;
# CUDARC_CUDA_VERSION must match the machine's driver/toolkit, 13000 = CUDA 13.0).
#
# Usage: scripts/bench/cuda.sh <tests|adapters|train-step|all> <tpeft> <numerics> <out-dir>
#   tests       the adapters' numerical test-suite instantiated on the CUDA backend
#   adapters    tpeft bench: linear (d 1024 and 4096, N 512 and 2048), contraction, merged, scoring
#   train-step  tpeft bench --suite train-step on llama2-7b (random weights), bf16, batch 4x512, then
#               scripts/bench/llama7b_peft_train_step_gpu.py (transformers + PEFT) on the same card;
#               the GPU memory of each process is sampled by nvidia-smi every 100 ms
# Each step runs under `timeout` ($STEP_TIMEOUT seconds, default 540): Burn's CUDA backend compiles
# every kernel with NVRTC at first use, which took longer than that for the 7B step with autotuning
# and fusion on. Autotune results are cached in ./target/autotune.
set -uo pipefail
mode=$1 tpeft=$2 numerics=$3 out=$4
t=${STEP_TIMEOUT:-540}
mkdir -p "$out"

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
    timeout "$t" "$numerics" cuda:: --test-threads=1 2>&1 | tee "$out/tests-cuda.log" || status=1
fi
if [[ $mode == adapters || $mode == all ]]; then
    timeout "$t" "$tpeft" --backend cuda bench --suite linear,contraction,merged,scoring --dims 1024,4096 \
        --tokens 512,2048 --repeats 20 --json "$out/adapters-cuda.json" 2>&1 | tee "$out/adapters-cuda.txt" || status=1
fi
if [[ $mode == train-step || $mode == all ]]; then
    sampled tpeft timeout "$t" "$tpeft" --backend cuda bench --suite train-step --model llama2-7b --train-shape 4x512 \
        --dtype bf16 --repeats 5 --json "$out/train-step-cuda.json" 2>&1 | tee "$out/train-step-cuda.txt" || status=1
    here=$(dirname "$0")
    PYTHONUNBUFFERED=1 sampled torch timeout "$t" python3 "$here/llama7b_peft_train_step_gpu.py" 10 sdpa \
        2>&1 | tee "$out/train-step-torch.jsonl" || status=1
fi
exit $status
