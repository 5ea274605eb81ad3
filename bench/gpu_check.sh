#!/usr/bin/env bash
# The checks that need an NVIDIA GPU, in one run: the tests marked `gpu` (CUDA-graph decode, grouped-GEMM MoE,
# FP8 dequantisation on the device), then decode throughput against transformers in bfloat16 with the
# DeepSeek-V2-Lite-shaped model, eager / CUDA graphs / compile + graphs side by side, with the bandwidth limit;
# then multi-process training throughput (bench/scaling.py, NCCL, bf16) on the GPUs present; with 2+ GPUs also tensor-parallel decode (NCCL, bf16) over 2 GPUs, without and with expert parallelism, and
# the tensor-parallel engine tests on CUDA.
#
#   bash bench/gpu_check.sh [LOG_DIR]      # python3 with torch, transformers, safetensors, tokenizers, pytest
set -euo pipefail
cd "$(dirname "$0")/.."
logs=${1:-.}
mkdir -p "$logs"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
python3 -m pytest -q -m gpu tests/test_static_decode.py tests/test_checkpoint_fp8.py 2>&1 | tee "$logs/gpu_tests.log"
python3 bench/decode.py --device cuda --dtype bfloat16 --preset v2-lite-shaped --batches 1,32 \
    --prompt-len 32 --new-tokens 64 --cuda-graphs --compile 2>&1 | tee "$logs/decode_cuda.log"
# Scale-out training on the GPUs present (NCCL, bf16 parameters / fp32 reduction): tokens/s and weight-sync time
# for 1, 2, 4, ... processes, FSDP only and with expert parallelism over 2 ranks.
gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
if [ "$gpus" -ge 2 ]; then
    counts=$(python3 -c "print(','.join(str(2 ** i) for i in range(10) if 2 ** i <= $gpus))")
    python3 bench/scaling.py --device cuda --preset small --seq-len 512 --batch-size 8 --nprocs "$counts" \
        2>&1 | tee "$logs/scaling_cuda.log"
    python3 bench/scaling.py --device cuda --preset small --seq-len 512 --batch-size 8 --ep 2 \
        --nprocs "${counts#1,}" 2>&1 | tee "$logs/scaling_cuda_ep2.log"
else
    python3 bench/scaling.py --device cuda --preset small --seq-len 512 --batch-size 8 --nprocs 1 \
        2>&1 | tee "$logs/scaling_cuda.log"
fi
if [ "$gpus" -ge 2 ]; then
    python3 bench/decode.py --device cuda --dtype bfloat16 --preset v2-lite-shaped --batches 1,32 \
        --prompt-len 32 --new-tokens 64 --tensor-parallel-size 2 2>&1 | tee "$logs/decode_cuda_tp2.log"
    python3 bench/decode.py --device cuda --dtype bfloat16 --preset v2-lite-shaped --batches 1,32 \
        --prompt-len 32 --new-tokens 64 --tensor-parallel-size 2 --enable-expert-parallel 2>&1 \
        | tee "$logs/decode_cuda_tp2_ep.log"
else
    echo "tensor-parallel GPU check skipped: $gpus GPU(s), needs 2" | tee "$logs/decode_cuda_tp2.log"
fi
