#!/usr/bin/env bash
# The GPU paths on a CUDA machine, end to end on the embedded default: bf16 ZeRO-3 training over NCCL
# (soft sharing, then hard + PCGrad), stock-PEFT evaluation of the saved adapters, the surgery step-time
# ratio, what attn_implementation=flash_attention_2 does with and without the flash-attn package, and with
# liger-kernel installed, Liger's fused loss against the logits path (tests/test_kernels.py) and a ZeRO-3 run
# with model.liger_kernels=true beside one without (the same losses: docs/BENCHMARKS.md, H200).
#
#   bash bench/gpu_smoke.sh [OUT_DIR]          # default runs/gpu_smoke; uses every visible GPU
#
# Logs go to OUT_DIR/*.log; the lines that matter are printed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu_smoke}
mkdir -p "$OUT"
NGPU=$(python3 -c "import torch; print(torch.cuda.device_count())")
[ "$NGPU" -ge 1 ] || { echo "no CUDA device visible"; exit 1; }
DS="python3 -m deepspeed.launcher.runner --num_gpus $NGPU"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, peft, deepspeed; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'transformers', transformers.__version__, 'peft', peft.__version__, 'deepspeed', deepspeed.__version__)"
status=0
step() {  # name, command...: run, keep the log, print the summary lines
    local name=$1; shift
    local t0=$SECONDS
    "$@" > "$OUT/$name.log" 2>&1
    local code=$?
    echo "== $name: exit $code, $((SECONDS - t0)) s"
    grep -E "error|Error|nccl|NCCL|ZeRO stage|RATIO|median|exact match| passed| failed|\| (copy|reverse|sort|add) " "$OUT/$name.log" \
        | grep -v -E "FutureWarning|UserWarning" | tail -n 14
    [ $code -eq 0 ] || status=1
}
step train_soft_bf16 $DS launch/train.py --config configs/demo.yaml model.dtype=bf16 max_steps=300 \
    eval.every_steps=100 output_dir="$OUT/soft_bf16"
python3 - "$OUT/soft_bf16" <<'EOF'
import json, sys
s = json.load(open(f"{sys.argv[1]}/train_summary.json"))["final"]
print("final", {k: round(v, 3) for k, v in s.items() if k.startswith(("eval/", "loss", "tokens_per_s", "step_time"))})
EOF
step evaluate_bf16 python3 launch/evaluate.py --config configs/demo.yaml model.dtype=bf16 output_dir="$OUT/soft_bf16"
step train_pcgrad_bf16 $DS launch/train.py --config configs/pcgrad.yaml model.dtype=bf16 max_steps=100 \
    eval.every_steps=0 output_dir="$OUT/pcgrad_bf16"
step surgery_overhead_bf16 $DS --module bench.surgery_overhead --steps 30 --tasks 4 model.dtype=bf16
# flash_attention_2 needs the flash-attn package: with it, a short run; without it, the error a user gets.
FA2="launch/train.py --config configs/demo.yaml model.dtype=bf16 max_steps=5 model.attn_implementation=flash_attention_2
     eval.every_steps=0 eval.max_examples=4 output_dir=$OUT/fa2"
if python3 -c "import flash_attn" 2>/dev/null; then
    step flash_attention_2 $DS $FA2
else
    $DS $FA2 > "$OUT/flash_attention_2.log" 2>&1
    echo "== flash_attention_2: flash-attn not installed; exit $?, the user sees:"
    grep -m 2 "mtl_scale: error" "$OUT/flash_attention_2.log"
fi
if python3 -c "import liger_kernel" 2>/dev/null; then
    step liger_test python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py
    for L in false true; do
        step "train_hard_liger_$L" $DS launch/train.py --config configs/demo.yaml model.dtype=bf16 sharing=hard \
            max_steps=40 eval.every_steps=0 eval.max_examples=8 model.liger_kernels=$L output_dir="$OUT/liger_$L"
        python3 -c "import json, sys; s = json.load(open(sys.argv[1]))['final']; print('liger=$L', {k: round(v, 4)
            for k, v in s.items() if k.startswith(('eval/loss', 'loss', 'step_time'))})" "$OUT/liger_$L/train_summary.json"
    done
else
    echo "== liger: liger-kernel not installed; skipped"
fi
exit $status
