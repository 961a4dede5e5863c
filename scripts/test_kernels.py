#!/usr/bin/env python3
"""The Rust tests under each of libtorch's CPU kernel sets, as other x86-64 CPUs would pick them.

libtorch chooses its kernels by what the CPU can do: ATen's vectorised kernels by
ATEN_CPU_CAPABILITY (default, avx2, avx512), oneDNN's convolutions by ONEDNN_MAX_CPU_ISA
(SSE41, AVX2, ...) and MKL's matrix products (at::mm, the im2col path's) by
MKL_ENABLE_INSTRUCTIONS (SSE4_2, AVX2, AVX512) on Intel CPUs; MKL ignores that variable on others
(on an AMD EPYC, Zen 3, a 2048x2048 product ran 139 GFLOPS with it at SSE4_2 and 129 without),
where only MKL_CBWR=COMPATIBLE (its SSE2 code, 44 GFLOPS there) caps it. The variables cap the
choice, so one machine can run the tests the way an older or a different CPU would, with other
summation orders; the rows that stand for a whole CPU (an AVX2 one, an old one) cap all three.
This runs `cargo test --workspace` once with nothing set and once under each setting (leaving
out the binaries in KERNEL_FREE, which test archives, downloads and processes, not numbers)
(avx512 only where the CPU has it; all at their lowest, as on an old CPU), and prints a table:
setting, what libtorch says it picked, tests passed and failed, the failures, the time.
scripts/test runs it.

    python3 scripts/test_kernels.py                   # every Rust test, every setting
    python3 scripts/test_kernels.py --test channels_last --test resnet_parity
    python3 scripts/test_kernels.py --settings ATEN_CPU_CAPABILITY=default ''   # '' = nothing set

Needs the set-up (scripts/setup.py) and the PyTorch fixtures of the parity tests, which it writes
like scripts/test does when they are missing. Exit status 1 if any setting has a failure.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = [
    "",  # nothing set: what this CPU picks
    "ATEN_CPU_CAPABILITY=default",
    "ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2",
    "ATEN_CPU_CAPABILITY=avx512",
    "ONEDNN_MAX_CPU_ISA=SSE41",
    "ONEDNN_MAX_CPU_ISA=AVX2",
    # An old CPU: everything at its lowest.
    "ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 MKL_ENABLE_INSTRUCTIONS=SSE4_2 MKL_CBWR=COMPATIBLE",
]
# Test binaries whose results cannot depend on libtorch's kernels (archives, downloads, caches,
# processes, faults and the tuning cache): the first row runs them, the other rows leave them out.
KERNEL_FREE = {"archive_bombs", "cache_concurrency", "cache_faults", "ddp", "dist", "download", "download_hub",
               "tuning"}

# What ATen needs of the CPU for its avx512 kernels (aten/src/ATen/native/DispatchStub.cpp).
AVX512_FLAGS = {"avx512f", "avx512bw", "avx512vl", "avx512dq"}

# What libtorch picked, asked of Python's torch (the same libtorch 2.11 as tch's): ATen's
# capability, and the ISA oneDNN reports when it runs its first convolution.
PROBE = """
import torch
print("aten", torch.backends.cpu.get_cpu_capability())
torch.nn.functional.conv2d(torch.randn(8, 64, 32, 32), torch.randn(64, 64, 3, 3))  # big enough for oneDNN
torch.randn(64, 64) @ torch.randn(64, 64)  # MKL's sgemm
"""


def cpu_flags():
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_model():
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def env_for(setting):
    env = dict(os.environ)
    for key in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR"):
        env.pop(key, None)
    for var in setting.split():
        key, value = var.split("=", 1)
        env[key] = value
    return env


def picked(torch_py, env):
    """'aten avx2, oneDNN AVX2, MKL AVX2' as libtorch reports it under `env`."""
    out = subprocess.run([torch_py, "-c", PROBE], env=dict(env, ONEDNN_VERBOSE="1", MKL_VERBOSE="1"),
                         capture_output=True, text=True)
    aten = re.search(r"^aten (\S+)", out.stdout, re.M)
    isa = re.search(r"isa:([^,\n]+)", out.stdout)
    if out.returncode != 0 or not aten:
        return f"(probe failed: {out.stderr.strip().splitlines()[-1:]})"
    isa = isa.group(1).strip() if isa else "?"
    isa = re.sub(r"^Intel ", "", isa)
    # "MKL_VERBOSE oneMKL 2024.0 ... Intel(R) Advanced Vector Extensions 2 (Intel(R) AVX2) ..."
    mkl = re.search(r"MKL_VERBOSE oneMKL.*?\(Intel\(R\) ([^)]+)\)", out.stdout)
    mkl = mkl.group(1) if mkl else "?"
    # On other CPUs MKL names no instruction set; its SSE2 code shows as "CNR:COMPATIBLE".
    cnr = re.search(r"CNR:(\S+)", out.stdout)
    if cnr and cnr.group(1) != "OFF":
        mkl = f"{mkl} (CNR {cnr.group(1)})" if mkl != "?" else f"CNR {cnr.group(1)}"
    return f"aten {aten.group(1).lower()}, oneDNN {isa}, MKL {mkl}"


def run_tests(env, tests, log, lib=False):
    cmd = ["cargo", "test", "--workspace", "--no-fail-fast"] + (["--lib"] if lib else [])
    for t in tests:
        cmd += ["--test", t]
    start = time.perf_counter()
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    log.write_text(run.stdout + run.stderr)
    results = re.findall(r"^test (.+?) \.\.\. (ok|FAILED|ignored)", run.stdout, re.M)
    passed = sum(1 for _, r in results if r == "ok")
    failed = [name for name, r in results if r == "FAILED"]
    # A binary that did not build or crashed reports no test lines: count it as a failure, and
    # print why (CI keeps this script's output, not the log).
    if run.returncode != 0 and not failed:
        failed = [f"(cargo test exit status {run.returncode}, see {log})"]
        print(f"test_kernels: cargo test failed without a test failing; from {log}:\n{why(run)}",
              file=sys.stderr, flush=True)
    return passed, failed, wall


def why(run, lines=40):
    """The lines of cargo's output that say what went wrong: errors and crashes, else its tail."""
    text = (run.stdout + run.stderr).splitlines()
    marks = re.compile(r"^(error|warning: build failed)|could not compile|No space left|"
                       r"process didn't exit successfully|signal: |panicked at|Killed")
    keep = [i for i, line in enumerate(text) if marks.search(line)]
    picked = sorted({j for i in keep for j in range(i, min(i + 6, len(text)))})[:lines]
    shown = [text[j] for j in picked] if keep else text[-lines:]
    # A full disk fails the link of a test binary: say how much room the checkout has.
    free = shutil.disk_usage(ROOT).free / 2**30
    return "\n".join(shown + [f"(free space on the checkout's disk: {free:.1f} GiB)"])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--test", action="append", default=[], help="only this test binary (repeatable)")
    ap.add_argument("--settings", nargs="+",
                    help="these settings (e.g. ONEDNN_MAX_CPU_ISA=SSE41; several variables space-separated; '' for none)")
    args = ap.parse_args()

    setup = [sys.executable, str(ROOT / "scripts" / "setup.py")]
    subprocess.run(setup, check=True, stdout=subprocess.DEVNULL)
    torch_py = subprocess.run(setup + ["--torch", "cuda", "--print-venv"], check=True,
                              capture_output=True, text=True).stdout.strip() + "/bin/python"
    if not Path(torch_py).exists():
        subprocess.run(setup + ["--torch", "cuda", "--python-only"], check=True)
    parity = ROOT / "target" / "parity"
    if not (parity / "losses.json").exists():
        subprocess.run([torch_py, str(ROOT / "tests/fixtures/resnet/make_parity.py"), str(parity)], check=True)

    flags = cpu_flags()
    settings = args.settings if args.settings is not None else SETTINGS
    logs = ROOT / "target" / "test-kernels"
    logs.mkdir(parents=True, exist_ok=True)
    rows, bad = [], 0
    kernel_tests = sorted(p.stem for p in (ROOT / "tests").glob("*.rs") if p.stem not in KERNEL_FREE)
    for row, setting in enumerate(settings):
        if "ATEN_CPU_CAPABILITY=avx512" in setting and not AVX512_FLAGS <= flags:
            rows.append((setting, "not on this CPU", "-", "-", "skipped", "-"))
            continue
        env = env_for(setting)
        name = setting or "(nothing set)"
        print(f"test_kernels: {name} ...", file=sys.stderr, flush=True)
        log = logs / (re.sub(r"\W+", "_", setting or "unset") + ".log")
        # The first row runs everything; the others, the tests whose numbers libtorch computes.
        tests = args.test or ([] if row == 0 else kernel_tests)
        passed, failed, wall = run_tests(env, tests, log, lib=not args.test and row > 0)
        bad += bool(failed)
        rows.append((name, picked(torch_py, env), str(passed), str(len(failed)),
                     "; ".join(failed) or "-", f"{wall:.0f} s"))

    print(f"\nCPU: {cpu_model()} ({os.cpu_count()} cores), "
          f"AVX-512: {'yes' if AVX512_FLAGS <= flags else 'no'}; tests: {' '.join(args.test) or 'all'}\n")
    head = ("setting", "libtorch picked", "passed", "failed", "failures", "time")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
