//! Offline data sets, made on the spot when the real ones cannot be fetched: a **hotdog-like**
//! target set with the real one's layout and counts, and a many-class **source** set of other
//! foods for pre-training a source model. Fully determined by a seed.
//!
//! The pictures are drawn foods on varied backgrounds: a hotdog is a sausage in a bun (often with
//! mustard); the other class holds pizzas, donuts, burgers, salads, sushi, apples, bananas,
//! baguettes, cookies and lone sausages, so that neither colour nor shape alone gives the answer.
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use image::codecs::jpeg::JpegEncoder;
use image::RgbImage;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::files::{lock, AtomicDir, AtomicFile};

/// The foods that are not hot dogs: the negatives of the hotdog-like set.
pub const OTHER_FOODS: [&str; 10] = [
    "apple", "baguette", "banana", "burger", "cookie", "donut", "pizza", "salad", "sausage",
    "sushi",
];

/// The classes of the source set, in label order: the ten other foods and a hot-dog class, as
/// ImageNet has one (class 934, "hotdog, hot dog, red hot") among its thousand.
pub const SOURCE_CLASSES: [&str; 11] = [
    "apple", "baguette", "banana", "burger", "cookie", "donut", "hotdog", "pizza", "salad",
    "sausage", "sushi",
];

/// How to make the hotdog-like set.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HotdogConfig {
    /// Training images per class (the real set: 1000).
    pub train_per_class: usize,
    /// Test images per class (the real set: 400).
    pub test_per_class: usize,
    /// Sides are drawn from this range, separately, so sizes and aspect ratios vary.
    pub min_side: u32,
    pub max_side: u32,
    pub seed: u64,
}

impl Default for HotdogConfig {
    fn default() -> Self {
        HotdogConfig {
            train_per_class: 1000,
            test_per_class: 400,
            min_side: 160,
            max_side: 480,
            seed: 0,
        }
    }
}

/// How to make the source set.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SourceConfig {
    pub train_per_class: usize,
    pub test_per_class: usize,
    pub min_side: u32,
    pub max_side: u32,
    pub seed: u64,
}

impl Default for SourceConfig {
    fn default() -> Self {
        SourceConfig {
            train_per_class: 300,
            test_per_class: 50,
            min_side: 96,
            max_side: 192,
            seed: 1,
        }
    }
}

/// Writes `root/hotdog/{train,test}/{hotdog,not-hotdog}/NNNN.jpg` and returns `root/hotdog`.
/// Made once: a later call with the same config returns at once; another config remakes it.
pub fn make_hotdog_dataset(root: impl AsRef<Path>, cfg: &HotdogConfig) -> Result<PathBuf> {
    let sizes = (cfg.min_side, cfg.max_side);
    let splits = [("train", cfg.train_per_class), ("test", cfg.test_per_class)];
    let classes = ["hotdog", "not-hotdog"];
    make_dataset(
        root.as_ref(),
        "hotdog",
        cfg,
        &splits,
        &classes,
        sizes,
        cfg.seed,
        |class, rng, img| {
            if class == 0 {
                draw_hotdog(img, rng);
            } else {
                let food = *pick(rng, &OTHER_FOODS);
                draw_food(img, food, rng);
            }
        },
    )
}

/// Writes `root/food-source/{train,test}/<food>/NNNN.jpg` for [`SOURCE_CLASSES`] and returns
/// `root/food-source`. Made once per config, like [`make_hotdog_dataset`].
pub fn make_source_dataset(root: impl AsRef<Path>, cfg: &SourceConfig) -> Result<PathBuf> {
    let sizes = (cfg.min_side, cfg.max_side);
    let splits = [("train", cfg.train_per_class), ("test", cfg.test_per_class)];
    make_dataset(
        root.as_ref(),
        "food-source",
        cfg,
        &splits,
        &SOURCE_CLASSES,
        sizes,
        cfg.seed,
        |class, rng, img| match SOURCE_CLASSES[class] {
            "hotdog" => draw_hotdog(img, rng),
            food => draw_food(img, food, rng),
        },
    )
}

