#!/usr/bin/env python3
"""The chapter's training, Rust against PyTorch, side by side on the same data in one run.

For Rust (`examples/bench_train.rs`) and the book's PyTorch code in two variants
(`bench/chapter_torch.py`: `book` = DataLoader with num_workers=0, `tuned` = a worker per core,
pinned memory, persistent workers), same batch, image size, epochs and generated data:

- d2l's examples/sec (timer around the training step only) and end-to-end wall time an epoch
  (loading, augmentation, training, evaluation), time to the first batch, peak RSS;
- the limit: the training step alone on tensors already on the device; end-to-end throughput is
  reported as a fraction of it;
- where each end-to-end run's time went: the steps (d2l's timer), waiting for the training
  loader, evaluation, the rest;
- on the CPU, Rust a second time with `--no-im2col` (libtorch's convolution in every layer, PyTorch's
  kernels exactly), to show how much the im2col path for small convolution outputs adds;
- the data pipeline alone (decode + augment, one worker and all cores, Rust vs PIL), at the
  benchmark's image size;
- optionally (--notebook) the chapter notebook's cold and warm execution and its first cell's
  `:dep` time.

Runs alternate (A B C A B C ...) and medians are compared, since shared machines are noisy.
Prints a table and writes JSON (--out).

Here (CPU):   $(python3 scripts/setup.py --torch cuda --print-venv)/bin/python bench/compare.py
GPU machine:  bench/gpu/run.sh (see there)
"""
import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_json(cmd, env=None):
    t = time.perf_counter()
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.exit(f"bench: {' '.join(map(str, cmd))} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["process_wall_s"] = time.perf_counter() - t
    return result


def median(rows, key):
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin-dir", type=Path, default=ROOT / "target" / "release" / "examples")
    ap.add_argument("--python", default=sys.executable, help="python with torch and torchvision")
    ap.add_argument("--data", type=Path, default=ROOT / "target" / "bench" / "chapter-data")
    ap.add_argument("--per-class", type=int, default=300, help="training images per class (test: a quarter)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--crop", type=int, default=64)
    ap.add_argument("--resize", type=int, default=72)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--options", action="store_true", help="also Rust with bf16 autocast and channels-last (a GPU option; runs on the CPU too), "
                                                            "and Rust's step with its batch copied from pinned host memory")
    ap.add_argument("--notebook", action="store_true", help="also time the chapter notebook cold and warm")
    ap.add_argument("--notebook-only", action="store_true", help="only time the chapter notebook cold and warm")
    ap.add_argument("--out", type=Path, default=ROOT / "target" / "bench" / "compare.json")
    args = ap.parse_args()

    if args.notebook_only:
        notebook = time_notebook()
        print("notebook (offline profile): " + ", ".join(f"{k} {v:.1f} s" for k, v in notebook.items()))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                        "machine": {"node": platform.node(), "cores": os.cpu_count()},
                                        "notebook": notebook}, indent=2))
        print(f"wrote {args.out}")
        return
    bench_train, bench_data = args.bin_dir / "bench_train", args.bin_dir / "bench_data"
    for b in (bench_train, bench_data):
        if not b.is_file():
            sys.exit(f"bench: {b} is missing: cargo build --release --example bench_train --example bench_data")
    t = time.perf_counter()
    data = subprocess.run([bench_data, "make", args.data, str(args.per_class)], capture_output=True, text=True,
                          check=True).stdout.strip().splitlines()[-1]
    print(f"data: {data} ({args.per_class} + {args.per_class // 4} per class; {time.perf_counter() - t:.1f} s)",
          flush=True)

    size = ["--crop", args.crop, "--resize", args.resize, "--batch", args.batch, "--epochs", args.epochs,
            "--device", args.device]
    impls = {
        "rust": [bench_train, "e2e", data, *size, "--workers", args.workers],
        "torch-book": [args.python, ROOT / "bench" / "chapter_torch.py", "e2e", data, *size, "--variant", "book"],
        "torch-tuned": [args.python, ROOT / "bench" / "chapter_torch.py", "e2e", data, *size, "--variant", "tuned",
                        "--workers", args.workers],
    }
    if args.device == "cpu":
        # libtorch's (oneDNN's) convolution in every layer: PyTorch's kernels exactly, so that the
        # table shows what the small-output im2col path adds and what the rest of the pipeline does.
        impls["rust-no-im2col"] = impls["rust"] + ["--no-im2col"]
    if args.options:
        impls["rust-bf16-cl"] = impls["rust"] + ["--bf16", "--channels-last"]
    step_size = ["--crop", args.crop, "--batch", args.batch, "--steps", args.steps, "--device", args.device]
    steps = {
        "rust": [bench_train, "step", *step_size],
        "torch": [args.python, ROOT / "bench" / "chapter_torch.py", "step", *step_size],
    }
    if args.device == "cpu":
        steps["rust-no-im2col"] = steps["rust"] + ["--no-im2col"]
    if args.options:
        steps["rust-bf16-cl"] = steps["rust"] + ["--bf16", "--channels-last"]
        # The step with the copy to the device that e2e makes each step (the same on the CPU).
        steps["rust-host-input"] = steps["rust"] + ["--host-input"]

    results = {name: [] for name in impls}
    step_results = {name: [] for name in steps}
    for rep in range(args.reps):
        for name, cmd in impls.items():
            r = run_json(cmd)
            results[name].append(r)
            print(f"rep {rep + 1}/{args.reps} {name:15s} e2e {r['e2e_images_per_s']:8.1f} img/s, "
                  f"d2l {r['d2l_examples_per_s']:8.1f} examples/s, epoch {r['epoch_wall_s']:6.2f} s", flush=True)
        for name, cmd in steps.items():
            r = run_json(cmd)
            step_results[name].append(r)
            print(f"rep {rep + 1}/{args.reps} {name:15s} step-only {r['images_per_s']:8.1f} img/s", flush=True)

    # The data pipeline alone at this image size: Rust threads vs torchvision processes.
    pipeline = []
    for rep in range(args.reps):
        for workers in (0, args.workers):
            for impl in ("rust", "torchvision"):
                if impl == "rust":
                    cmd = [bench_data, "run", Path(data) / "train", workers, args.batch, 1, args.crop]
                else:
                    cmd = [args.python, ROOT / "bench" / "data_pipeline.py", "--one", Path(data) / "train",
                           "--workers", workers, "--batch", args.batch, "--size", args.crop]
                r = run_json(cmd)
                r["workers"] = workers
                pipeline.append(r)

    summary = {}
    for name, rows in results.items():
        s = {k: median(rows, k) for k in ("e2e_images_per_s", "d2l_examples_per_s", "epoch_wall_s",
                                           "first_batch_s", "peak_rss_mib", "peak_rss_worker_mib", "test_acc")}
        step_name = "torch" if name.startswith("torch") else name
        limit = median(step_results[step_name], "images_per_s")
        s["step_only_images_per_s"] = limit
        s["fraction_of_step_only"] = s["e2e_images_per_s"] / limit if limit else None
        s["time_shares"] = time_shares(rows)
        summary[name] = s
    ratios = {
        "rust_vs_torch_book_e2e": summary["rust"]["e2e_images_per_s"] / summary["torch-book"]["e2e_images_per_s"],
        "rust_vs_torch_tuned_e2e": summary["rust"]["e2e_images_per_s"] / summary["torch-tuned"]["e2e_images_per_s"],
        "rust_vs_torch_book_d2l": summary["rust"]["d2l_examples_per_s"] / summary["torch-book"]["d2l_examples_per_s"],
        "rust_vs_torch_step_only": median(step_results["rust"], "images_per_s") / median(step_results["torch"], "images_per_s"),
    }
    if "rust-host-input" in step_results:
        ratios["rust_step_host_input_vs_step"] = (median(step_results["rust-host-input"], "images_per_s")
                                                  / median(step_results["rust"], "images_per_s"))
    if "rust-no-im2col" in summary:
        base = summary["rust-no-im2col"]["e2e_images_per_s"]
        ratios["rust_no_im2col_vs_torch_book_e2e"] = base / summary["torch-book"]["e2e_images_per_s"]
        ratios["rust_no_im2col_vs_torch_tuned_e2e"] = base / summary["torch-tuned"]["e2e_images_per_s"]
    pipe = {}
    for impl in ("rust", "torchvision"):
        for workers in (0, args.workers):
            rows = [r for r in pipeline if r["impl"] == impl and r["workers"] == workers]
            pipe[f"{impl}-{workers}"] = median(rows, "images_per_s")

    notebook = time_notebook() if args.notebook else None

    print()
    print(f"machine: {platform.node()}, {os.cpu_count()} cores, device {args.device}; "
          f"{args.crop} px crops, batch {args.batch}, {args.epochs} epochs, {args.reps} runs each, medians")
    print(f"{'':15s} {'end-to-end':>11s} {'d2l':>10s} {'epoch':>8s} {'1st batch':>9s} {'peak RSS':>9s} "
          f"{'step-only':>10s} {'e2e/step':>8s}")
    print(f"{'':15s} {'img/s':>11s} {'ex/s':>10s} {'s':>8s} {'s':>9s} {'MiB':>9s} {'img/s':>10s} {'':>8s}")
    for name, s in summary.items():
        rss = f"{s['peak_rss_mib']:.0f}" + (f"+{s['peak_rss_worker_mib']:.0f}w" if s.get("peak_rss_worker_mib") else "")
        print(f"{name:15s} {s['e2e_images_per_s']:11.1f} {s['d2l_examples_per_s']:10.1f} {s['epoch_wall_s']:8.2f} "
              f"{s['first_batch_s']:9.3f} {rss:>9s} {s['step_only_images_per_s']:10.1f} {s['fraction_of_step_only']:8.1%}")
    print("where the training loop's wall time went (medians): steps (d2l's timer), waiting for the "
          "training loader, evaluation, the rest")
    for name, s in summary.items():
        print(f"{name:15s} " + "  ".join(f"{k} {v:6.1%}" for k, v in s["time_shares"].items()))
    for name in steps:
        if name not in summary and name != "torch":
            print(f"step-only {name}: {median(step_results[name], 'images_per_s'):.1f} img/s")
    print("ratios: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    print("data pipeline alone (img/s): " + ", ".join(f"{k} workers {v:.1f}" for k, v in pipe.items()))
    if notebook:
        print("notebook: " + ", ".join(f"{k} {v:.1f} s" for k, v in notebook.items()))

    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"node": platform.node(), "cores": os.cpu_count(), "device": args.device,
                    "gpu": gpu_name() if args.device == "cuda" else None},
        "settings": {k: v for k, v in vars(args).items() if k in ("crop", "resize", "batch", "epochs", "steps",
                                                                    "reps", "workers", "per_class")},
        "summary": summary, "ratios": ratios, "data_pipeline": pipe, "notebook": notebook,
        "runs": {"e2e": results, "step": step_results, "pipeline": pipeline},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {args.out}")


