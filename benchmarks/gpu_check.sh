#!/usr/bin/env bash
# The checks a lent GPU machine runs, in one go (within 8 minutes): the pipeline end to end on
# CUDA in bf16, the model's step throughput per speed option, and the loader with 8 workers.
# The machine has torch and accelerate but not pyspng or webdataset, and no ../shared: carry
# their wheels and Fashion-MNIST's train-images-idx3-ubyte.gz in $WHEELS (default .gpu/).
# Arguments pick sections (e2e, steps, loader); none runs all three.
set -uo pipefail
SECTIONS=${*:-e2e steps loader}
want() { [[ " $SECTIONS " == *" $1 "* ]]; }
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-.gpu}
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TQDM_DISABLE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import sys, torch, accelerate; print('python', sys.version.split()[0], 'torch', torch.__version__, 'accelerate', accelerate.__version__, 'cpus', __import__('os').cpu_count())"

if want e2e; then
echo "== 1. end to end on the GPU: quickstart config, bf16, 600 steps, 4 loader workers"
start=$(date +%s)
timeout 150 python3 -m pipeline.train --config configs/quickstart.yaml train.run_dir=/tmp/runs/quickstart \
  train.mixed_precision=bf16 tracking.enabled=false train.steps=600 train.eval_every=300 data.num_workers=4 \
  2>&1 | tr '\r' '\n' | grep -v -E "^\s*$|it/s" | tail -n 6
echo "end to end: $(( $(date +%s) - start )) s"
cp /tmp/runs/quickstart/summary.json "$OUT/quickstart_summary.json" 2>/dev/null
cp /tmp/runs/quickstart/eval/final/report.json "$OUT/quickstart_report.json" 2>/dev/null
ls /tmp/runs/quickstart /tmp/runs/quickstart/checkpoints /tmp/runs/quickstart/encoder 2>&1 | tr '\n' ' '; echo
fi

if want steps; then
# One process per variant: fp32, bf16, bf16 + channels_last, bf16 + torch.compile of the model,
# the same with CUDA graphs (reduce-overhead), and the defaults. The compiled ones spend most of
# their time compiling (timed apart, "warm-up s"); a variant over --timeout is left out, the
# others still reported. About 4.5 minutes in all. --peak-tflops: the H200's dense bf16 peak,
# for MFU (the TFLOP/s column is pipeline.cost's conv FLOP count x 3 x images/s; fp32 rows are read
# against the same bf16 peak, so their MFU is a lower bound of what fp32 could reach).
echo "== 2. model step throughput and peak memory per speed option"
timeout 150 python3 benchmarks/train_step.py --configs cifar10 --batch-size 32 --steps 20 --warmup 5 --rounds 1 \
  --timeout 60 --peak-tflops 989 --json "$OUT/train_step_cifar10.json"
timeout 90 python3 benchmarks/train_step.py --configs imagenet64 --batch-size 16 --steps 10 --warmup 3 --rounds 1 \
  --timeout 40 --variants eager,bf16,bf16_channels_last,bf16_compile --peak-tflops 989 --json "$OUT/train_step_imagenet64.json"
echo "== 2b. the CIFAR-10 step's top CUDA kernels (torch.profiler, eager float32)"
timeout 45 python3 benchmarks/train_step.py --configs cifar10 --batch-size 32 --steps 5 --warmup 3 --rounds 1 --profile
fi

if want loader; then
echo "== 3. loader with 8 worker processes (16 cores), at 28x28 and at 64x64"
timeout 100 python3 benchmarks/loader.py --data "$WHEELS/train-images-idx3-ubyte.gz" --processes 8 --repeats 2 --workdir /tmp
timeout 100 python3 benchmarks/loader.py --data "$WHEELS/train-images-idx3-ubyte.gz" --processes 8 --repeats 2 --workdir /tmp \
  --images 30000 --resolution 64
fi
