#!/usr/bin/env bash
# The GPU check, in one go on a fresh GPU host with DALI installed (README, "Measuring on a GPU"):
#   1. the whole benchmark suite (benchmarks/ and kernels_bench/, full sizes on CUDA) -> bench.json,
#      rendered by benchmarks.report into report.md and report.png;
#   2. the recipes on real data (Fashion-MNIST under DATA as CIFAR pickles and a JPEG folder): the fast
#      CNN recipe to its final accuracy, the seed recipe for 2 epochs, ResNet-18 fine-tuning for 1 epoch
#      -> results.json, results.md, curves.png.
#   bash benchmarks/gpu_check.sh OUT [DATA]     (DATA default /tmp/fasttrain-data)
# Environment: RUNS="name ..." picks recipe runs (see benchmarks/recipe_check.py), BENCH="paths or -k ..."
# narrows the suite, SKIP_BENCH=1 skips it, CUDA_TESTS=1 runs all of tests/test_cuda.py (else its
# loader tests), QUICK=1 DEVICE=cpu tries everything small on a CPU.
# At most 8 files land in OUT (env.txt, log.txt, bench.json, report.md, report.png, results.json,
# results.md, curves.png), ready to commit under benchmarks/results/.
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
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown: no .git in this copy, name it when committing the results)"
} > "$out/env.txt" 2>&1
cat "$out/env.txt"
# the loader contract on the GPU (cheap); CUDA_TESTS=1 adds the compiled training tests
"$py" -m pytest -p no:cacheprovider -q -rs tests/test_cuda.py ${CUDA_TESTS:+-k ''} ${CUDA_TESTS:--k loader} 2>&1 \
  | grep -v -E "nvjpeg2k|nvtiff|nvTIFF|nvJPEG2000|Note: If" >> "$out/log.txt"
if [ -z "${SKIP_BENCH:-}" ]; then
  start=$(date +%s)
  "$py" -m pytest -p no:cacheprovider -q -rs --benchmark-only --benchmark-json "$out/bench.json" \
    ${BENCH:-benchmarks kernels_bench} 2>&1 | grep -v -E "nvjpeg2k|nvtiff|nvTIFF|nvJPEG2000|Note: If" >> "$out/log.txt"
  echo "benchmark suite: $(( $(date +%s) - start ))s" | tee -a "$out/log.txt"
  tail -4 "$out/log.txt"
  "$py" -m benchmarks.report "$out/bench.json" --out "$out" 2>&1 | tee -a "$out/log.txt"
fi
"$py" -m benchmarks.recipe_check --data "$data" --out "$out" --runs /tmp/fasttrain-runs --device "${DEVICE:-cuda}" \
  ${QUICK:+--quick} --only ${RUNS:-cnn-fast cnn-seed-2ep resnet-finetune-1ep}
