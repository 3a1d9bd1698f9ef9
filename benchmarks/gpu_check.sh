#!/usr/bin/env bash
# The GPU check, in one go on a fresh GPU host (see README, "Measuring on a GPU"):
# the input pipelines side by side on generated bird-sized JPEGs, then the recipes on real data
# (Fashion-MNIST as CIFAR pickles and as a JPEG folder under DATA).
#   bash benchmarks/gpu_check.sh OUT [DATA]     (DATA default /tmp/fasttrain-data)
# Environment: RUNS="name ..." picks recipe runs (default: all, see benchmarks/recipe_check.py),
# LOADERS="torch dali dali-cache", PHOTOS=N, CUDA_TESTS=1 runs all of tests/test_cuda.py (else its loader tests),
# QUICK=1 DEVICE=cpu tries everything small on a CPU.
# At most 8 files land in OUT, ready to commit under benchmarks/results/.
set -u
out=${1:?usage: gpu_check.sh OUT [DATA]}
data=${2:-/tmp/fasttrain-data}
py=${PYTHON:-python3}
[ -x /tmp/fasttrain-venv/bin/python ] && py=/tmp/fasttrain-venv/bin/python  # where collect.sh put DALI, if there
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}. PYTHONUNBUFFERED=1
mkdir -p "$out"
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  "$py" -c 'import torch, torchvision, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "torchvision", torchvision.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")'
  "$py" -c 'import nvidia.dali as d; print("DALI", d.__version__)' 2>&1 | tail -1
  echo "cpu cores: $(nproc)"
} > "$out/env.txt" 2>&1
cat "$out/env.txt"
# the loader contract on the GPU always (cheap); the compiled training tests with CUDA_TESTS=1
"$py" -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py ${CUDA_TESTS:+-k ''} ${CUDA_TESTS:--k loader} 2>&1 \
  | tee -a "$out/log.txt" | tail -3
quick=${QUICK:+--quick}
photos=${PHOTOS:-2048}; [ -n "$quick" ] && photos=64
"$py" -m benchmarks.loader_speed --photos "$photos" --device "${DEVICE:-cuda}" --batch-size "${LOADER_BATCH:-256}" \
  --loaders ${LOADERS:-torch dali dali-cache} --out "$out/loader-speed.json" 2>&1 | tee -a "$out/log.txt"
"$py" -m benchmarks.recipe_check --data "$data" --out "$out" --runs /tmp/fasttrain-runs --device "${DEVICE:-cuda}" \
  $quick ${RUNS:+--only $RUNS}
