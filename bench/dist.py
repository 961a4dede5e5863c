#!/usr/bin/env python3
"""Distributed data-parallel training against one process, at the same global batch.

Runs bench_train e2e (the notebook's fine_tune path) as 1 process and as N Gloo processes over
127.0.0.1 (`--nproc N`), alternated, `--reps` times, and prints a table: end-to-end images/s,
d2l's examples/s, the share of the step spent summing gradients across processes (all-reduce),
per setting, with the CPU model. On a GPU machine, `--device cuda` uses NCCL between the GPUs
(one process a GPU).

    cargo build --release --example bench_train --example bench_data
    python3 bench/dist.py                    # 1 process (1 thread) against 2 processes (1 thread each)
    python3 bench/dist.py --nproc 2 --threads 1 --also-threads 2
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cpu_model():
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin-dir", type=Path, default=ROOT / "target" / "release" / "examples")
    ap.add_argument("--data", type=Path, default=ROOT / "target" / "bench-dist" / "data")
    ap.add_argument("--per-class", type=int, default=150)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="libtorch threads a process")
    ap.add_argument("--also-threads", type=int, default=0,
                    help="also one process with this many threads (as many cores as the N processes use)")
    ap.add_argument("--crop", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32, help="the global batch")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1, help="loader threads a process")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, help="also write the runs and the table's figures here as JSON")
    args = ap.parse_args()

    bench_train, bench_data = args.bin_dir / "bench_train", args.bin_dir / "bench_data"
    data = subprocess.run([bench_data, "make", args.data, str(args.per_class), str(args.per_class // 4)],
                          check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    common = ["e2e", data, "--crop", str(args.crop), "--resize", str(args.crop + args.crop // 8),
              "--batch", str(args.batch), "--epochs", str(args.epochs), "--device", args.device]
    settings = [(f"1 process, {args.threads} thread", ["--threads", str(args.threads), "--workers", str(args.workers)]),
                (f"{args.nproc} processes, {args.threads} thread each",
                 ["--threads", str(args.threads), "--workers", str(args.workers), "--nproc", str(args.nproc)])]
    if args.also_threads:
        settings.append((f"1 process, {args.also_threads} threads",
                         ["--threads", str(args.also_threads), "--workers", str(args.workers * args.nproc)]))
    runs = {name: [] for name, _ in settings}
    for rep in range(args.reps):
        for name, extra in settings:
            out = subprocess.run([bench_train, *common, *extra], capture_output=True, text=True,
                                 env=dict(os.environ, D2L_DIST_TIMEOUT="600"))
            if out.returncode != 0:
                sys.exit(f"{name}: exit status {out.returncode}\n{out.stderr[-2000:]}")
            line = [l for l in out.stdout.splitlines() if l.startswith("{")][-1]
            runs[name].append(json.loads(line))
            print(f"rep {rep + 1}, {name}: {runs[name][-1]['e2e_images_per_s']:.1f} img/s", file=sys.stderr)

    print(f"\nCPU: {cpu_model()} ({os.cpu_count()} cores); ResNet-18, {args.crop} px crops, global batch "
          f"{args.batch}, {args.epochs} epochs, {args.per_class * 2} training images; medians of {args.reps}\n")
    print("| setting | e2e img/s | d2l examples/s | all-reduce share of the steps | peak RSS MiB (rank 0) |")
    print("|---|---|---|---|---|")
    base, summary = None, {}
    for name, _ in settings:
        rs = runs[name]
        e2e = statistics.median(r["e2e_images_per_s"] for r in rs)
        d2l = statistics.median(r["d2l_examples_per_s"] for r in rs)
        share = statistics.median(r["timing"].get("comm_s", 0.0) / max(r["timing"]["step_s"], 1e-9) for r in rs)
        rss = statistics.median(r["peak_rss_mib"] for r in rs)
        base = base or e2e
        print(f"| {name} | {e2e:.1f} ({e2e / base:.2f}x) | {d2l:.1f} | {100 * share:.1f}% | {rss:.0f} |")
        summary[name] = {"e2e_images_per_s": e2e, "d2l_examples_per_s": d2l, "all_reduce_share": share,
                         "peak_rss_mib": rss, "ratio": e2e / base}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"cpu": cpu_model(), "device": args.device, "nproc": args.nproc,
                                        "crop": args.crop, "batch": args.batch, "epochs": args.epochs,
                                        "summary": summary, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
