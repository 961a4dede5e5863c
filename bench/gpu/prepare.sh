#!/usr/bin/env bash
# Run HERE before the GPU check: builds the benchmark binaries against the full CUDA torch
# (without touching this checkout's default set-up) and copies them into gpu-bin/ (ignored), the
# folder the device run carries. Then: run(command="bench/gpu/run.sh", carry=["gpu-bin"]).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${D2L_PYTHON:-python3}
"$PY" scripts/setup.py --torch cuda --python-only >/dev/null
CUDA_VENV=$("$PY" scripts/setup.py --torch cuda --print-venv)
export LIBTORCH=$CUDA_VENV/lib/python3.11/site-packages/torch
export D2L_TORCH_VARIANT=cuda LIBTORCH_BYPASS_VERSION_CHECK=0
CARGO_TARGET_DIR=target/gpu cargo build --release --example bench_train --example bench_data
rm -rf gpu-bin && mkdir gpu-bin
cp target/gpu/release/examples/bench_train target/gpu/release/examples/bench_data gpu-bin/
# libtorch_cuda must be a direct dependency, or CUDA looks absent (tch-rs issues 907, 980).
ldd gpu-bin/bench_train | grep -q libtorch_cuda || { echo "gpu-bin/bench_train does not link libtorch_cuda" >&2; exit 1; }
du -sh gpu-bin
