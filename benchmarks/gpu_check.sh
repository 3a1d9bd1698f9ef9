#!/usr/bin/env bash
# The GPU check, in one go on a fresh GPU host (see README, "Measuring on a GPU"):
# CUDA tests, then the recipes on real data (Fashion-MNIST as CIFAR pickles and as a JPEG folder).
#   bash benchmarks/gpu_check.sh OUT [DATA]     (DATA default /tmp/fasttrain-data)
# Everything lands in OUT, ready to commit under benchmarks/results/.
set -u
out=${1:?usage: gpu_check.sh OUT [DATA]}
data=${2:-/tmp/fasttrain-data}
py=${PYTHON:-python3}
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}. PYTHONUNBUFFERED=1
mkdir -p "$out"
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  "$py" -c 'import torch, torchvision, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "torchvision", torchvision.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")'
  nproc
} > "$out/env.txt" 2>&1
cat "$out/env.txt"
"$py" -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py -k "cnn or loader" 2>&1 | tee "$out/cuda-tests.txt" | tail -3
"$py" -m benchmarks.recipe_check --data "$data" --out "$out" --runs /tmp/fasttrain-runs --device "${DEVICE:-cuda}" ${QUICK:+--quick}
