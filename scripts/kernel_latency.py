#!/usr/bin/env python3
"""How long a reader waits for the `rust-d2l` kernel, started exactly as Jupyter starts it.

It starts the kernel with jupyter_client (the kernelspec's own launcher and environment, in the
notebooks' folder, with none of the runner's variables), runs the chapter notebook's first code
cells (the `:dep` cell, the `use` cell) and a cell that calls `d2l`, and prints the seconds each
took:

  - a fresh kernel: its start and its first cells;
  - a restart of that kernel: the same cells again;
  - two kernels open at once: both run the cells at the same time, then each runs one more, so
    that neither broke the other.

    .d2l/venv/bin/python scripts/kernel_latency.py                 # all three, a table
    .d2l/venv/bin/python scripts/kernel_latency.py --json out.json
    .d2l/venv/bin/python scripts/kernel_latency.py --warm          # one kernel, the cells once
    .d2l/venv/bin/python scripts/kernel_latency.py --warm --kernels 2   # two at once

`--warm` is what scripts/setup.py runs to compile the kernels' dependencies ahead (with
`--kernels 2`, the build folders of two kernels open at once). Exit status 1 if a cell fails.
"""
import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

from jupyter_client.manager import KernelManager

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "fine-tuning.ipynb"
KERNEL = "rust-d2l"
# Variables that the notebook runner or a benchmark may have set: a reader's Jupyter has none.
RUNNER_VARS = ("EVCXR_TMPDIR", "D2L_EVCXR_BUILD_HOME", "D2L_PROFILE", "D2L_OUT")
# A cell that calls d2l and says which build folder its kernel got.
CHECK_CELL = ('println!("d2l sees {}; build folder {}", d2l::try_all_gpus(), '
              'std::env::var("EVCXR_TMPDIR").unwrap_or_default());')


class CellFailed(Exception):
    pass


def first_cells(n=2):
    nb = json.loads(NOTEBOOK.read_text())
    code = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    if not code or not code[0].lstrip().startswith(":dep"):
        raise SystemExit(f"{NOTEBOOK}: its first code cell is not a :dep cell")
    return code[:n]


def reader_env():
    env = dict(os.environ)
    for var in RUNNER_VARS:
        env.pop(var, None)
    return env


class Kernel:
    """A kernel as Jupyter starts one: its kernelspec, the notebook's folder as working dir."""

    def __init__(self, timeout):
        self.timeout = timeout
        self.km = KernelManager(kernel_name=KERNEL)
        start = time.perf_counter()
        self.km.start_kernel(cwd=str(NOTEBOOK.parent), env=reader_env())
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=timeout)
        self.start_s = time.perf_counter() - start

    def run(self, code):
        """Seconds the cell took; raises CellFailed with its error or stderr. What the cell printed
        is kept in `self.stdout`."""
        out, failed, self.stdout = [], [], ""

        def hook(msg):
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream" and content.get("name") == "stderr":
                out.append(content["text"])
            elif kind == "stream":
                self.stdout += content["text"]
            elif kind == "error":
                failed.append(f"{content.get('ename')}: {content.get('evalue')}")

        start = time.perf_counter()
        reply = self.kc.execute_interactive(code, timeout=self.timeout, output_hook=hook)
        took = time.perf_counter() - start
        if reply["content"]["status"] != "ok" or failed:
            raise CellFailed(f"cell {code.splitlines()[0]!r} failed: {' '.join(failed)} {''.join(out)[-2000:]}")
        return took

    def restart(self):
        start = time.perf_counter()
        self.km.restart_kernel(now=False)
        self.kc.wait_for_ready(timeout=self.timeout)
        return time.perf_counter() - start

    def close(self):
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=False)


def cells_row(kernel, cells):
    return [kernel.run(c) for c in cells] + [kernel.run(CHECK_CELL)]


def measure(timeout):
    cells = first_cells()
    rows = {}
    k = Kernel(timeout)
    try:
        rows["fresh kernel"] = [k.start_s, *cells_row(k, cells)]
        restart_s = k.restart()
        rows["after a restart"] = [restart_s, *cells_row(k, cells)]
    finally:
        k.close()
    # Two kernels open at once, as two notebooks in Jupyter Lab: started together, their first
    # cells run together, then each runs one more cell.
    kernels, results, errors = [], {}, []

    def one(name):
        try:
            kern = Kernel(timeout)
            kernels.append(kern)
            results[name] = [kern.start_s, *cells_row(kern, cells)]
        except Exception as e:  # reported below, with the other kernel's figures
            errors.append(f"{name}: {e}")

    threads = [threading.Thread(target=one, args=(f"two at once: kernel {i}",)) for i in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        folders = []
        for kern in kernels:
            kern.run(CHECK_CELL)  # each still works with the other one open
            folders.append(kern.stdout.rsplit("build folder ", 1)[-1].strip())
        if len(folders) == 2 and folders[0] == folders[1]:
            errors.append(f"two kernels open at once share the build folder {folders[0]!r}")
    except CellFailed as e:
        errors.append(str(e))
    finally:
        for kern in kernels:
            kern.close()
    rows.update(sorted(results.items()))
    return rows, errors


def warm(n, timeout):
    """Starts `n` kernels at once (each takes its own build folder) and runs the first cells in
    each: seconds each took, and errors."""
    cells, took, errors, kernels = first_cells(), [], [], []

    def one():
        try:
            kern = Kernel(timeout)
            kernels.append(kern)
            took.append(sum(cells_row(kern, cells)))
        except Exception as e:  # reported by the caller
            errors.append(str(e))

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for kern in kernels:
        kern.close()
    return sorted(took), errors


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--warm", action="store_true", help="start kernels and run the first cells once")
    ap.add_argument("--kernels", type=int, default=1, help="with --warm: how many at once (default 1)")
    ap.add_argument("--timeout", type=int, default=1200, help="seconds a cell may take (default 1200)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()

    if args.warm:
        took, errors = warm(args.kernels, args.timeout)
        if errors:
            sys.exit(f"kernel_latency: {'; '.join(errors)}")
        print(f"kernel {KERNEL}: first cells ready in " + ", ".join(f"{t:.1f} s" for t in took))
        return

    rows, errors = measure(args.timeout)
    head = ("kernel", "start s", ":dep cell s", "use cell s", "d2l cell s")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for name, figures in rows.items():
        print(f"| {name} | " + " | ".join(f"{v:.1f}" for v in figures) + " |")
    for e in errors:
        print(f"FAILED: {e}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"columns": head[1:], "rows": rows, "errors": errors}, indent=1))
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
