#!/usr/bin/env python3
"""Set up everything d2l-rs needs, idempotently, from environment.yml.

What it installs and where (D2L_HOME, default ~/.cache/d2l-rs, keyed by version):
  - a Python venv with torch (libtorch for tch) and the Jupyter pieces,
  - evcxr_jupyter (the Rust Jupyter kernel), built with `cargo install --locked`,
  - the kernelspec `rust-d2l` inside that venv, with the environment the kernel needs and a
    launcher that gives each kernel a persistent build folder, compiled ahead here (`warm_kernel`),
and in this checkout:
  - .cargo/config.toml, so plain `cargo build/test/run` find libtorch,
  - .d2l/venv, a link to the venv,
and on the system: Debian's libgloo-dev (gloo's headers, which the torch wheel leaves out), for
the c10d shim behind d2l::dist; where it cannot install it, it says in one line what to run.

A second run checks and does nothing. `--check` only checks and says in one line what to run.
"""

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV_FILE = ROOT / "environment.yml"
SETUP = "python3 scripts/setup.py"
STAMP = "d2l-setup.json"
GIB = 1 << 30
# Free disk needed for an install (wheels in pip's cache plus the unpacked venv).
DISK_NEEDED = {"cpu": 4 * GIB, "cuda": 10 * GIB}


class SetupError(Exception):
    """A problem the user can fix; printed as one line."""


def say(msg):
    print(f"setup: {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# environment.yml (the subset of YAML it uses: nested mappings, lists, scalars, comments)


def parse_environment(text):
    """Return {"python": "3.11", "pip": [...], "cpu-torch": [...], "full-only": [...], ...}."""
    spec = {"pip": []}
    section = None  # the list or mapping key we are inside
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        item = line.strip()
        if indent == 0:
            section = item[:-1] if item.endswith(":") else None
            continue
        if section == "dependencies":
            if m := re.fullmatch(r"- python\s*=\s*([\d.]+)", item):
                spec["python"] = m.group(1)
            elif m := re.fullmatch(r"- (.+)", item):
                if indent > 4 and spec.get("_in_pip"):
                    spec["pip"].append(m.group(1).strip())
                spec["_in_pip"] = spec.get("_in_pip") or m.group(1) == "pip:"
        elif section == "d2l-rs":
            if m := re.fullmatch(r"([\w-]+):\s*(.*)", item):
                key, value = m.groups()
                spec[key] = value.strip() if value else []
                current = key
            elif m := re.fullmatch(r"- (.+)", item):
                spec[current].append(m.group(1).strip())
    spec.pop("_in_pip", None)
    for key in ("python", "cpu-torch", "full-only", "evcxr_jupyter", "kernel"):
        if not spec.get(key):
            raise SetupError(f"{ENV_FILE}: no `{key}` entry; restore it from git")
    return spec


def pinned(reqs, name):
    """The version pinned for `name` in a list of `name==version` requirements."""
    for req in reqs:
        n, _, v = req.partition("==")
        if n.strip().lower() == name:
            return v.strip()
    raise SetupError(f"{ENV_FILE}: `{name}` is not pinned with ==")


def req_name(req):
    return re.split(r"[=<>!~\[ ]", req, maxsplit=1)[0].lower()


# ---------------------------------------------------------------------------------------------
# The choices: which torch install, which venv


def detect_variant(asked):
    if asked in ("cpu", "cuda"):
        return asked
    if shutil.which("nvidia-smi"):
        probe = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
        if probe.returncode == 0 and "GPU" in probe.stdout:
            return "cuda"
    return "cpu"


def requirements(spec, variant):
    """(no-deps requirements, normal requirements) for a variant."""
    if variant == "cuda":
        return [], list(spec["pip"])
    skip = {req_name(r) for r in spec["cpu-torch"]} | {req_name(r) for r in spec["full-only"]}
    return list(spec["cpu-torch"]), [r for r in spec["pip"] if req_name(r) not in skip]


def venv_dir(home, spec, variant):
    if os.environ.get("D2L_VENV"):
        return Path(os.environ["D2L_VENV"])
    nodeps, deps = requirements(spec, variant)
    key = hashlib.sha256(json.dumps([spec["python"], nodeps, deps]).encode()).hexdigest()[:10]
    return home / f"venv-py{spec['python']}-torch{pinned(spec['pip'], 'torch')}-{variant}-{key}"


# ---------------------------------------------------------------------------------------------
# Checks


def check_python(spec):
    have = f"{sys.version_info.major}.{sys.version_info.minor}"
    if have != spec["python"]:
        raise SetupError(
            f"python3 is {have}, environment.yml wants python={spec['python']}: "
            f"run `D2L_PYTHON=/path/to/python{spec['python']} scripts/run` (or install it)"
        )


def venv_python(venv):
    return venv / "bin" / "python"


def installed_version(venv, dist):
    """Version of an installed distribution, read without importing it (the CPU torch can't be)."""
    probe = subprocess.run(
        [str(venv_python(venv)), "-c",
         "import sys, importlib.metadata as m\n"
         "try: print(m.version(sys.argv[1]))\n"
         "except m.PackageNotFoundError: pass", dist],
        capture_output=True, text=True)
    return probe.stdout.strip() or None


def torch_dir(venv):
    probe = subprocess.run(
        [str(venv_python(venv)), "-c",
         "import importlib.util as u; s = u.find_spec('torch'); print(s.submodule_search_locations[0] if s else '')"],
        capture_output=True, text=True)
    path = probe.stdout.strip()
    return Path(path) if path else None


def check_venv(venv, spec, variant):
    """Raise SetupError (one line, what to run) unless the venv is complete and right."""
    fix = f"run `{SETUP} --reinstall`"
    if not venv_python(venv).exists():
        raise SetupError(f"no Python venv at {venv}: run `{SETUP}`")
    if not (venv / STAMP).exists():
        raise SetupError(f"the venv at {venv} is incomplete (an install was cut short): {fix}")
    want = pinned(spec["pip"], "torch")
    have = installed_version(venv, "torch")
    if have is None:
        raise SetupError(f"torch is not installed in {venv}: {fix}")
    if have.split("+")[0] != want:
        raise SetupError(f"{venv} has torch {have}, environment.yml pins torch=={want}: {fix}")
    tdir = torch_dir(venv)
    if tdir is None or not (tdir / "lib" / "libtorch_cpu.so").exists():
        raise SetupError(f"libtorch_cpu.so is missing from torch in {venv}: {fix}")
    return tdir


# ---------------------------------------------------------------------------------------------
# Installing


def run(cmd, **kw):
    say("$ " + " ".join(str(c) for c in cmd))
    done = subprocess.run([str(c) for c in cmd], **kw)
    if done.returncode != 0:
        raise SetupError(f"`{' '.join(str(c) for c in cmd)}` failed (exit {done.returncode}); see above")


def ensure_disk(path, need):
    path.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path).free
    if free < need:
        raise SetupError(
            f"{path} has {free / GIB:.1f} GiB free, the install needs about {need / GIB:.0f} GiB: "
            f"free some space or point D2L_HOME elsewhere")


