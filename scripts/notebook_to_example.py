#!/usr/bin/env python3
"""Writes each notebook's example binary from its cells, so that the two cannot drift apart.

`notebooks/<name>.ipynb` -> `examples/<name with _>.rs`: the notebook's cells in order, in
jupytext's percent format (`// %%` before a code cell, `// %% [markdown]` and the text as
comments before a markdown cell), inside one function that runs in the notebooks' folder, so that
relative paths (`../data`, `../target/...`) mean what they mean in Jupyter. What only evcxr
understands is translated: `:dep` lines are the crate's dependencies already, and a cell whose
last line is a value (no `;`) prints it with `{:?}`, as evcxr shows it. The result goes through
rustfmt.

    python3 scripts/notebook_to_example.py            # write the examples
    python3 scripts/notebook_to_example.py --check    # exit 1 if one differs (scripts/test)

Edit the notebook, never the example.
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

HEADER = '''//! GENERATED from `notebooks/{notebook}` by `scripts/notebook_to_example.py`: edit the
//! notebook, then run `python3 scripts/notebook_to_example.py` (`scripts/test` fails while the
//! two differ).
//!
//! The notebook outside Jupyter: its code cells in order, in one function that runs in the
//! notebooks' folder, printing the same lines. A cell's value is printed with `{{:?}}`, as evcxr
//! shows it; figures are saved to files instead of shown.
//!
//! ```text
//! cargo run --release --example {example}
//! D2L_PROFILE=offline cargo run --release --example {example}
//! ```
//! Figures, with each training run's history beside its curves, go to `$D2L_OUT/figures`
//! (default `target/{example_dir}/figures`). Ctrl-C stops after the current step; a second
//! Ctrl-C quits at once.
//!
//! Distributed data-parallel training, each process its share of every batch (the notebook
//! itself stays one process): `--nproc N` runs N processes on this machine, or launch it with
//! PyTorch's launcher, on one machine or several:
//!
//! ```text
//! cargo run --release --example {example} -- --nproc 2
//! torchrun --no-python --nproc-per-node 2 target/release/examples/{example}
//! torchrun --no-python --nnodes 2 --node-rank 0 --master-addr HOST --master-port 29500 \
//!     --nproc-per-node 8 target/release/examples/{example}
//! ```
//! Rank 0 prints and saves the figures; the result lines are the whole group's.
use std::process::ExitCode;

fn main() -> ExitCode {{
    if let Some(launched) = d2l::dist::launch_from_args() {{
        return launched.unwrap_or_else(|e| d2l::exit_code(Err(e)));
    }}
    d2l::exit_code(run())
}}

fn run() -> d2l::Result<()> {{
    d2l::train::install_ctrl_c_handler()?;
    // Under torchrun or --nproc: join the group (train_ch13 then trains across it).
    d2l::dist::init_process_group()?;
    d2l::dist::quiet_unless_main()?;
    let out = std::env::var_os("D2L_OUT").map_or_else(
        || std::path::PathBuf::from("target/{example_dir}"),
        std::path::PathBuf::from,
    );
    let figures = std::path::absolute(out.join("figures"))
        .map_err(|source| d2l::Error::Io {{ path: out.clone(), source }})?;
    d2l::set_figures_dir(figures);
    let notebooks = concat!(env!("CARGO_MANIFEST_DIR"), "/notebooks");
    std::env::set_current_dir(notebooks)
        .map_err(|source| d2l::Error::Io {{ path: notebooks.into(), source }})?;
'''


class NotebookError(Exception):
    pass


def is_value(line):
    """Whether a cell's last line is a value evcxr would show (an expression without `;`)."""
    code = line.split("//", 1)[0].strip()
    return bool(code) and not code.endswith((";", "}", "{", ","))


def cell_code(source, where):
    lines = [l for l in source.splitlines() if not l.lstrip().startswith(":dep ")]
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        return []
    if is_value(lines[-1]):
        expr = lines[-1].strip()
        if expr.startswith(("let ", "fn ", "use ")):
            raise NotebookError(f"{where}: its last line {expr!r} needs a `;`")
        lines[-1] = f'println!("{{:?}}", {expr});'
    return lines


def generate(notebook):
    nb = json.loads(notebook.read_text())
    example = notebook.stem.replace("-", "_")
    parts = [HEADER.format(notebook=notebook.name, example=example, example_dir=notebook.stem)]
    for i, cell in enumerate(nb["cells"]):
        source = "".join(cell["source"])
        if cell["cell_type"] == "markdown":
            parts.append("    // %% [markdown]")
            parts += [f"    // {l}".rstrip() for l in source.splitlines()]
        elif cell["cell_type"] == "code":
            lines = cell_code(source, f"{notebook.name}, cell {i}")
            if lines:
                parts.append("    // %%")
                parts += [f"    {l}".rstrip() for l in lines]
        parts.append("")
    parts.append("    Ok(())\n}\n")
    return ROOT / "examples" / f"{example}.rs", rustfmt("\n".join(parts), notebook.name)


def rustfmt(text, what):
    try:
        fmt = subprocess.run(["rustfmt", "--edition", "2021", "--emit", "stdout"], input=text,
                             capture_output=True, text=True)
    except FileNotFoundError:
        raise NotebookError("rustfmt is not on PATH: run `rustup component add rustfmt`")
    if fmt.returncode != 0:
        raise NotebookError(f"{what}: its code does not parse as Rust:\n{fmt.stderr}")
    return fmt.stdout


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 if an example differs")
    ap.add_argument("notebooks", nargs="*", type=Path)
    args = ap.parse_args()
    notebooks = args.notebooks or sorted((ROOT / "notebooks").glob("*.ipynb"))
    stale = []
    for notebook in notebooks:
        try:
            path, text = generate(notebook)
            # Both through this machine's rustfmt: another rustfmt version is no drift.
            same = path.exists() and rustfmt(path.read_text(), path.name) == text
        except NotebookError as e:
            sys.exit(f"notebook_to_example: {e}")
        if same:
            continue
        if args.check:
            stale.append(path)
        else:
            path.write_text(text)
            print(f"wrote {path.relative_to(ROOT)}")
    if stale:
        names = ", ".join(str(p.relative_to(ROOT)) for p in stale)
        sys.exit(f"notebook_to_example: {names} differs from its notebook: run "
                 "`python3 scripts/notebook_to_example.py` and commit the result")
    if args.check:
        print(f"examples match their notebooks ({len(notebooks)})")


if __name__ == "__main__":
    main()
