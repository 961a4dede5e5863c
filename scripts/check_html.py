#!/usr/bin/env python3
"""Open an executed notebook's HTML in headless Chromium and check, on the screenshot, that its
images are really drawn: each embedded PNG must be found pixel for pixel in the screenshot.

    check_html.py target/notebooks/fine-tuning.html [--min-images 7] [--grid 1120x280] [--curves 2]

--grid WxH: at least one image of that size (the chapter's 2 x 8 grid) must be among those drawn;
--curves N: at least N training-curve figures (525 x 375) must be. Writes the screenshot next to
the HTML (`<name>.screenshot.png`) and prints one line per image. Chromium is Debian's `chromium`
(scripts/test installs it when it is missing).
"""

import argparse
import base64
import io
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

CURVE_SIZE = (525, 375)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--force-device-scale-factor=1", "--force-color-profile=srgb",
         "--virtual-time-budget=5000"]


def embedded_images(html):
    """The PNGs embedded in the HTML, in page order."""
    found = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=\s]+)"', html)
    return [Image.open(io.BytesIO(base64.b64decode(b))).convert("RGB") for b in found]


def screenshot(html_path, width, height, out):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        sys.exit("check_html: no chromium on PATH (apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        cmd = [chromium, *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
               f"--screenshot={out}", html_path.resolve().as_uri()]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if run.returncode != 0 or not out.is_file():
        sys.exit(f"check_html: chromium failed ({run.returncode}):\n{run.stderr[-2000:]}")
    return np.asarray(Image.open(out).convert("RGB"))


def find(shot, img, taken):
    """Where `img` is drawn 1:1 in `shot`, at a place not in `taken`: (x, y) of its top-left
    corner, or None."""
    a = np.asarray(img)
    h, w, _ = a.shape
    # Look for a distinctive row (many colours) first, then check the whole image there.
    row = max(range(h), key=lambda r: len(np.unique(a[r].reshape(-1, 3), axis=0)))
    needle = a[row].tobytes()
    for y in range(row, shot.shape[0] - (h - row) + 1):
        line = shot[y].tobytes()
        start = line.find(needle)
        while start != -1:
            if start % 3 == 0:
                x, top = start // 3, y - row
                if (x, top) not in taken and np.array_equal(shot[top:top + h, x:x + w], a):
                    return x, top
            start = line.find(needle, start + 1)
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("html", type=Path)
    ap.add_argument("--min-images", type=int, default=1)
    ap.add_argument("--grid", default=None, help="WxH of an image grid that must be drawn")
    ap.add_argument("--curves", type=int, default=0, help="training-curve figures that must be drawn")
    args = ap.parse_args()

    images = embedded_images(args.html.read_text(encoding="utf-8"))
    if len(images) < args.min_images:
        sys.exit(f"check_html: {args.html} embeds {len(images)} PNG images, expected at least {args.min_images}")
    width = max(1400, max(i.width for i in images) + 400)
    # Tall enough for the whole page: Chromium's --screenshot takes the window only.
    height = 16000
    out = args.html.with_suffix(".screenshot.png")
    shot = screenshot(args.html, width, height, out)
    last = int(np.where((shot < 250).any(axis=(1, 2)))[0].max())
    if last >= height - 5:
        sys.exit(f"check_html: the page is taller than the {height} px screenshot; raise the height")

    drawn, missing, taken = [], [], set()
    for k, img in enumerate(images):
        at = find(shot, img, taken)
        taken.add(at)
        print(f"  image {k + 1}: {img.width}x{img.height} " + (f"drawn at {at}" if at else "NOT FOUND"))
        (drawn if at else missing).append(img.size)
    problems = []
    if missing:
        problems.append(f"{len(missing)} of {len(images)} images are not drawn in the screenshot")
    if args.grid:
        grid = tuple(int(v) for v in args.grid.split("x"))
        if grid not in drawn:
            problems.append(f"no {args.grid} image grid is drawn")
    curves = sum(size == CURVE_SIZE for size in drawn)
    if curves < args.curves:
        problems.append(f"{curves} training-curve figures drawn, expected at least {args.curves}")
    print(f"check_html: {len(drawn)} of {len(images)} images drawn pixel for pixel "
          f"({curves} curve figures), page {last + 1} px tall; screenshot {out}")
    if problems:
        sys.exit("check_html: " + "; ".join(problems))


if __name__ == "__main__":
    main()