@contextlib.contextmanager
def locked(path):
    """An exclusive lock on `path` (created if missing) for the duration of the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def install_venv(venv, spec, variant):
    if venv.exists():
        say(f"removing the incomplete venv {venv}")
        shutil.rmtree(venv)
    ensure_disk(venv.parent, DISK_NEEDED[variant])
    run([sys.executable, "-m", "venv", venv])
    pip = [venv_python(venv), "-m", "pip", "install", "--disable-pip-version-check", "--progress-bar", "off"]
    nodeps, deps = requirements(spec, variant)
    if nodeps:
        run(pip + ["--no-deps"] + nodeps)
    run(pip + deps)
    # Written last: a venv without it is taken for a cut-short install and redone.
    (venv / STAMP).write_text(json.dumps({"variant": variant, "no_deps": nodeps, "deps": deps}, indent=1))


def evcxr_binary(home, version):
    return home / f"evcxr_jupyter-{version}" / "bin" / "evcxr_jupyter"


class EvcxrBuild:
    """`cargo install` of evcxr_jupyter into a temporary root, renamed into place when done (a cut
    build never looks installed). Started early and waited on later, so that the CPU-bound build
    overlaps the network-bound venv install."""

    def __init__(self, home, version):
        self.target = evcxr_binary(home, version)
        self.proc = None
        if self.target.exists():
            return
        if not shutil.which("cargo"):
            raise SetupError("cargo is not on PATH: install Rust (https://rustup.rs) and run again")
        ensure_disk(home, 2 * GIB)
        self.tmp = Path(tempfile.mkdtemp(dir=home, prefix="evcxr-build-"))
        cmd = ["cargo", "install", "--locked", "--quiet", "evcxr_jupyter", "--version", version,
               "--root", str(self.tmp), "--target-dir", str(self.tmp / "target")]
        say(f"building evcxr_jupyter {version} in the background (a few minutes, once)")
        say("$ " + " ".join(cmd))
        self.proc = subprocess.Popen(cmd)

    def wait(self):
        if self.proc is None:
            return self.target
        try:
            if self.proc.wait() != 0:
                raise SetupError(f"building evcxr_jupyter failed (exit {self.proc.returncode}); see above")
            shutil.rmtree(self.tmp / "target", ignore_errors=True)
            os.replace(self.tmp, self.target.parent.parent)
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)
        return self.target

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
            shutil.rmtree(self.tmp, ignore_errors=True)


def write_if_changed(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != text:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)


def install_kernelspec(venv, spec, tdir, evcxr, variant, home):
    """The kernel `rust-d2l`, in the venv's own Jupyter data dir, started by kernel_launch.py
    (copied beside kernel.json) in a persistent build folder under `home`."""
    cargo_bin = Path(shutil.which("cargo") or Path.home() / ".cargo" / "bin" / "cargo").parent
    # evcxr links cells against Rust's libstd-*.so and finds it through an $ORIGIN-relative rpath
    # that is wrong for the copy it loads when its build dir shares a prefix with the toolchain
    # (~/.cache vs ~/.rustup): "dlopen failed". The toolchain's lib dir on the search path fixes it.
    rust_lib = subprocess.run(["rustc", "--print", "target-libdir"], capture_output=True, text=True,
                              check=True).stdout.strip()
    kernel_dir = venv / "share" / "jupyter" / "kernels" / spec["kernel"]
    launcher = kernel_dir / "launch.py"
    write_if_changed(launcher, (ROOT / "scripts" / "kernel_launch.py").read_text())
    kernel = {
        "argv": [str(venv_python(venv)), str(launcher), "--builds", str(kernel_builds(home)),
                 str(evcxr), "--control_file", "{connection_file}"],
        "display_name": f"Rust (d2l, libtorch {pinned(spec['pip'], 'torch')})",
        "language": "rust",
        "interrupt_mode": "message",
        "env": {
            # evcxr dlopens each cell's library: no rpath applies there.
            "LD_LIBRARY_PATH": f"{tdir / 'lib'}:{rust_lib}:${{LD_LIBRARY_PATH}}",
            # The kernel builds `d2l` (and torch-sys) with cargo: it must find both.
            "LIBTORCH": str(tdir),
            "D2L_TORCH_VARIANT": variant,
            "PATH": f"{cargo_bin}:${{PATH}}",
        },
    }
    path = kernel_dir / "kernel.json"
    write_if_changed(path, json.dumps(kernel, indent=1) + "\n")
    return path


def kernel_builds(home):
    """Where kernel_launch.py keeps the kernels' build folders (`kernel-0`, `kernel-1`, ...)."""
    return home / "evcxr-build"


