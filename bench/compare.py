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
- the ratios rep by rep as well (`_paired`: the median of each rep's ratio, steadier when the machine's
  speed drifts over minutes);
- Rust's runs share a tuning cache of their own (d2l::tuning, in a temporary folder): the first
  times its convolution paths and memory layout and keeps them, the later ones read them, as a
  user's later runs on the same machine do; the first run's figure is reported on its own too;
- optionally (--notebook) the chapter notebook's cold and warm execution and its first cell's
  `:dep` time.

Runs alternate (A B C A B C ...) and medians are compared, since shared machines are noisy.
Prints a table and writes JSON (--out). The JSON is rewritten after every run ("complete": false
until the end), so a run stopped from outside keeps what it measured. A process that fails or runs
past --run-timeout is listed under "failed" and the others go on; then the exit status is 1.

Here (CPU):   $(python3 scripts/setup.py --torch cuda --print-venv)/bin/python bench/compare.py
GPU machine:  bench/gpu/run.sh (see there)
"""
import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from report import describe

ROOT = Path(__file__).resolve().parent.parent


def run_json(cmd, timeout=None):
    """Runs one benchmark process and returns the JSON of its last line, or {"error": ...} when it
    fails, prints no JSON or runs past `timeout` seconds (then its whole process group is killed,
    DataLoader workers included), so that one failed row does not lose the others."""
    t = time.perf_counter()
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return {"error": f"timed out after {timeout} s (--run-timeout)", "process_wall_s": time.perf_counter() - t}
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        return {"error": f"exit status {proc.returncode}: {stderr.strip()[-2000:]}", "process_wall_s": wall}
    try:
        result = json.loads(stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return {"error": f"printed no JSON on its last line: {stdout.strip()[-500:]!r}", "process_wall_s": wall}
    result["process_wall_s"] = wall
    return result


def median(rows, key):
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin-dir", type=Path, default=ROOT / "target" / "release" / "examples")
    ap.add_argument("--python", default=sys.executable, help="python with torch and torchvision")
    ap.add_argument("--data", type=Path, default=None,
                    help="where the data set is made (default: target/bench/chapter-data or target/bench/photos)")
    ap.add_argument("--source", choices=["synthetic", "photos"], default="synthetic",
                    help="synthetic: bench_data make's drawn images; photos: bench/photos.py's crops of "
                         "scikit-image's sample photographs (real-photo JPEG decoding)")
    ap.add_argument("--per-class", type=int, default=300, help="training images per class")
    ap.add_argument("--test-per-class", type=int, default=None, help="test images per class (default: a quarter "
                                                                     "of --per-class; the chapter's: 1000 and 400)")
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
    ap.add_argument("--run-timeout", type=float, default=None,
                    help="seconds one benchmark process may run; past it, it is killed and counted as failed")
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
    if args.test_per_class is None:
        args.test_per_class = args.per_class // 4
    if args.source == "photos":
        args.data = args.data or ROOT / "target" / "bench" / "photos"
        make = [args.python, ROOT / "bench" / "photos.py", args.data, "--per-class", str(args.per_class),
                "--test-per-class", str(args.test_per_class)]
    else:
        args.data = args.data or ROOT / "target" / "bench" / "chapter-data"
        make = [bench_data, "make", args.data, str(args.per_class), str(args.test_per_class)]
    data = subprocess.run([str(c) for c in make], capture_output=True, text=True,
                          check=True).stdout.strip().splitlines()[-1]
    print(f"data: {data} ({args.source}, {args.per_class} + {args.test_per_class} per class; "
          f"{time.perf_counter() - t:.1f} s)", flush=True)

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

    # A tuning cache of this run's own (d2l::tuning): the first Rust run times its convolution
    # paths and layout and keeps them; the later ones read them, as a user's second run would.
    # Both are reported (`cold_e2e_images_per_s`: the runs that timed everything themselves).
    tuning_dir = tempfile.mkdtemp(prefix="d2l-tuning-")
    os.environ["D2L_TUNING_DIR"] = tuning_dir
    results = {name: [] for name in impls}
    step_results = {name: [] for name in steps}
    pipeline, failed = [], []
    started, gpu = time.perf_counter(), gpu_name() if args.device == "cuda" else None

    def save(complete):
        """The report so far, after every run: a run that is stopped (a device's time limit) still
        leaves every figure measured before it. Written whole, then renamed."""
        report = {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "complete": complete,
            "elapsed_s": time.perf_counter() - started,
            "machine": {"node": platform.node(), "cores": os.cpu_count(), "device": args.device, "gpu": gpu,
                        "cpu": cpu_model(), "kernels": kernel_env()},
            "settings": {k: v for k, v in vars(args).items() if k in ("crop", "resize", "batch", "epochs", "steps",
                                                                        "reps", "workers", "per_class", "test_per_class",
                                                                        "source")},
            **summarize(results, step_results, pipeline, args.workers),
            "failed": failed, "notebook": notebook,
            "runs": {"e2e": results, "step": step_results, "pipeline": pipeline},
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(json.dumps(report, indent=2, default=str))
        tmp.replace(args.out)
        return report

    def measure(kind, name, cmd, rep, store, **extra):
        """One run into `store` (with `extra`), or into `failed`; then the report is saved."""
        r = run_json(cmd, args.run_timeout)
        if "error" in r:
            failed.append({"kind": kind, "row": name, "rep": rep + 1, "cmd": " ".join(map(str, cmd)), **r})
            print(f"rep {rep + 1}/{args.reps} {name:15s} {kind} FAILED after {r['process_wall_s']:.1f} s: "
                  f"{r['error'].splitlines()[-1]}", flush=True)
            r = None
        else:
            store.append({**r, **extra, "rep": rep + 1})
        save(complete=False)
        return r

    notebook = None
    for rep in range(args.reps):
        for name, cmd in impls.items():
            r = measure("e2e", name, cmd, rep, results[name])
            if r:
                print(f"rep {rep + 1}/{args.reps} {name:15s} e2e {r['e2e_images_per_s']:8.1f} img/s, "
                      f"d2l {r['d2l_examples_per_s']:8.1f} examples/s, epoch {r['epoch_wall_s']:6.2f} s "
                      f"({r['process_wall_s']:.1f} s)", flush=True)
        for name, cmd in steps.items():
            r = measure("step", name, cmd, rep, step_results[name])
            if r:
                print(f"rep {rep + 1}/{args.reps} {name:15s} step-only {r['images_per_s']:8.1f} img/s "
                      f"({r['process_wall_s']:.1f} s)", flush=True)

    # The data pipeline alone at this image size: Rust threads vs torchvision processes.
    for rep in range(args.reps):
        for workers in (0, args.workers):
            for impl in ("rust", "torchvision"):
                if impl == "rust":
                    cmd = [bench_data, "run", Path(data) / "train", workers, args.batch, 1, args.crop]
                else:
                    cmd = [args.python, ROOT / "bench" / "data_pipeline.py", "--one", Path(data) / "train",
                           "--workers", workers, "--batch", args.batch, "--size", args.crop]
                measure("pipeline", f"{impl}-{workers}", cmd, rep, pipeline, workers=workers)

    notebook = time_notebook() if args.notebook else None
    report = save(complete=True)
    shutil.rmtree(tuning_dir, ignore_errors=True)

    print()
    print(f"machine: {platform.node()}, {os.cpu_count()} cores, device {args.device}; "
          f"{args.crop} px crops, batch {args.batch}, {args.epochs} epochs, {args.reps} runs each, medians; "
          "steps / wait / eval: shares of the training loop's wall time (steps as d2l's timer counts them, "
          "waiting for the training loader, evaluation)")
    print("\n".join(describe(report)))
    if notebook:
        print("notebook: " + ", ".join(f"{k} {v:.1f} s" for k, v in notebook.items()))
    print(f"wrote {args.out} ({report['elapsed_s']:.0f} s in all)")
    if failed:
        for f in failed:
            print(f"failed: {f['kind']} {f['row']} (rep {f['rep']}): {f['cmd']}\n  {f['error']}", file=sys.stderr)
        sys.exit(f"bench: {len(failed)} run(s) failed; the figures of the others are in {args.out}")


def summarize(results, step_results, pipeline, workers):
    """Medians of what has run so far; a row with no successful run is left out, and so are the
    ratios that need it."""
    summary = {}
    for name, rows in results.items():
        if not rows:
            continue
        s = {k: median(rows, k) for k in ("e2e_images_per_s", "d2l_examples_per_s", "epoch_wall_s",
                                           "first_batch_s", "peak_rss_mib", "peak_rss_worker_mib", "test_acc")}
        limit = median(step_results.get("torch" if name.startswith("torch") else name, []), "images_per_s")
        s["step_only_images_per_s"] = limit
        s["fraction_of_step_only"] = s["e2e_images_per_s"] / limit if limit else None
        s["time_shares"] = time_shares(rows)
        # Where some runs read the tuning cache and some timed everything: the latter alone too.
        cold = [r for r in rows if is_cold(r)]
        if cold and len(cold) < len(rows):
            s["cold_e2e_images_per_s"] = median(cold, "e2e_images_per_s")
            s["cold_runs"] = len(cold)
        summary[name] = s

    def e2e(name):
        return summary.get(name, {}).get("e2e_images_per_s")

    def step(name):
        return median(step_results.get(name, []), "images_per_s")

    ratios = {}
    for key, a, b in (("rust_vs_torch_book_e2e", e2e("rust"), e2e("torch-book")),
                      ("rust_vs_torch_tuned_e2e", e2e("rust"), e2e("torch-tuned")),
                      ("rust_cold_vs_torch_book_e2e", summary.get("rust", {}).get("cold_e2e_images_per_s"),
                       e2e("torch-book")),
                      ("rust_vs_torch_book_d2l", summary.get("rust", {}).get("d2l_examples_per_s"),
                       summary.get("torch-book", {}).get("d2l_examples_per_s")),
                      ("rust_vs_torch_step_only", step("rust"), step("torch")),
                      ("rust_step_host_input_vs_step", step("rust-host-input"), step("rust")),
                      ("rust_no_im2col_vs_torch_book_e2e", e2e("rust-no-im2col"), e2e("torch-book")),
                      ("rust_no_im2col_vs_torch_tuned_e2e", e2e("rust-no-im2col"), e2e("torch-tuned"))):
        if a and b:
            ratios[key] = a / b
    # The same ratios rep by rep (runs of one rep follow each other), then their median: on a
    # machine whose speed drifts over minutes, steadier than the ratio of the medians.
    for key, a, b in (("rust_vs_torch_book_e2e_paired", "rust", "torch-book"),
                      ("rust_vs_torch_tuned_e2e_paired", "rust", "torch-tuned")):
        by_rep = {r.get("rep"): r["e2e_images_per_s"] for r in results.get(b, []) if r.get("rep")}
        per_rep = [r["e2e_images_per_s"] / by_rep[r["rep"]] for r in results.get(a, [])
                   if by_rep.get(r.get("rep"))]
        if per_rep:
            ratios[key] = statistics.median(per_rep)
    pipe = {}
    for impl in ("rust", "torchvision"):
        for w in (0, workers):
            pipe[f"{impl}-{w}"] = median([r for r in pipeline if r["impl"] == impl and r["workers"] == w],
                                         "images_per_s")
    return {"summary": summary, "ratios": ratios, "data_pipeline": pipe}


def is_cold(run):
    """Whether a Rust run timed its layout and convolutions itself (nothing from the tuning cache)."""
    t = run.get("tuning")
    return t is not None and not t["layout_cached"] and t["conv_cached"] == 0


def time_shares(rows):
    """Shares of the training loop's wall time, each run's then their medians: the steps (d2l's
    timer), waiting for the training loader, evaluation, the rest (bookkeeping)."""
    shares = []
    for r in rows:
        t = r["timing"]
        rest = t["wall_s"] - t["step_s"] - t["data_wait_s"] - t["eval_s"]
        # PyTorch's side times its steps with d2l's Timer (time.time(), as the book does) and the
        # rest with a monotonic clock: when the two disagree by a hair the rest comes out a hair
        # below zero (seen: -1.2 ms of a 1 s toy run). Up to 1% of the wall is that; more is a bug.
        if -0.01 * t["wall_s"] < rest < 0:
            rest = 0.0
        shares.append({"steps": t["step_s"] / t["wall_s"], "wait": t["data_wait_s"] / t["wall_s"],
                       "eval": t["eval_s"] / t["wall_s"], "rest": rest / t["wall_s"]})
    return {k: median(shares, k) for k in ("steps", "wait", "eval", "rest")}


def cpu_model():
    """The CPU's model name and its vector extensions (the figures hold for this CPU only)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {"model": platform.processor() or None, "flags": []}
    first = info.split("\n\n")[0]
    fields = {k.strip(): v for k, v in (line.split(":", 1) for line in first.splitlines() if ":" in line)}
    flags = fields.get("flags", "").split()
    wanted = ("sse4_1", "sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
              "amx_tile")
    return {"model": fields.get("model name", "").strip(), "flags": [f for f in wanted if f in flags]}


def kernel_env():
    """The variables that change the kernels libtorch picks, as set for this run."""
    return {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR")
            if k in os.environ}


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
