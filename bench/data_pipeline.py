#!/usr/bin/env python3
"""Data pipeline: Rust (d2l) vs torchvision's PIL pipeline on the same JPEGs, same machine.

Both read the hotdog-like training set through decode + RandomResizedCrop(224) +
RandomHorizontalFlip + ToTensor + Normalize in batches of 32. Runs alternate (A B A B) and the
medians are compared, since shared machines are noisy. Prints a table and writes JSON.

Needs the full torch install (torchvision):
    python3 scripts/setup.py --torch cuda
    $(python3 scripts/setup.py --torch cuda --print-venv)/bin/python bench/data_pipeline.py
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torchvision
from torchvision import transforms as T

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "target" / "release" / "examples" / "bench_data"


def cpu_seconds(who):
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def rust(folder, workers, batch, epochs):
    before = cpu_seconds(resource.RUSAGE_CHILDREN)
    out = subprocess.run([BIN, "run", folder, str(workers), str(batch), str(epochs)], capture_output=True, text=True,
                         check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    # The whole process (libtorch's start-up included), so a little in torchvision's favour.
    result["cpu_seconds"] = round(cpu_seconds(resource.RUSAGE_CHILDREN) - before, 3)
    result["images_per_cpu_s"] = round(result["images"] / result["cpu_seconds"], 1)
    return result


def pil(folder, workers, batch, epochs, size=224):
    augs = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(),
                      T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    data = torchvision.datasets.ImageFolder(folder, transform=augs)
    loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True, num_workers=workers)
    start, cpu = time.perf_counter(), cpu_seconds(resource.RUSAGE_SELF) + cpu_seconds(resource.RUSAGE_CHILDREN)
    first, n = None, 0
    for _ in range(epochs):
        for x, y in loader:
            n += len(y)
            first = first or time.perf_counter() - start
    secs = time.perf_counter() - start
    del loader  # ends the worker processes, so that their CPU time is counted
    cpu = cpu_seconds(resource.RUSAGE_SELF) + cpu_seconds(resource.RUSAGE_CHILDREN) - cpu
    return {"impl": "torchvision", "workers": workers, "batch": batch, "images": n, "seconds": round(secs, 3),
            "images_per_s": round(n / secs, 1), "first_batch_s": round(first, 3), "cpu_seconds": round(cpu, 3),
            "images_per_cpu_s": round(n / cpu, 1)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.path.expanduser("~/.cache/d2l-rs/bench-data"))
    ap.add_argument("--per-class", type=int, default=300, help="training images per class (the real set: 1000)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=3, help="passes over the data in each timed run")
    ap.add_argument("--out", default=str(ROOT / "target" / "bench" / "data_pipeline.json"))
    ap.add_argument("--one", metavar="FOLDER", help="one torchvision run over FOLDER: print its JSON and stop "
                    "(bench/compare.py uses it)")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--size", type=int, default=224)
    args = ap.parse_args()
    if args.one:
        torch.set_num_threads(1)
        print(json.dumps(pil(args.one, args.workers, args.batch, 1, args.size)))
        return 0

    subprocess.run(["cargo", "build", "--release", "--quiet", "--example", "bench_data"], cwd=ROOT, check=True)
    made = subprocess.run([BIN, "make", args.data, str(args.per_class)], capture_output=True, text=True, check=True)
    folder = str(Path(made.stdout.strip()) / "train")
    # One thread for torch's own ops too, so that "1 worker" means one core on both sides.
    torch.set_num_threads(1)
    cores = os.cpu_count() or 1
    runs = {}
    plan = [("rust", 0), ("torchvision", 0)] + [("rust", cores), ("torchvision", cores)]
    for r in range(args.rounds):
        for impl, workers in plan:
            result = (rust if impl == "rust" else pil)(folder, workers, args.batch, args.epochs)
            runs.setdefault((impl, workers), []).append(result)
            print(f"round {r + 1}: {impl:12} workers={workers}: {result['images_per_s']:8.1f} images/s, "
                  f"{result['images_per_cpu_s']:8.1f} images/CPU-s", flush=True)

    med = {k: statistics.median(x["images_per_s"] for x in v) for k, v in runs.items()}
    med_cpu = {k: statistics.median(x["images_per_cpu_s"] for x in v) for k, v in runs.items()}
    one_core = med[("rust", 0)] / med[("torchvision", 0)]
    one_core_cpu = med_cpu[("rust", 0)] / med_cpu[("torchvision", 0)]
    rust_scaling = med[("rust", cores)] / med[("rust", 0)]
    print()
    print(f"machine: {os.uname().machine}, {cores} cores; torch {torch.__version__}, torchvision {torchvision.__version__}")
    print(f"data: {folder}, {runs[('rust', 0)][0]['images']} images a run ({args.epochs} epochs), "
          f"batch {args.batch}, median of {args.rounds} runs")
    print("| pipeline | workers | images/s | images per CPU-second |")
    print("| --- | --- | --- | --- |")
    for (impl, workers), v in sorted(med.items()):
        label = "main thread" if workers == 0 else str(workers)
        print(f"| {impl} | {label} | {v:.1f} | {med_cpu[(impl, workers)]:.1f} |")
    print(f"Rust / torchvision on one core: {one_core:.2f}x by wall time, {one_core_cpu:.2f}x per CPU-second "
          f"(target 1.5x)")
    print(f"Rust with {cores} workers / main thread: {rust_scaling:.2f}x (target {0.8 * cores:.1f}x)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"cores": cores, "runs": {f"{k[0]}/{k[1]}": v for k, v in runs.items()},
                                          "median_images_per_s": {f"{k[0]}/{k[1]}": v for k, v in med.items()},
                                          "median_images_per_cpu_s": {f"{k[0]}/{k[1]}": v for k, v in med_cpu.items()},
                                          "rust_over_torchvision_one_core": one_core,
                                          "rust_over_torchvision_per_cpu_s": one_core_cpu,
                                          "rust_scaling": rust_scaling}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
