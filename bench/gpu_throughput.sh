#!/usr/bin/env bash
# python -m bench.throughput on GPUs with a ~1.5B random-init Llama (hidden 2048, 16 layers, intermediate 8192,
# 32 heads, 8 KV heads, vocab 128256; built once by bench.common.build_model, cached under
# $MTL_SCALE_CACHE), bf16, 4 synthetic tasks of 2048-token examples, micro-batch 4 x 4 accumulation.
#
#   bash bench/gpu_throughput.sh [throughput.py flags ...] [key=value ...]   # e.g. --once, --rounds 1, --nprocs 8
#
# Issue 17 (packing, the auto stage, with and without Liger; run on an H200, docs/BENCHMARKS.md): mtl_scale's variants only,
# since the HF stacks read no deepspeed_config=auto; GSM8K from ../shared/data; packed rows use flash-attn's
# varlen kernel (pip install flash-attn liger-kernel first; without flash-attn, drop the attn_implementation
# override: sdpa then masks each packed row block-diagonally). MFU counts non-padding tokens only, 4N FLOPs
# per token for the frozen base (bench/common.py's flops_per_token):
#   bash bench/gpu_throughput.sh --data realistic --variants ours-hard,ours-packed --once deepspeed_config=auto \
#       model.attn_implementation=flash_attention_2
#   bash bench/gpu_throughput.sh --data realistic --variants ours-packed --once deepspeed_config=auto \
#       model.attn_implementation=flash_attention_2 model.liger_kernels=true
# Where a step's time goes (torch.profiler: DIR/<stack>-<sharing>-<n>.json trace and .txt table by GPU time):
#   bash bench/gpu_throughput.sh --data realistic --variants ours-hard,ours-packed --once --steps 3 \
#       --kernel-profile runs/kernels deepspeed_config=auto
# Without flash-attn, packed rows under sdpa's dense mask against attention per example (sdpa_varlen: PyTorch's
# own flash varlen kernel, one call per layer, on GPUs; not yet run on one):
#   bash bench/gpu_throughput.sh --data realistic --variants ours-packed,ours-packed-varlen --once deepspeed_config=auto \
#       model.liger_kernels=true
#
# NPROCS (default: every visible GPU) ranks, MICRO_BATCH_SIZE (default 4) examples per micro-batch (packed:
# that many max_seq_len rows of token budget); extra flags go to bench.throughput before the overrides.
set -euo pipefail
cd "$(dirname "$0")/.."
NPROCS=${NPROCS:-$(python3 -c "import torch; print(torch.cuda.device_count())")}
MODEL=$(python3 - <<'EOF'
import argparse
from bench.common import build_model
print(build_model(argparse.Namespace(hidden=2048, intermediate=8192, layers=16, heads=32, kv_heads=8, vocab=128256,
                                     seq_len=2048)))
EOF
)
python3 -m bench.throughput --nprocs "$NPROCS" --data synthetic --synthetic-examples 64 --steps 10 --warmup 3 "$@" \
    model.path="$MODEL" max_seq_len=2048 micro_batch_size="${MICRO_BATCH_SIZE:-4}"
