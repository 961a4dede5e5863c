#!/usr/bin/env python3
"""A hotdog-like image folder made of real photographs, the benchmark's second data set.

`bench_data make` draws its images (smooth shapes, which JPEG compresses well and decodes fast).
This set is cut from scikit-image's sample photographs (`skimage/data`: the astronaut, the cat,
the coffee cup, the motorcycles, the rocket, the Hubble deep field, ...; installed from PyPI
through environment.yml): photographic texture, so decoding costs what real photos cost. Each
image is a random crop (20-100% of the photo's area, aspect ratio 1:2 to 2:1) resized so that its
longer side is 160-640 px, flipped half the time, brightened or darkened up to 20%, saved as a
JPEG of quality 70-95; one in twenty is greyscale. Classes: photos of things (`hotdog`) against
scenes, textures and micrographs (`not-hotdog`), so the task can be learnt.

    photos.py OUT [--per-class 300] [--test-per-class 75] [--seed 0]

Writes OUT/hotdog/{train,test}/{hotdog,not-hotdog}/NNNN.jpg (the layout of the chapter's
hotdog.zip) and prints OUT/hotdog. Deterministic for a seed; a finished set (its stamp file
matches the arguments) is kept, a cut-short one is made again.
"""
import argparse
import json
import random
import shutil
import sys
from pathlib import Path

from PIL import Image, ImageEnhance

HOTDOG = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "camera.png"]
NOT_HOTDOG = ["motorcycle_left.png", "motorcycle_right.png", "hubble_deep_field.jpg", "retina.jpg", "ihc.png",
              "brick.png", "grass.png", "gravel.png"]
STAMP = "photos.json"


def sample_dir():
    try:
        import skimage
    except ImportError:
        sys.exit("photos.py: scikit-image is missing: run with the full install's python, "
                 "$(python3 scripts/setup.py --torch cuda --print-venv)/bin/python")
    return Path(skimage.__file__).parent / "data"


def derive(photo, rng):
    """One random crop of `photo` (an RGB PIL image), as described above."""
    w, h = photo.size
    for _ in range(20):
        area = w * h * rng.uniform(0.2, 1.0)
        ratio = 2 ** rng.uniform(-1, 1)
        cw, ch = round((area * ratio) ** 0.5), round((area / ratio) ** 0.5)
        if 0 < cw <= w and 0 < ch <= h:
            break
    else:
        cw, ch = w, h
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    img = photo.crop((x, y, x + cw, y + ch))
    longer = rng.randint(160, 640)
    scale = longer / max(cw, ch)
    img = img.resize((max(1, round(cw * scale)), max(1, round(ch * scale))), Image.BILINEAR)
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.8, 1.2))
    if rng.random() < 0.05:
        img = img.convert("L")
    return img, rng.randint(70, 95)


def make(out, per_class, test_per_class, seed):
    root = out / "hotdog"
    want = {"per_class": per_class, "test_per_class": test_per_class, "seed": seed,
            "hotdog": HOTDOG, "not-hotdog": NOT_HOTDOG}
    stamp = out / STAMP
    if stamp.is_file() and root.is_dir():
        try:
            if json.loads(stamp.read_text()) == want:
                return root
        except ValueError:
            pass
    src = sample_dir()
    photos = {cls: [Image.open(src / name).convert("RGB") for name in names]
              for cls, names in (("hotdog", HOTDOG), ("not-hotdog", NOT_HOTDOG))}
    out.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    tmp = out / "hotdog.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    rng = random.Random(seed)
    for split, n in (("train", per_class), ("test", test_per_class)):
        for cls, sources in photos.items():
            d = tmp / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                img, quality = derive(sources[rng.randrange(len(sources))], rng)
                img.save(d / f"{i:04d}.jpg", quality=quality)
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    stamp.write_text(json.dumps(want, indent=1))
    return root


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--per-class", type=int, default=300)
    ap.add_argument("--test-per-class", type=int, default=None, help="default: a quarter of --per-class")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    test = args.per_class // 4 if args.test_per_class is None else args.test_per_class
    print(make(args.out, args.per_class, test, args.seed))


if __name__ == "__main__":
    main()