/// Packs a folder into a zip whose entries start with the folder's name (as `hotdog.zip` holds
/// `hotdog/...`), in sorted order, so the same folder gives the same bytes.
pub fn pack_zip(dir: impl AsRef<Path>, zip_path: impl AsRef<Path>) -> Result<()> {
    let (dir, zip_path) = (dir.as_ref(), zip_path.as_ref());
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Error::arg("pack_zip", format!("{} has no folder name", dir.display())))?;
    let mut files = Vec::new();
    collect_files(dir, &mut files)?;
    files.sort();
    let mut tmp = AtomicFile::create(zip_path)?;
    let tmp_path = tmp.temp_path().to_owned();
    let mut zip = zip::ZipWriter::new(
        tmp.file()
            .try_clone()
            .map_err(|e| Error::io(&tmp_path, e))?,
    );
    // JPEGs do not compress: store them, as the real archive's are nearly stored too.
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .last_modified_time(zip::DateTime::default());
    let zip_err = |e: zip::result::ZipError| match e {
        zip::result::ZipError::Io(e) => Error::io(&tmp_path, e),
        e => Error::Archive {
            path: zip_path.to_owned(),
            msg: e.to_string(),
        },
    };
    for file in &files {
        let rel = file
            .strip_prefix(dir)
            .unwrap_or(file)
            .to_string_lossy()
            .replace('\\', "/");
        zip.start_file(format!("{name}/{rel}"), opts)
            .map_err(zip_err)?;
        let bytes = fs::read(file).map_err(|e| Error::io(file, e))?;
        zip.write_all(&bytes).map_err(|e| Error::io(&tmp_path, e))?;
    }
    zip.finish().map_err(zip_err)?;
    tmp.commit()?;
    Ok(())
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        if path.is_dir() {
            collect_files(&path, out)?;
        } else {
            out.push(path);
        }
    }
    Ok(())
}

const MARKER: &str = ".d2l-synthetic.json";

/// Draws every image of a data set on all cores into a staging folder, then renames it into
/// place with a marker holding the config: a cut run is never taken for a finished one.
#[allow(clippy::too_many_arguments)]
fn make_dataset<C: Serialize>(
    root: &Path,
    name: &str,
    cfg: &C,
    splits: &[(&str, usize)],
    classes: &[&str],
    sizes: (u32, u32),
    seed: u64,
    draw: impl Fn(usize, &mut ChaCha8Rng, &mut Canvas) + Sync,
) -> Result<PathBuf> {
    if sizes.0 == 0 || sizes.0 > sizes.1 {
        return Err(Error::arg(
            "synthetic data set",
            format!("image sides must satisfy 0 < min <= max, got {sizes:?}"),
        ));
    }
    let target = root.join(name);
    // The marker records the config and the class list: either changing remakes the set.
    let config = serde_json::to_string_pretty(cfg).map_err(|e| Error::json(name, e))?;
    let config = format!("{config}\nclasses: {classes:?}");
    let made = || fs::read_to_string(target.join(MARKER)).is_ok_and(|m| m == config);
    if made() {
        return Ok(target);
    }
    // One process draws it; others sharing the folder wait, then find it made.
    let _lock = lock(&target)?;
    if made() {
        return Ok(target);
    }
    let staging = AtomicDir::create(&target)?;

    let mut jobs = Vec::new();
    for (s, &(split, count)) in splits.iter().enumerate() {
        for (c, class) in classes.iter().enumerate() {
            let dir = staging.path().join(split).join(class);
            fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
            jobs.extend((0..count).map(|i| (s, c, i, dir.join(format!("{i:04}.jpg")))));
        }
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = jobs.len().div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        let handles: Vec<_> = jobs
            .chunks(chunk)
            .map(|part| {
                let draw = &draw;
                scope.spawn(move || -> Result<()> {
                    for (s, c, i, path) in part {
                        let key = ((*s as u64) << 48) ^ ((*c as u64) << 32) ^ *i as u64;
                        let mut rng = ChaCha8Rng::seed_from_u64(
                            seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ key,
                        );
                        let (w, h) = (
                            rng.gen_range(sizes.0..=sizes.1),
                            rng.gen_range(sizes.0..=sizes.1),
                        );
                        let mut canvas = Canvas::background(w, h, &mut rng);
                        draw(*c, &mut rng, &mut canvas);
                        canvas.add_noise(&mut rng);
                        let quality = rng.gen_range(75..=95);
                        save_jpeg(&canvas.into_image(), path, quality)?;
                    }
                    Ok(())
                })
            })
            .collect();
        handles.into_iter().try_for_each(|h| {
            h.join().unwrap_or_else(|_| {
                Err(Error::Panicked {
                    what: format!("drawing {name}"),
                })
            })
        })
    })?;

    let marker = staging.path().join(MARKER);
    fs::write(&marker, &config).map_err(|e| Error::io(&marker, e))?;
    staging.commit(None)
}

