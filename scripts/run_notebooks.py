#!/usr/bin/env python3
"""Execute notebooks headless with the project's Rust kernel and render them to HTML.

For each notebook it writes the executed `.ipynb` and a self-contained `.html` (images embedded)
under target/notebooks/, also when it fails, so the failure can be read there. A notebook fails on
a compile error, an error output, a panic, or a missing expected output. Its metadata can say what
must appear: MIME types (`"d2l": {"expect_outputs": ["image/png"]}`), at least N images
(`"expect_images": 7`), and lines of printed text matching a pattern at least N times
(`"expect_text": [{"pattern": "^loss \\d", "min": 2}]`; a cell's value counts as printed). Ends with
`notebooks: N passed, N failed` and exits non-zero if any failed.

Run it with the project venv's python (scripts/run and scripts/test do).
"""

import argparse
import os
import re
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError
from nbconvert import HTMLExporter
from traitlets.config import Config

ROOT = Path(__file__).resolve().parent.parent
KERNEL = "rust-d2l"
# The kernel's launcher (scripts/kernel_launch.py) gives each kernel a persistent build folder of
# its own, the one a reader's Jupyter uses too. D2L_EVCXR_BUILD_HOME: build in this folder
# instead (bench/compare.py times a cold kernel with an empty one).
BUILD_HOME = os.environ.get("D2L_EVCXR_BUILD_HOME")
PANIC = "panicked at"


def problems(nb):
    """What is wrong with an executed notebook that nbclient itself lets pass."""
    found, mimes, images, lines = [], set(), 0, []
    for index, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            images += "image/png" in out.get("data", {})
            if out.get("output_type") == "stream":
                lines += out.get("text", "").splitlines()
            if out.get("output_type") == "execute_result":  # a cell's value, as evcxr shows it
                value = out.get("data", {}).get("text/plain", "")
                lines += value.splitlines()
                if value.strip() == "()":
                    found.append(f"cell {index} shows `()`: end its last statement with `;`")
            if out.get("output_type") == "error":
                found.append(f"cell {index}: {out.get('ename', 'error')}: {out.get('evalue', '')}".strip())
            if out.get("output_type") == "stream" and PANIC in out.get("text", ""):
                line = next(l for l in out["text"].splitlines() if PANIC in l)
                found.append(f"cell {index}: panic: {line.strip()}")
            mimes.update(out.get("data", {}).keys())
    expect = nb.metadata.get("d2l", {})
    for mime in expect.get("expect_outputs", []):
        if mime not in mimes:
            found.append(f"no {mime} output (the notebook's metadata expects one)")
    if images < expect.get("expect_images", 0):
        found.append(f"{images} image/png outputs, the notebook's metadata expects {expect['expect_images']}")
    for rule in expect.get("expect_text", []):
        n = sum(1 for line in lines if re.search(rule["pattern"], line))
        if n < rule.get("min", 1):
            found.append(f"{n} printed lines match {rule['pattern']!r}, the notebook's metadata expects {rule.get('min', 1)}")
    return found


def execute(path, out_dir, timeout):
    nb = nbformat.read(path, as_version=4)
    nb.metadata["kernelspec"] = {"name": KERNEL, "display_name": KERNEL, "language": "rust"}
    if BUILD_HOME:
        build_dir = Path(BUILD_HOME) / path.stem
        build_dir.mkdir(parents=True, exist_ok=True)
        os.environ["EVCXR_TMPDIR"] = str(build_dir)
    client = NotebookClient(nb, timeout=timeout, kernel_name=KERNEL,
                            resources={"metadata": {"path": str(path.parent)}})
    errors = []
    try:
        client.execute()
    except CellExecutionError:
        errors.append(None)  # its error output is in the notebook: problems() names the cell
    except (CellTimeoutError, DeadKernelError, RuntimeError) as e:
        errors.append(f"{type(e).__name__}: {e}")
    errors = [e for e in errors if e] + problems(nb) or (["a cell failed"] if errors else [])

    out_dir.mkdir(parents=True, exist_ok=True)
    ipynb, html = out_dir / path.name, out_dir / f"{path.stem}.html"
    nbformat.write(nb, ipynb)
    # Figures come as SVG (what Jupyter shows, as the book's) and PNG: the page embeds the PNG,
    # which check_html.py finds pixel for pixel in Chromium's screenshot.
    priority = HTMLExporter().default_config.NbConvertBase.display_data_priority
    png_first = ["image/png"] + [m for m in priority if m != "image/png"]
    exporter = HTMLExporter(config=Config({"NbConvertBase": {"display_data_priority": png_first}}))
    body, _ = exporter.from_notebook_node(nb)
    html.write_text(body, encoding="utf-8")
    return errors, ipynb, html


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("notebooks", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=ROOT / "target" / "notebooks")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds a cell may run (default 1800)")
    ap.add_argument("--expect-fail", action="store_true",
                    help="check the runner itself: a notebook passes only if its run fails")
    args = ap.parse_args()

    passed = failed = 0
    for path in args.notebooks:
        path = path.resolve()
        start = time.monotonic()
        print(f"notebook {path.name}: running", flush=True)
        errors, ipynb, html = execute(path, args.out, args.timeout)
        took = time.monotonic() - start
        ok = bool(errors) if args.expect_fail else not errors
        passed, failed = passed + ok, failed + (not ok)
        verdict = {(False, True): "passed", (False, False): "FAILED",
                   (True, True): "failed as expected", (True, False): "PASSED but must fail"}
        print(f"notebook {path.name}: {verdict[args.expect_fail, ok]} in {took:.1f} s", flush=True)
        for e in errors:
            print(f"  {e}", flush=True)
        print(f"  executed: {ipynb}\n  html:     {html}", flush=True)
    label = "must-fail notebooks" if args.expect_fail else "notebooks"
    print(f"{label}: {passed} passed, {failed} failed", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
