#!/usr/bin/env python3
"""Starts the `rust-d2l` kernel (evcxr_jupyter) in a build folder that outlives it.

Without a build folder of its own, evcxr builds every kernel in a new temporary folder: tch,
torch-sys's C++ and `d2l` are compiled from nothing at each start and each restart (minutes).
This launcher, which the kernelspec runs (scripts/setup.py copies it next to kernel.json), gives
the kernel the first free slot of a few persistent build folders, `<builds>/kernel-0`,
`kernel-1`, ..., each locked for as long as its kernel lives: evcxr must have a build folder to
itself, so a second kernel open at the same time takes the next slot. The set-up compiles
`kernel-0` ahead and copies it to `kernel-1` (`setup.py`'s `warm_kernel`), so a new kernel's
first `:dep` cell finds its dependencies built.

    launch.py --builds DIR EVCXR_JUPYTER [evcxr's arguments...]

Where `EVCXR_TMPDIR` is already set (the notebook runner's cold-start benchmark), it is kept.
Where every slot is taken, the kernel gets evcxr's own temporary folder, as before.
"""
import fcntl
import os
import sys
from pathlib import Path

SLOTS = 8


def slot_dir(builds, i):
    return Path(builds) / f"kernel-{i}"


def try_lock(builds, i):
    """An open descriptor holding slot `i`'s lock, or None when another process holds it."""
    Path(builds).mkdir(parents=True, exist_ok=True)
    fd = os.open(Path(builds) / f"kernel-{i}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def claim(builds):
    """(slot folder, lock descriptor) of the first free slot, or (None, None) if all are taken."""
    for i in range(SLOTS):
        fd = try_lock(builds, i)
        if fd is not None:
            return slot_dir(builds, i), fd
    return None, None


def main(argv):
    if len(argv) < 3 or argv[0] != "--builds":
        sys.exit("usage: launch.py --builds DIR EVCXR_JUPYTER [ARGS...]")
    builds, evcxr, args = argv[1], argv[2], argv[3:]
    if not os.environ.get("EVCXR_TMPDIR"):
        slot, fd = claim(builds)
        if slot is not None:
            # The lock lives with the descriptor: evcxr inherits it across exec and holds the
            # slot until it exits (a restart releases it for the new kernel).
            os.set_inheritable(fd, True)
            os.environ["EVCXR_TMPDIR"] = str(slot)
        else:
            print(f"launch.py: all {SLOTS} build folders in {builds} are in use; this kernel "
                  "builds in a temporary folder (slow start)", file=sys.stderr)
    os.execv(evcxr, [evcxr, *args])


if __name__ == "__main__":
    main(sys.argv[1:])
