#!/usr/bin/env bash
# The pair on one GPU, in one prepared run of under 5 minutes on a one-GPU machine:
#   B1  training throughput on the GPU: this project's trainer against Keras fit on the same GPU
#       (B9 comes with it: training FLOP/s against a float32 matmul on the same GPU; TF may use TF32 for both);
#   B8  the pair together: `make train`'s trainer with `evaluator --device gpu` watching, both on the
#       GPU with memory growth, against the trainer alone; every checkpoint evaluated, with the lag;
#   B4  the evaluator's evaluation throughput on the GPU, against Keras evaluate.
# It writes to $OUT (default bench/gpu): results.json and RESULTS.md (the card named in the header),
# gpu.txt (card, memory, driver), gpu_use.csv and gpu_apps.csv (memory and use each second; during B8
# both python processes appear in gpu_apps.csv at once).
#
#   bench/gpu_check.sh           on the GPU machine (needs the dataset: `make data`, or DATA_DIR=folder)
#   bench/gpu_check.sh --cpu     a short smoke test of this script without a GPU, on generated data
#
# Environment: PYTHON (default .venv/bin/python, else python3), OUT, DATA_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}
OUT=${OUT:-bench/gpu}
mkdir -p "$OUT"
export TF_CPP_MIN_LOG_LEVEL=2

if [[ "${1:-}" == "--cpu" ]]; then
    tiny=$(mktemp -d)
    trap 'rm -rf "$tiny"' EXIT
    "$PYTHON" -c "import sys; from pathlib import Path; from tests.helpers import write_dataset; write_dataset(Path(sys.argv[1]))" "$tiny"
    DATA_DIR=${DATA_DIR:-$tiny}
    plan=(--quick --only B1,B4,B8 --device cpu)
    echo "gpu_check: smoke test on the CPU (no figure here is about a GPU)" > "$OUT/gpu.txt"
else
    command -v nvidia-smi >/dev/null || { echo "gpu_check: error: nvidia-smi not found; is this a GPU machine?" >&2; exit 2; }
    "$PYTHON" -c "import sys, tensorflow as tf; sys.exit(0 if tf.config.list_physical_devices('GPU') else 1)" 2>/dev/null \
        || { echo "gpu_check: error: TensorFlow sees no GPU (a CPU-only build, or no CUDA libraries: pip install 'tensorflow[and-cuda]')" >&2; exit 2; }
    data=(); [[ -n "${DATA_DIR:-}" ]] && data=(--data-dir "$DATA_DIR")
    "$PYTHON" -c "import sys; from common import datasets; datasets.load('fashion-mnist', sys.argv[1] if len(sys.argv) > 1 else None, download=False)" ${data[@]+"${data[@]}"} \
        || { echo "gpu_check: error: no Fashion-MNIST here; run 'make data' or set DATA_DIR" >&2; exit 2; }
    nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv > "$OUT/gpu.txt"
    nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu --format=csv -l 1 > "$OUT/gpu_use.csv" 2>&1 &
    use_sampler=$!
    nvidia-smi --query-compute-apps=timestamp,pid,used_memory --format=csv -l 1 > "$OUT/gpu_apps.csv" 2>&1 &
    apps_sampler=$!
    trap 'kill "$use_sampler" "$apps_sampler" 2>/dev/null || true' EXIT
    plan=(--plan gpu --device gpu)
fi

data=(); [[ -n "${DATA_DIR:-}" ]] && data=(--data-dir "$DATA_DIR")
began=$(date +%s)
"$PYTHON" -m bench.run "${plan[@]}" ${data[@]+"${data[@]}"} --out "$OUT"
echo "gpu_check: done in $(( $(date +%s) - began )) s; figures in $OUT/RESULTS.md and $OUT/results.json"