def warm_kernel(venv, home):
    """Compiles the kernels' dependencies ahead, so that a new kernel's first `:dep` cell takes
    seconds, not minutes: starts kernels as Jupyter does and runs the chapter's first cells in
    them. The first time, `kernel-0` alone (minutes), then a copy of it for `kernel-1`; after
    that two kernels at once, so that both build folders follow the crate (after a change only
    `d2l` is rebuilt) and a second notebook open at the same time starts as fast."""
    builds = kernel_builds(home)
    # Build folders of an earlier layout (one per notebook name, before the launcher's slots).
    for old in builds.glob("*"):
        if not re.fullmatch(r"kernel-\d+(\.lock)?|\..*", old.name):
            say(f"removing {old} (an earlier layout's build folder)")
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    warm = [venv_python(venv), ROOT / "scripts" / "kernel_latency.py", "--warm"]
    first, second = builds / "kernel-0", builds / "kernel-1"
    if not (first / "target").exists():
        say("compiling the kernel's dependencies ahead (minutes, once)")
        run(warm)
    if not (second / "target").exists():
        seed(builds, first, second)
    say("checking the kernels' build folders (seconds; after a change to the crate, a minute)")
    run(warm + ["--kernels", "2"])


def seed(builds, first, second):
    """Copies the build folder `first` to `second`, under both folders' locks (no kernel starts
    in either meanwhile)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import kernel_launch

    locks = [kernel_launch.try_lock(builds, i) for i in (0, 1)]
    try:
        if None in locks:
            say("a kernel is running: kernel-1 is not seeded this time")
            return
        tmp = builds / f".kernel-1.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        run(["cp", "-a", first, tmp])
        shutil.rmtree(second, ignore_errors=True)
        os.replace(tmp, second)
    finally:
        for fd in locks:
            if fd is not None:
                os.close(fd)


def write_cargo_config(tdir, variant):
    write_if_changed(ROOT / ".cargo" / "config.toml", (
        "# Written by scripts/setup.py (not tracked): where libtorch is, so that plain\n"
        "# `cargo build/test/run` work without exporting anything.\n"
        "[env]\n"
        f"LIBTORCH = {json.dumps(str(tdir))}\n"
        f"D2L_TORCH_VARIANT = {json.dumps(variant)}\n"))


def link(path, target):
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink() and os.readlink(path) == str(target):
        return
    tmp = path.with_name(path.name + ".tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(target)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------


# gloo's headers for d2l::dist's c10d shim (crate/build.rs looks in D2L_GLOO_INCLUDE, else here).
GLOO_PACKAGE = "libgloo-dev"
GLOO_HEADER = Path("/usr/include/gloo/algorithm.h")


def ensure_gloo(check_only=False):
    """Installs gloo's headers with apt where they are missing; where it cannot, says how."""
    if GLOO_HEADER.exists() or os.environ.get("D2L_GLOO_INCLUDE"):
        return
    hint = f"d2l::dist needs gloo's headers: run `sudo apt-get install {GLOO_PACKAGE}` (or set D2L_GLOO_INCLUDE), then rebuild"
    if check_only:
        raise SetupError(hint)
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    if not shutil.which("apt-get") or (sudo and not shutil.which("sudo")):
        say(f"warning: {hint}")
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = sudo + ["apt-get", "install", "-y", "--no-install-recommends", GLOO_PACKAGE]
    say(f"installing {GLOO_PACKAGE} (gloo's headers, for d2l::dist)")
    ok = subprocess.run(install, env=env, stdout=subprocess.DEVNULL).returncode == 0
    if not ok:
        subprocess.run(sudo + ["apt-get", "update"], env=env, stdout=subprocess.DEVNULL)
        ok = subprocess.run(install, env=env, stdout=subprocess.DEVNULL).returncode == 0
    if not ok or not GLOO_HEADER.exists():
        say(f"warning: {hint}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--torch", choices=["auto", "cpu", "cuda"], default=os.environ.get("D2L_TORCH", "auto"),
                    help="cpu: the small libtorch install; cuda: the full one (default: cuda where nvidia-smi sees a GPU)")
    ap.add_argument("--check", action="store_true", help="only check; say in one line what to run")
    ap.add_argument("--reinstall", action="store_true", help="rebuild the venv from scratch")
    ap.add_argument("--print-venv", action="store_true", help="print the venv's path and exit")
    ap.add_argument("--python-only", action="store_true",
                    help="only install that venv (for Python-side scripts); leave the kernel, "
                         ".cargo/config.toml and .d2l/venv as they are")
    ap.add_argument("--no-warm", action="store_true",
                    help="leave the kernel's dependencies to be compiled by its first :dep cell")
    args = ap.parse_args()

    home = Path(os.environ.get("D2L_HOME", Path.home() / ".cache" / "d2l-rs"))
    spec = parse_environment(ENV_FILE.read_text())
    variant = detect_variant(args.torch)
    venv = venv_dir(home, spec, variant)
    if args.print_venv:
        print(venv)
        return

    if args.check:
        tdir = check_venv(venv, spec, variant)
        if not evcxr_binary(home, spec["evcxr_jupyter"]).exists():
            raise SetupError(f"evcxr_jupyter {spec['evcxr_jupyter']} is not installed: run `{SETUP}`")
        ensure_gloo(check_only=True)
        return

    check_python(spec)
    evcxr_build = None if args.python_only else EvcxrBuild(home, spec["evcxr_jupyter"])
    try:
        with locked(venv.with_name(venv.name + ".lock")):
            if args.reinstall or not (venv / STAMP).exists():
                install_venv(venv, spec, variant)
        tdir = check_venv(venv, spec, variant)
        if args.python_only:
            say(f"ready: torch {installed_version(venv, 'torch')} ({variant}) in {venv} (Python side only)")
            return
        evcxr = evcxr_build.wait()
    except BaseException:
        if evcxr_build is not None:
            evcxr_build.stop()
        raise
    ensure_gloo()
    install_kernelspec(venv, spec, tdir, evcxr, variant, home)
    write_cargo_config(tdir, variant)
    link(ROOT / ".d2l" / "venv", venv)
    if not args.no_warm:
        warm_kernel(venv, home)
    say(f"ready: torch {installed_version(venv, 'torch')} ({variant}) in {venv}; "
        f"kernel {spec['kernel']}; evcxr_jupyter {spec['evcxr_jupyter']}")


if __name__ == "__main__":
    try:
        main()
    except SetupError as e:
        print(f"setup: error: {e}", file=sys.stderr)
        sys.exit(1)
