#!/usr/bin/env bash
# On the GPU machine, from the repo root, with gpu-bin/ carried (bench/gpu/prepare.sh makes it):
# generates the hotdog-like data there, runs Rust and both PyTorch variants at the book's settings
# (224 px, batch 128, 5 epochs, 1000 training and 400 test images a class) plus Rust with bf16 +
# channels-last and Rust's step from pinned host memory, and writes compare-gpu.json and its log
# under $OUT, then distributed training (bench/dist.py: 1 process against one process a GPU, NCCL;
# on a one-GPU machine it says so and runs 1 process in a group of 1) into dist-gpu.json and its
# log. Sized for about 6 minutes of device time; the JSON is rewritten after every run, and
# one process may take 180 s at most (then it counts as failed and the rest go on), so a run
# stopped early or a row that fails still leaves figures.
#
# Arguments after the script's name go to bench/compare.py after its own (the last one wins), and
# D2L_BENCH_DEVICE=cpu skips the CUDA checks: scripts/test runs this very script that way on a tiny
# set with the debug binaries (D2L_BENCH_BIN), so that the GPU run's path keeps working.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${TORCH_PY:-/opt/torch/.venv/bin/python}
[ -x "$PY" ] || PY=python3   # there, the plain python3 is the one with torch
BIN=${D2L_BENCH_BIN:-gpu-bin}
DEVICE=${D2L_BENCH_DEVICE:-cuda}
TORCH_LIB=$("$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
export LD_LIBRARY_PATH=$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
OUT=${OUT:-target/bench}
mkdir -p "$OUT"
"$PY" -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__)' | tee "$OUT/gpu.txt"
# What bounds the loaders: cores, memory, and /dev/shm, which PyTorch's DataLoader workers pass batches through.
{ echo "cores $(nproc)"; df -h /dev/shm | tail -n 1; free -g | sed -n 2p; } | tee -a "$OUT/gpu.txt" || true
if [ "$DEVICE" = cuda ]; then
  { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi failed"; } \
    | tee -a "$OUT/gpu.txt"
  # Fails fast if the binary cannot use CUDA.
  "$BIN/bench_train" step --device cuda --crop 224 --batch 128 --steps 3 | tee -a "$OUT/gpu.txt"
fi
"$PY" bench/compare.py --bin-dir "$BIN" --python "$PY" --device "$DEVICE" --crop 224 --resize 256 --batch 128 \
  --epochs 5 --steps 20 --reps 2 --per-class 1000 --test-per-class 400 --workers "$(nproc)" --options \
  --run-timeout 180 --data /tmp/d2l-bench-data --out "$OUT/compare-gpu.json" "$@" 2>&1 | tee "$OUT/compare-gpu.log"
# Distributed training: NCCL between the GPUs it has, one process a GPU (Gloo on the CPU smoke run).
# D2L_DIST_ARGS overrides the sizes (scripts/test passes tiny ones).
NPROC=2
if [ "$DEVICE" = cuda ]; then
  NPROC=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [ "${NPROC:-0}" -ge 1 ] || NPROC=1
  [ "$NPROC" -gt 1 ] || echo "one GPU here: NCCL runs 1 process (a group of 1, nothing to all-reduce with)" | tee -a "$OUT/gpu.txt"
fi
# shellcheck disable=SC2086
"$PY" bench/dist.py --bin-dir "$BIN" --device "$DEVICE" --nproc "$NPROC" --crop 224 --batch 128 --epochs 1 \
  --per-class 500 --reps 1 --workers 4 --data /tmp/d2l-bench-dist --out "$OUT/dist-gpu.json" ${D2L_DIST_ARGS:-} \
  2>&1 | tee "$OUT/dist-gpu.log"