fn save_jpeg(img: &RgbImage, path: &Path, quality: u8) -> Result<()> {
    let mut bytes = Vec::new();
    JpegEncoder::new_with_quality(&mut bytes, quality).encode_image(img)?;
    fs::write(path, bytes).map_err(|e| Error::io(path, e))
}

fn pick<'a, T>(rng: &mut ChaCha8Rng, items: &'a [T]) -> &'a T {
    &items[rng.gen_range(0..items.len())]
}

type Rgb = [f32; 3];

/// A float RGB canvas with anti-aliased shapes given by signed distance functions.
struct Canvas {
    w: u32,
    h: u32,
    px: Vec<Rgb>,
}

fn jitter(rng: &mut ChaCha8Rng, c: Rgb, amount: f32) -> Rgb {
    c.map(|v| (v + rng.gen_range(-amount..=amount)).clamp(0.0, 255.0))
}

impl Canvas {
    /// A background: a two-colour gradient in a random direction, sometimes with a plate.
    fn background(w: u32, h: u32, rng: &mut ChaCha8Rng) -> Canvas {
        let a: Rgb = [
            rng.gen_range(40.0..230.0),
            rng.gen_range(40.0..230.0),
            rng.gen_range(40.0..230.0),
        ];
        let b = jitter(rng, a, 70.0);
        let angle = rng.gen_range(0.0..std::f32::consts::TAU);
        let (dx, dy) = (angle.cos(), angle.sin());
        let norm = (w as f32).hypot(h as f32);
        let mut px = Vec::with_capacity((w * h) as usize);
        for y in 0..h {
            for x in 0..w {
                let t = ((x as f32 * dx + y as f32 * dy) / norm + 1.0) / 2.0;
                px.push([0, 1, 2].map(|i| a[i] + (b[i] - a[i]) * t));
            }
        }
        let mut canvas = Canvas { w, h, px };
        if rng.gen_bool(0.5) {
            let (cx, cy) = (
                w as f32 * rng.gen_range(0.35..0.65),
                h as f32 * rng.gen_range(0.35..0.65),
            );
            let r = w.min(h) as f32 * rng.gen_range(0.35..0.5);
            let plate = jitter(rng, [235.0, 235.0, 230.0], 15.0);
            canvas.fill(
                |x, y| ((x - cx).powi(2) / 1.2 + (y - cy).powi(2)).sqrt() - r,
                plate,
            );
        }
        canvas
    }

    fn side(&self) -> f32 {
        self.w.min(self.h) as f32
    }

    /// Paints `color` where `sdf < 0`, blending over one pixel at the edge.
    fn fill(&mut self, sdf: impl Fn(f32, f32) -> f32, color: Rgb) {
        for y in 0..self.h {
            for x in 0..self.w {
                let d = sdf(x as f32 + 0.5, y as f32 + 0.5);
                let cover = (0.5 - d).clamp(0.0, 1.0);
                if cover > 0.0 {
                    let p = &mut self.px[(y * self.w + x) as usize];
                    for i in 0..3 {
                        p[i] += (color[i] - p[i]) * cover;
                    }
                }
            }
        }
    }

    fn add_noise(&mut self, rng: &mut ChaCha8Rng) {
        let amount = rng.gen_range(2.0..10.0f32);
        for p in &mut self.px {
            for v in p.iter_mut() {
                *v += rng.gen_range(-amount..=amount);
            }
        }
    }

    fn into_image(self) -> RgbImage {
        let raw = self
            .px
            .iter()
            .flat_map(|p| p.map(|v| v.round().clamp(0.0, 255.0) as u8))
            .collect();
        RgbImage::from_raw(self.w, self.h, raw).expect("w * h pixels")
    }
}

