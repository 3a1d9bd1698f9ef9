#!/usr/bin/env bash
# The GPU check, in one go on a fresh GPU host with DALI installed (README, "Measuring on a GPU"):
#   1. the whole benchmark suite (benchmarks/ and kernels_bench/, full sizes on CUDA) -> bench.json,
#      rendered by benchmarks.report into report.md and report.png;
#   2. the recipes on real data (Fashion-MNIST under DATA as CIFAR pickles and a JPEG folder): the fast
#      CNN recipe to its final accuracy, the seed recipe for 2 epochs, ResNet-18 fine-tuning for 1 epoch
#      -> results.json, results.md, curves.png;
#   3. the GPU cache's two augmentations (issue 10: FASTTRAIN_CACHE_AUGMENT=dali, DALI's operators fed
#      from the cache, against =device, batched tensor ops on the training stream) on the CIFAR pickles:
#      the fast CNN recipe's loader alone (3 timed epochs), then 3 training epochs with each, for images/s
#      and data wait -> augment.json (estimated 60 s on an H200, not yet measured; after step 2, so the
#      compile is cached).
#   bash benchmarks/gpu_check.sh OUT [DATA]     (DATA default /tmp/fasttrain-data)
# Environment: RUNS="name ..." picks recipe runs (see benchmarks/recipe_check.py), BENCH="paths or -k ..."
# narrows the suite, SKIP_BENCH=1 skips it, SKIP_AUGMENT=1 skips step 3, CUDA_TESTS=1 runs all of
# tests/test_cuda.py (else its loader tests), QUICK=1 DEVICE=cpu tries everything small on a CPU.
# At most 9 files land in OUT (env.txt, log.txt, bench.json, report.md, report.png, results.json,
# results.md, curves.png, augment.json), ready to commit under benchmarks/results/. The exit status is
# the recipe runs'.
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
status=$?
if [ -z "${SKIP_AUGMENT:-}" ] && [ -d "$data/cifar-100-python" ]; then
  echo "== cache augmentation: dali-cache vs device-cache ==" | tee -a "$out/log.txt"
  start=$(date +%s)
  if [ -n "${QUICK:-}" ]; then  # a few batches of the CIFAR pickles, one short training epoch each
    sizes=(--batch-size 64 --epochs 1 --limit 1024 --train-epochs 1
           --train-args "--batch-size 64 --train-limit 256 --val-limit 64")
  else  # the fast recipe's batch, 3 timed loader epochs, 3 training epochs (the first compiles)
    sizes=(--batch-size 512 --epochs 3 --train-epochs 3)
  fi
  "$py" -m benchmarks.loader_speed --data "$data/cifar-100-python" --model cnn --loaders dali-cache device-cache \
    "${sizes[@]}" --device "${DEVICE:-cuda}" --train-timeout 150 --out "$out/augment.json" 2>&1 \
    | grep -v -E "nvjpeg2k|nvtiff|nvTIFF|nvJPEG2000|Note: If" | tee -a "$out/log.txt"
  echo "cache augmentation: $(( $(date +%s) - start ))s" | tee -a "$out/log.txt"
else
  echo "# cache augmentation: skipped (SKIP_AUGMENT, or no $data/cifar-100-python)" | tee -a "$out/log.txt"
fi
exit $status
