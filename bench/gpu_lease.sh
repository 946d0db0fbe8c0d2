#!/usr/bin/env bash
# Issue 17's GPU checks for a lent GPU (docs/GPU.md, "For the next lease"), one call of ~9 minutes: the GPU
# tests (PyTorch's flash varlen kernel under sdpa_varlen, Liger), packed rows under sdpa's dense mask against
# the varlen kernel (auto stage, Liger), the kernel profile of the varlen step, then 32,768 tokens a micro-batch.
#
#   OUT=/tmp/out bash bench/gpu_lease.sh
#
# On a machine without network (the lent ones): wheels of this project's dependencies in .whl/ are installed
# to /tmp/site first (the machine's own torch is kept), and .gpu/gsm8k_test.jsonl, where there is no
# ../shared, stands in for ../shared/data/gsm8k/test.jsonl; bench/gpu_wheels.sh, run where the registry is
# reachable, writes both. Logs, JSON results and kernel tables go to $OUT.
set -uo pipefail
T0=$SECONDS
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to a folder for the logs}
mkdir -p "$OUT"
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export MTL_SCALE_CACHE=${MTL_SCALE_CACHE:-/tmp/mtlcache} PYTHONUNBUFFERED=1
if [ ! -f ../shared/data/gsm8k/test.jsonl ] && [ -f .gpu/gsm8k_test.jsonl ]; then
  mkdir -p ../shared/data/gsm8k && cp .gpu/gsm8k_test.jsonl ../shared/data/gsm8k/test.jsonl
fi
echo "commit $(git rev-parse --short HEAD 2>/dev/null || cat .gpu/commit) date $(date -u +%FT%TZ)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, peft, deepspeed, liger_kernel, datasets, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'peft', peft.__version__, 'deepspeed', deepspeed.__version__, 'triton', triton.__version__, 'datasets', datasets.__version__)"
python3 -c "import torch; from mtl_scale import attention; print('varlen kernel:', attention.torch_varlen(), '|', attention.packed_kernel('cuda', torch.bfloat16, 64))"
echo "== [$((SECONDS-T0)) s] pytest attention + liger on GPU"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_attention.py tests/test_kernels.py -rs 2>&1 | tail -n 25 | tee $OUT/pytest.log
run() {  # name, limit, MICRO_BATCH_SIZE, throughput flags and overrides
  local name=$1 limit=$2 mbs=$3; shift 3
  [ $((SECONDS-T0)) -lt $((560-limit)) ] || { echo "skip $name: time"; return; }
  echo "== [$((SECONDS-T0)) s] $name"
  MICRO_BATCH_SIZE=$mbs timeout $limit bash bench/gpu_throughput.sh --data realistic --once --timeout $((limit-10)) \
      --json $OUT/$name.json "$@" > $OUT/$name.log 2>&1; echo "exit $?"
  grep -E "^\[|^ours|^variant|RATIO|ranks,|ZeRO|stage|attention|Error|error" $OUT/$name.log | grep -v Warning | tail -n 16
}
run dense_vs_varlen 280 4 --variants ours-packed,ours-packed-varlen deepspeed_config=auto model.liger_kernels=true
run kernels_varlen 130 4 --variants ours-packed-varlen --steps 3 --kernel-profile $OUT/kernels deepspeed_config=auto \
    model.liger_kernels=true
find $OUT/kernels -name '*.json' -size +40M -delete 2>/dev/null  # the .txt table is what must come back
run varlen_32k 130 16 --variants ours-packed-varlen deepspeed_config=auto model.liger_kernels=true
echo "== [$((SECONDS-T0)) s] done"