/// Distance to the segment a-b minus the radius: a capsule.
fn capsule(x: f32, y: f32, a: (f32, f32), b: (f32, f32), r: f32) -> f32 {
    let (px, py, bx, by) = (x - a.0, y - a.1, b.0 - a.0, b.1 - a.1);
    let t = ((px * bx + py * by) / (bx * bx + by * by).max(1e-6)).clamp(0.0, 1.0);
    (px - bx * t).hypot(py - by * t) - r
}

fn circle(x: f32, y: f32, c: (f32, f32), r: f32) -> f32 {
    (x - c.0).hypot(y - c.1) - r
}

/// A random centre, size and direction for an object on the canvas.
fn placement(img: &Canvas, rng: &mut ChaCha8Rng) -> ((f32, f32), f32, (f32, f32)) {
    let s = img.side() * rng.gen_range(0.25..0.45);
    let c = (
        img.w as f32 * rng.gen_range(0.3..0.7),
        img.h as f32 * rng.gen_range(0.3..0.7),
    );
    let a = rng.gen_range(0.0..std::f32::consts::TAU);
    (c, s, (a.cos(), a.sin()))
}

fn along(c: (f32, f32), dir: (f32, f32), t: f32) -> (f32, f32) {
    (c.0 + dir.0 * t, c.1 + dir.1 * t)
}

fn draw_hotdog(img: &mut Canvas, rng: &mut ChaCha8Rng) {
    let (c, s, dir) = placement(img, rng);
    let bun = jitter(rng, [214.0, 164.0, 96.0], 25.0);
    let sausage = jitter(rng, [170.0, 62.0, 40.0], 25.0);
    let (half_bun, half_sausage) = (s, s * rng.gen_range(1.1..1.3));
    let normal = (-dir.1, dir.0);
    // The bun's two halves, a little apart, with the sausage lying between them.
    for side in [-1.0, 1.0] {
        let off = along(c, normal, side * s * 0.16);
        let (a, b) = (along(off, dir, -half_bun), along(off, dir, half_bun));
        img.fill(|x, y| capsule(x, y, a, b, s * 0.2), bun);
    }
    let (a, b) = (along(c, dir, -half_sausage), along(c, dir, half_sausage));
    img.fill(|x, y| capsule(x, y, a, b, s * 0.13), sausage);
    if rng.gen_bool(0.7) {
        let mustard = jitter(rng, [235.0, 200.0, 40.0], 15.0);
        let zigs = 7;
        for k in 0..zigs {
            let t0 = -half_bun * 0.8 + 1.6 * half_bun * k as f32 / zigs as f32;
            let t1 = t0 + 1.6 * half_bun / zigs as f32;
            let w = if k % 2 == 0 { 1.0 } else { -1.0 } * s * 0.07;
            let p0 = along(along(c, dir, t0), normal, w);
            let p1 = along(along(c, dir, t1), normal, -w);
            img.fill(|x, y| capsule(x, y, p0, p1, s * 0.025), mustard);
        }
    }
}