def time_shares(rows):
    """Shares of the training loop's wall time, each run's then their medians: the steps (d2l's
    timer), waiting for the training loader, evaluation, the rest (bookkeeping)."""
    shares = []
    for r in rows:
        t = r["timing"]
        rest = t["wall_s"] - t["step_s"] - t["data_wait_s"] - t["eval_s"]
        shares.append({"steps": t["step_s"] / t["wall_s"], "wait": t["data_wait_s"] / t["wall_s"],
                       "eval": t["eval_s"] / t["wall_s"], "rest": rest / t["wall_s"]})
    return {k: median(shares, k) for k in ("steps", "wait", "eval", "rest")}


def gpu_name():
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True).stdout.strip()
    except OSError:
        return None


def time_notebook():
    """The chapter notebook (offline profile), cold (empty evcxr build folder) then warm."""
    venv_py = ROOT / ".d2l" / "venv" / "bin" / "python"
    build = Path(tempfile.mkdtemp(prefix="d2l-evcxr-cold-"))
    out = {}
    try:
        for label in ("cold", "warm"):
            env = dict(os.environ, D2L_PROFILE="offline", D2L_EVCXR_BUILD_HOME=str(build))
            t = time.perf_counter()
            subprocess.run([venv_py, ROOT / "scripts" / "run_notebooks.py", "--out", ROOT / "target" / "bench" / "nb",
                            ROOT / "notebooks" / "fine-tuning.ipynb"], check=True, env=env, capture_output=True)
            out[f"{label}_s"] = time.perf_counter() - t
            nb = json.loads((ROOT / "target" / "bench" / "nb" / "fine-tuning.ipynb").read_text())
            first = next(c for c in nb["cells"] if c["cell_type"] == "code")
            ex = first.get("metadata", {}).get("execution", {})
            if ex:
                start = datetime.fromisoformat(ex["iopub.execute_input"].replace("Z", "+00:00"))
                end = datetime.fromisoformat(ex["shell.execute_reply"].replace("Z", "+00:00"))
                out[f"{label}_first_cell_dep_s"] = (end - start).total_seconds()
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return out


if __name__ == "__main__":
    main()
