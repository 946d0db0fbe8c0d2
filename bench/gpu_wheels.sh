#!/usr/bin/env bash
# What a lent GPU machine needs to run bench/gpu_lease.sh, built here where the registry is reachable: the
# machine (docs/GPU.md) has no network, Python 3.12, its own CUDA torch and triton, and none of DeepSpeed,
# liger-kernel or datasets. Writes
#   .whl/  wheels of this checkout's tested versions (read from the venv that runs this script) for
#          Python 3.12 on manylinux x86_64: the packages the machine lacks, and those whose version there
#          differs from the one tested here (transformers 5.17 there, for one); nothing of torch's or CUDA's
#   .gpu/  gsm8k_test.jsonl (../shared/data/gsm8k/test.jsonl, which the machine has no copy of) and commit
# then checks that every carried wheel's requirements are carried or on the machine's list below.
#
#   bash bench/gpu_wheels.sh        # then the device tool: command "OUT=$OUT bash bench/gpu_lease.sh",
#                                   # carry [".whl", ".gpu"]
#
# Both folders are git-ignored (.gitignore), as the device tool's carry needs, and together take ~27 MB of
# the 64 MiB a call carries. Checked on 2026-12-01 in a Python 3.12 venv standing in for the machine: the
# wheels install with gpu_lease.sh's command and the attention, kernel and batching tests and a 2-rank
# bench.throughput launch run from them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
GSM8K=../shared/data/gsm8k/test.jsonl
[ -x "$PY" ] || { echo "gpu_wheels.sh: no $PY (run make setup first, or set PY to the tested venv's python)" >&2; exit 2; }
[ -f "$GSM8K" ] || { echo "gpu_wheels.sh: no $GSM8K beside the checkout (the realistic workload's data)" >&2; exit 2; }
# Carried: the project's runtime dependencies the machine lacks (DeepSpeed and its pydantic, datasets and
# its dill/multiprocess) or holds at another version than the one tested here (huggingface-hub 1.33 there;
# 2.x, tested here, needs httpx2 and a newer click), and Liger.
CARRY="transformers tokenizers huggingface-hub safetensors peft accelerate deepspeed hjson pydantic
pydantic-core annotated-types typing-inspection liger-kernel datasets dill multiprocess fsspec click httpx2
httpcore2 truststore"
# Already there (the image's package list, /work/.library/device/KINDS.md, read 2026-11-17): a carried
# wheel may require these without carrying them.
THERE="torch triton numpy pyarrow pandas requests httpx hf-xet filelock packaging pyyaml regex tqdm psutil
py-cpuinfo ninja msgpack einops nvidia-ml-py xxhash aiohttp jinja2 typing-extensions typer shellingham rich
sentencepiece protobuf anyio idna h11 certifi"
rm -rf .whl .gpu && mkdir -p .whl .gpu
for name in $CARRY; do
  # liger-kernel is GPU-only, so not in a CPU venv: the version the H200 ran (docs/BENCHMARKS.md)
  version=$($PY -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name" 2>/dev/null) ||
      { [ "$name" = liger-kernel ] && version=${LIGER_VERSION:-0.8.5}; }
  if [ "$name" = deepspeed ]; then
    # DeepSpeed ships a source distribution only; built without its C++ ops (the machine JIT-builds none
    # of them: torch_adam), the wheel is pure Python and any Python takes it.
    DS_BUILD_OPS=0 $PY -m pip wheel -q --no-deps --no-build-isolation -w .whl "deepspeed==$version"
  else
    $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "$name==$version" 2>&1 | { grep -v "^WARNING: Location" || true; }
  fi
done
cp "$GSM8K" .gpu/gsm8k_test.jsonl
git rev-parse --short HEAD > .gpu/commit
# Every requirement of a carried wheel, as its markers read on the machine (Python 3.12, Linux x86_64, no
# extras), is carried or there.
$PY - "$CARRY $THERE" <<'EOF'
import re, sys, zipfile, pathlib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
have = {canonicalize_name(n) for n in sys.argv[1].split()}
machine = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
           "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
missing = {}
for whl in sorted(pathlib.Path(".whl").glob("*.whl")):
    with zipfile.ZipFile(whl) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        for line in z.read(meta).decode().splitlines():
            if line.startswith("Requires-Dist:"):
                req = Requirement(line.split(":", 1)[1])
                if (req.marker is None or req.marker.evaluate(machine)) and canonicalize_name(req.name) not in have:
                    missing.setdefault(req.name, []).append(whl.name)
if missing:
    sys.exit("not carried and not on the machine's list: "
             + "; ".join(f"{r} (needed by {', '.join(w)})" for r, w in sorted(missing.items())))
EOF
du -sh .whl .gpu
ls .whl
