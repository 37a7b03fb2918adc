#!/usr/bin/env bash
# One prepared GPU check for a single-GPU machine (goal: well under 8 minutes on one H200).
#
#   1. the `gpu` tests (device placement of every loop, flex-attention packing forward + backward, chunked
#      log-probs vs naive on CUDA, bf16 learning);
#      and FSDP2 at world size 1 on CUDA (an NCCL group of one, sharded checkpoint save and resume, HF export);
#   2. benchmarks/gpu_throughput.py: SFT, DPO and GRPO (HF generation) on a random-init model with Qwen2.5-0.5B's
#      shapes in bf16, alignkit vs TRL 1.16 on the same work: throughput, peak memory, MFU and the ratios.
#
# The GPU machine has torch, transformers, peft and accelerate but no datasets, no trl and no network. Prepare once
# on the CPU machine, from the repo root:   bash benchmarks/gpu_check.sh --prepare   (wheels into .whl/)
# then run it there with .whl carried:      bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--prepare" ]; then
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  plat=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any)
  # datasets and what it needs beyond torch/transformers (pyarrow is the big one, ~40 MB)
  python3 -m pip download --no-deps "${plat[@]}" -d .whl datasets==4.4.1 pyarrow dill==0.4.0 xxhash \
    multiprocess==0.70.18 "fsspec[http]<=2025.10.0" pytest hypothesis iniconfig pluggy sortedcontainers \
    trl==1.16.0
  du -sh .whl
  exit 0
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
echo "== gpu tests =="
timeout 300 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_hardware.py tests/test_distributed.py
echo "== throughput =="
timeout 300 python3 benchmarks/gpu_throughput.py --steps 8 --timeout 90
echo "== compile=true (SFT) =="
timeout 120 python3 benchmarks/gpu_throughput.py --steps 8 --timeout 110 --loops sft --impls alignkit-compile
