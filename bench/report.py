#!/usr/bin/env python3
"""The README's table from a bench/compare.py report, and the issue's targets checked against it.

    python3 bench/report.py target/bench/compare-cpu-32px.json
    python3 bench/report.py compare-gpu.json          # what bench/gpu/run.sh wrote under $OUT

Prints a Markdown table (the same columns as README's "Performance"), the ratios, the other
step-only rows, and each target with "met" or "NOT met": end-to-end at least 1.3x the book's
PyTorch code and 1.0x tuned PyTorch on the CPU; on the GPU at least 4x and 1.2x, and at least 85%
of the step-only limit. Exit status 1 if a target is not met or the report is incomplete.
"""
import json
import statistics
import sys

LABELS = {"rust": "Rust (d2l-rs)", "torch-book": "PyTorch, book", "torch-tuned": "PyTorch, tuned",
          "rust-no-im2col": "Rust, `--no-im2col`", "rust-bf16-cl": "Rust, bf16 + channels-last"}
TARGETS = {
    "cpu": [("rust_vs_torch_book_e2e", 1.3), ("rust_vs_torch_tuned_e2e", 1.0)],
    "cuda": [("rust_vs_torch_book_e2e", 4.0), ("rust_vs_torch_tuned_e2e", 1.2), ("rust_fraction_of_step_only", 0.85)],
}


def num(v, spec):
    return "-" if v is None else format(v, spec)


def table(report):
    s = report["settings"]
    lines = [f"| {s['crop']} px, batch {s['batch']} | end-to-end img/s | d2l ex/s | epoch s | first batch s | "
             "peak RSS MiB (+ workers) | step-only img/s | e2e / step-only | steps / wait / eval |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, row in report["summary"].items():
        rss = num(row["peak_rss_mib"], ".0f")
        if row.get("peak_rss_worker_mib"):
            rss += f" + {row['peak_rss_worker_mib']:.0f}"
        shares = row["time_shares"]
        e2e = num(row["e2e_images_per_s"], ".1f")
        lines.append(f"| {LABELS.get(name, name)} | {f'**{e2e}**' if name == 'rust' else e2e} | "
                     f"{num(row['d2l_examples_per_s'], '.1f')} | {num(row['epoch_wall_s'], '.2f')} | "
                     f"{num(row['first_batch_s'], '.3f')} | {rss} | {num(row['step_only_images_per_s'], '.1f')} | "
                     f"{num(row['fraction_of_step_only'], '.1%')} | "
                     f"{shares['steps']:.1%} / {shares['wait']:.1%} / {shares['eval']:.1%} |".replace("% /", " /"))
    return "\n".join(lines)


def describe(report):
    """The report's table, its other step-only rows, ratios and data-pipeline figures, as lines."""
    lines = [table(report), ""]
    for name, rows in report["runs"]["step"].items():
        if name not in report["summary"] and name != "torch" and rows:
            lines.append(f"step-only {name}: {statistics.median(r['images_per_s'] for r in rows):.1f} img/s")
    for name, row in report["summary"].items():
        if row.get("cold_e2e_images_per_s"):
            lines.append(f"{name}: {num(row['cold_e2e_images_per_s'], '.1f')} img/s end to end in the "
                         f"{row['cold_runs']} run(s) that timed their layout and convolutions (nothing in the "
                         "tuning cache yet); the others read the first run's choices")
    lines.append("ratios: " + ", ".join(f"{k} {v:.2f}x" for k, v in report["ratios"].items()))
    lines.append("data pipeline alone (img/s): "
                 + ", ".join(f"{k} workers {num(v, '.1f')}" for k, v in report["data_pipeline"].items()))
    return lines


def targets(report):
    """(name, measured, target, met) for the report's device; measured is None when a row is missing."""
    ratios = dict(report["ratios"])
    ratios["rust_fraction_of_step_only"] = report["summary"].get("rust", {}).get("fraction_of_step_only")
    out = []
    for key, target in TARGETS[report["machine"]["device"]]:
        v = ratios.get(key)
        out.append((key, v, target, v is not None and v >= target))
    return out


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    try:
        report = json.loads(open(sys.argv[1]).read())
    except (OSError, ValueError) as e:
        sys.exit(f"report: cannot read {sys.argv[1]}: {e}")
    m, s = report["machine"], report["settings"]
    print(f"{report['date']}, {m['node']} ({m['cores']} cores, {m['device']}{', ' + m['gpu'] if m.get('gpu') else ''}); "
          f"{s['epochs']} epochs, {s['per_class']} + {s.get('test_per_class', s['per_class'] // 4)} images a class, "
          f"medians of {s['reps']}; data: {s.get('source', 'synthetic')}")
    if m.get("cpu"):
        kernels = ", ".join(f"{k}={v}" for k, v in m.get("kernels", {}).items()) or "libtorch's default kernels"
        print(f"CPU: {m['cpu']['model']} ({' '.join(m['cpu']['flags'])}); {kernels}")
    print()
    print("\n".join(describe(report)))
    ok = report.get("complete", True) and not report.get("failed")
    if not report.get("complete", True):
        print("report is INCOMPLETE: the run was stopped before its end")
    for f in report.get("failed", []):
        print(f"failed: {f['kind']} {f['row']} (rep {f['rep']}): {f['error'].splitlines()[-1]}")
    for key, v, target, met in targets(report):
        print(f"target {key} >= {target:g}: {num(v, '.2f')} {'met' if met else 'NOT met'}")
        ok &= met
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