fn draw_food(img: &mut Canvas, food: &str, rng: &mut ChaCha8Rng) {
    let (c, s, dir) = placement(img, rng);
    let normal = (-dir.1, dir.0);
    match food {
        "apple" => {
            let red = jitter(rng, [190.0, 30.0, 35.0], 30.0);
            img.fill(|x, y| circle(x, y, c, s * 0.6), red);
            let top = (c.0, c.1 - s * 0.6);
            img.fill(
                |x, y| capsule(x, y, top, (top.0 + s * 0.05, top.1 - s * 0.2), s * 0.04),
                [90.0, 60.0, 30.0],
            );
        }
        "baguette" | "sausage" | "banana" => {
            let (color, half, r) = match food {
                "baguette" => (jitter(rng, [200.0, 150.0, 85.0], 25.0), s * 1.2, s * 0.2),
                "sausage" => (jitter(rng, [165.0, 65.0, 45.0], 25.0), s, s * 0.14),
                _ => (jitter(rng, [235.0, 210.0, 70.0], 20.0), s, s * 0.16),
            };
            // Bananas bend: three segments along an arc.
            let bend = if food == "banana" { s * 0.35 } else { 0.0 };
            let pts: Vec<(f32, f32)> = (0..4)
                .map(|k| {
                    let t = -1.0 + 2.0 * k as f32 / 3.0;
                    along(along(c, dir, t * half), normal, bend * (1.0 - t * t))
                })
                .collect();
            for seg in pts.windows(2) {
                let (a, b) = (seg[0], seg[1]);
                img.fill(|x, y| capsule(x, y, a, b, r), color);
            }
            if food == "baguette" {
                for k in 0..4 {
                    let t = -0.6 + 0.4 * k as f32;
                    let p = along(c, dir, t * half);
                    let q = along(along(p, dir, s * 0.15), normal, s * 0.1);
                    img.fill(|x, y| capsule(x, y, p, q, s * 0.025), [150.0, 100.0, 50.0]);
                }
            }
        }
        "burger" => {
            let bun = jitter(rng, [205.0, 140.0, 70.0], 20.0);
            let layers = [
                (-0.35, bun, 0.3),
                (0.0, [70.0, 150.0, 60.0], 0.12),
                (0.12, [95.0, 50.0, 35.0], 0.18),
                (0.4, bun, 0.2),
            ];
            for (dy, color, th) in layers {
                let cy = c.1 + dy * s;
                img.fill(
                    |x, y| capsule(x, y, (c.0 - s * 0.55, cy), (c.0 + s * 0.55, cy), s * th),
                    color,
                );
            }
        }
        "cookie" | "donut" | "pizza" => {
            let base = match food {
                "cookie" => jitter(rng, [190.0, 140.0, 80.0], 20.0),
                "donut" => jitter(rng, [225.0, 130.0, 170.0], 30.0),
                _ => jitter(rng, [235.0, 185.0, 80.0], 20.0),
            };
            img.fill(|x, y| circle(x, y, c, s * 0.75), base);
            if food == "donut" {
                let hole = img.px[(c.1 as u32 * img.w + c.0 as u32) as usize];
                let bg = jitter(rng, hole, 5.0);
                img.fill(|x, y| circle(x, y, c, s * 0.25), bg);
            }
            let (dots, color, r) = match food {
                "cookie" => (9, [60.0, 35.0, 20.0], 0.07),
                "donut" => (14, [250.0, 250.0, 250.0], 0.03),
                _ => (8, [170.0, 30.0, 30.0], 0.12),
            };
            for _ in 0..dots {
                let a = rng.gen_range(0.0..std::f32::consts::TAU);
                let d = rng.gen_range(if food == "donut" { 0.35 } else { 0.0 }..0.6) * s;
                let p = (c.0 + a.cos() * d, c.1 + a.sin() * d);
                img.fill(|x, y| circle(x, y, p, s * r), color);
            }
        }
        "salad" => {
            for _ in 0..12 {
                let a = rng.gen_range(0.0..std::f32::consts::TAU);
                let d = rng.gen_range(0.0..0.5) * s;
                let p = (c.0 + a.cos() * d, c.1 + a.sin() * d);
                let green = jitter(rng, [80.0, 170.0, 60.0], 35.0);
                img.fill(|x, y| circle(x, y, p, s * rng_free_radius(a)), green);
            }
            for _ in 0..4 {
                let p = (
                    c.0 + rng.gen_range(-0.4..0.4) * s,
                    c.1 + rng.gen_range(-0.4..0.4) * s,
                );
                img.fill(|x, y| circle(x, y, p, s * 0.1), [210.0, 40.0, 40.0]);
            }
        }
        _ => {
            // sushi: rice with a dark wrap and a fish-coloured centre.
            let (a, b) = (along(c, dir, -s * 0.3), along(c, dir, s * 0.3));
            img.fill(|x, y| capsule(x, y, a, b, s * 0.42), [30.0, 35.0, 30.0]);
            img.fill(|x, y| capsule(x, y, a, b, s * 0.34), [240.0, 240.0, 235.0]);
            let fish = jitter(rng, [240.0, 120.0, 80.0], 20.0);
            img.fill(|x, y| capsule(x, y, a, b, s * 0.14), fish);
        }
    }
}

/// Leaf sizes vary with the angle they were drawn at (no extra random draw).
fn rng_free_radius(angle: f32) -> f32 {
    0.16 + 0.06 * (angle * 3.0).sin()
}
