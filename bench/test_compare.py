#!/usr/bin/env python3
"""Checks of bench/compare.py's own behaviour when a row fails, run by scripts/test.

The GPU run happens once, on borrowed time, so compare.py must keep what it measured when one
process fails, hangs or the run is stopped: this runs it with the real Rust binaries (argv[1],
tiny settings) and a stand-in for PyTorch's python that fails, hangs (with a child that keeps the
pipes open, like a DataLoader worker), or looks at the report while the run is under way.

    python3 bench/test_compare.py target/debug/examples
"""
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Each run's bound: the hung row is killed after it. The real Rust rows (debug binaries, tiny
# settings) take about a second, but a machine busy with other work stretched them past 3 s and
# failed the check; 20 s keeps a wide margin, at the cost of waiting that long for the hung row.
RUN_TIMEOUT = 20

# Called as `python chapter_torch.py e2e DATA ... --variant book|tuned`, `chapter_torch.py step ...`
# or `data_pipeline.py ...`.
FAKE_PYTHON = """#!/bin/sh
case "$*" in
  *"--variant book"*)
    # Hangs, and so does a child of it that holds stdout and stderr open; the child leaves a mark
    # if it lives to the end of its sleep (it should be killed long before).
    (sleep 60; touch "$D2L_FAKE_DIR/child.finished") & echo $! > "$D2L_FAKE_DIR/child.pid"
    sleep 60 ;;
  *"--variant tuned"*)
    # The report as it stands while this row runs.
    cp "$D2L_FAKE_OUT" "$D2L_FAKE_DIR/during.json"
    echo "no torchvision here" >&2; exit 3 ;;
  *) echo "no torch here" >&2; exit 3 ;;
esac
"""


def main():
    bin_dir = Path(sys.argv[1]).resolve()
    with tempfile.TemporaryDirectory(prefix="d2l-test-compare-") as tmp:
        tmp = Path(tmp)
        fake = tmp / "python"
        fake.write_text(FAKE_PYTHON)
        fake.chmod(0o755)
        out = tmp / "compare.json"
        env = dict(os.environ, D2L_FAKE_DIR=str(tmp), D2L_FAKE_OUT=str(out))
        t = time.perf_counter()
        # timeout: a bound on this check, so that a compare.py that hangs fails instead.
        run = subprocess.run([sys.executable, ROOT / "bench" / "compare.py", "--bin-dir", bin_dir, "--python", fake,
                              "--crop", "16", "--resize", "20", "--batch", "4", "--epochs", "1", "--steps", "2",
                              "--reps", "1", "--per-class", "4", "--workers", "2", "--options", "--run-timeout", str(RUN_TIMEOUT),
                              "--data", tmp / "data", "--out", out],
                             capture_output=True, text=True, env=env, timeout=600)
        wall = time.perf_counter() - t
        assert run.returncode == 1, (run.returncode, run.stdout, run.stderr)
        assert "bench: 5 run(s) failed" in run.stderr, run.stderr

        report = json.loads(out.read_text())
        assert report["complete"] is True
        assert not out.with_name(out.name + ".tmp").exists()
        # The Rust rows ran and are summarised; the failed ones are left out, with their ratios.
        assert set(report["summary"]) == {"rust", "rust-no-im2col", "rust-bf16-cl"}, report["summary"].keys()
        assert report["summary"]["rust"]["e2e_images_per_s"] > 0
        assert report["summary"]["rust"]["fraction_of_step_only"] > 0
        assert set(report["ratios"]) == {"rust_step_host_input_vs_step"}, report["ratios"]
        assert report["data_pipeline"]["rust-0"] > 0 and report["data_pipeline"]["torchvision-0"] is None
        failed = {(f["kind"], f["row"]): f["error"] for f in report["failed"]}
        assert set(failed) == {("e2e", "torch-book"), ("e2e", "torch-tuned"), ("step", "torch"),
                               ("pipeline", "torchvision-0"), ("pipeline", "torchvision-2")}, failed
        assert failed[("e2e", "torch-book")].startswith(f"timed out after {RUN_TIMEOUT:.1f} s"), failed
        assert "exit status 3" in failed[("e2e", "torch-tuned")] and "no torchvision" in failed[("e2e", "torch-tuned")]
        # The hung row's whole process group was killed: its child is gone, and it never reached
        # the end of its sleep (had compare.py waited for the pipes to close, it would have).
        child = int((tmp / "child.pid").read_text())
        time.sleep(0.2)
        assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2], child
        assert not (tmp / "child.finished").exists(), "the hung row's child lived to the end of its sleep"

        # Mid-run, the report already held what was measured before, and said it was not complete.
        during = json.loads((tmp / "during.json").read_text())
        assert during["complete"] is False
        assert set(during["summary"]) == {"rust"} and during["runs"]["e2e"]["rust"], during["summary"]
        assert [f["row"] for f in during["failed"]] == ["torch-book"], during["failed"]
        # bench/report.py says so too, and fails.
        shown = subprocess.run([sys.executable, ROOT / "bench" / "report.py", out], capture_output=True, text=True)
        assert shown.returncode == 1, shown
        assert "| Rust (d2l-rs) | **" in shown.stdout and "failed: e2e torch-book (rep 1): timed out" in shown.stdout
        assert "target rust_vs_torch_book_e2e >= 1.3: - NOT met" in shown.stdout, shown.stdout
    print(f"compare.py failures: 5 failed runs reported, the Rust rows kept, a hung row killed ({wall:.0f} s)")


if __name__ == "__main__":
    main()
