//! torchvision's `ImageFolder`: one sub-folder a class, images read as RGB.
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use image::RgbImage;

use crate::error::{Error, Result};

/// The file endings torchvision's `ImageFolder` reads (compared without case).
pub const IMG_EXTENSIONS: [&str; 9] = [
    ".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp",
];

/// A data set laid out as `root/<class>/**/<image>`, like torchvision's `ImageFolder`:
/// classes are the sorted sub-folder names (`hotdog` = 0, `not-hotdog` = 1), files are walked
/// in sorted order (byte order: `B.JPG` before `a.jpg`), and only [`IMG_EXTENSIONS`] count.
#[derive(Clone, Debug)]
pub struct ImageFolder {
    root: PathBuf,
    classes: Vec<String>,
    samples: Vec<(PathBuf, i64)>,
    skipped: Vec<(PathBuf, String)>,
}

impl ImageFolder {
    /// Indexes `root`. Fails on a missing folder, a folder with no class sub-folders, or a
    /// class with no images, naming the folder.
    pub fn new(root: impl AsRef<Path>) -> Result<ImageFolder> {
        let root = root.as_ref().to_owned();
        let mut classes: Vec<String> = read_dir(&root)?
            .into_iter()
            .filter(|p| p.is_dir())
            .filter_map(|p| p.file_name().and_then(|n| n.to_str()).map(str::to_owned))
            .collect();
        classes.sort();
        if classes.is_empty() {
            return Err(Error::Dataset {
                path: root,
                msg: "no class folders: expected <root>/<class>/<image files>".into(),
            });
        }
        let mut samples = Vec::new();
        let mut empty = Vec::new();
        for (index, class) in classes.iter().enumerate() {
            let before = samples.len();
            for file in walk_sorted(&root.join(class))? {
                if is_image_file(&file) {
                    samples.push((file, index as i64));
                }
            }
            if samples.len() == before {
                empty.push(class.clone());
            }
        }
        if !empty.is_empty() {
            return Err(Error::Dataset {
                path: root,
                msg: format!(
                    "no image files in class folder(s) {empty:?} (readable endings: {})",
                    IMG_EXTENSIONS.join(" ")
                ),
            });
        }
        Ok(ImageFolder {
            root,
            classes,
            samples,
            skipped: Vec::new(),
        })
    }

    /// Decodes every image once and drops those that fail, printing how many were skipped;
    /// [`skipped`](Self::skipped) lists them with the reason. Without this, an unreadable file
    /// is an error when it is read.
    pub fn skip_unreadable(mut self) -> ImageFolder {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let chunk = self.samples.len().div_ceil(threads).max(1);
        let bad: Vec<(PathBuf, String)> = std::thread::scope(|s| {
            let handles: Vec<_> = self
                .samples
                .chunks(chunk)
                .map(|part| {
                    s.spawn(move || {
                        part.iter()
                            .filter_map(|(p, _)| {
                                load_rgb(p).err().map(|e| (p.clone(), e.to_string()))
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap_or_default())
                .collect()
        });
        if !bad.is_empty() {
            println!(
                "warning: skipped {} unreadable image file(s) in {} (first: {})",
                bad.len(),
                self.root.display(),
                bad[0].1
            );
            self.samples
                .retain(|(p, _)| !bad.iter().any(|(b, _)| b == p));
        }
        self.skipped = bad;
        self
    }

    /// The folder this data set reads.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Class names, sorted; a label is an index into this.
    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    /// Class name -> label.
    pub fn class_to_idx(&self) -> BTreeMap<String, i64> {
        self.classes
            .iter()
            .enumerate()
            .map(|(i, c)| (c.clone(), i as i64))
            .collect()
    }

    /// (file, label) pairs in torchvision's order.
    pub fn samples(&self) -> &[(PathBuf, i64)] {
        &self.samples
    }

    /// Files dropped by [`skip_unreadable`](Self::skip_unreadable), with the reason.
    pub fn skipped(&self) -> &[(PathBuf, String)] {
        &self.skipped
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Sample `i`: the decoded RGB image and its label (Python's `train_data[i]`).
    pub fn get(&self, i: usize) -> Result<(RgbImage, i64)> {
        let (path, label) = self.samples.get(i).ok_or_else(|| Error::IndexOutOfRange {
            index: i as i64,
            len: self.len(),
        })?;
        Ok((load_rgb(path)?, *label))
    }

    /// Sample `i` counted from the end: `get_rev(0)` is the last (Python's `train_data[-i - 1]`).
    pub fn get_rev(&self, i: usize) -> Result<(RgbImage, i64)> {
        let index = self
            .len()
            .checked_sub(i + 1)
            .ok_or_else(|| Error::IndexOutOfRange {
                index: -(i as i64) - 1,
                len: self.len(),
            })?;
        self.get(index)
    }
}

/// Whether torchvision's `ImageFolder` would read this file.
pub fn is_image_file(path: &Path) -> bool {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_ascii_lowercase();
    IMG_EXTENSIONS.iter().any(|ext| name.ends_with(ext))
}

/// Decodes an image file to 8-bit RGB (PIL's `convert('RGB')`); errors name the file.
pub fn load_rgb(path: &Path) -> Result<RgbImage> {
    let bytes = fs::read(path).map_err(|e| Error::io(path, e))?;
    decode_rgb(&bytes).map_err(|e| Error::Dataset {
        path: path.to_owned(),
        msg: format!("cannot decode image: {e}"),
    })
}

/// Decodes image bytes of any supported format (detected from the content) to RGB, as
/// torchvision's loader (PIL's `Image.open(f).convert('RGB')`) does, so that both sides see the
/// same pixels. That matters for 16-bit images, where PIL (Pillow 13, measured) keeps the high
/// byte of RGB, RGBA and gray+alpha (`v >> 8`: 30000 -> 117, 1000 -> 3), and clips plain 16-bit
/// grayscale at 255 (30000 -> 255: such a photo turns mostly white in PyTorch too; convert it
/// to 8 bits before training). Alpha is dropped, not blended, as PIL's `convert('RGB')` does.
pub fn decode_rgb(bytes: &[u8]) -> std::result::Result<RgbImage, image::ImageError> {
    use image::DynamicImage as D;
    let format = image::guess_format(bytes)?;
    let img = image::load_from_memory_with_format(bytes, format)?;
    let (w, h) = (img.width(), img.height());
    let rgb = |f: &dyn Fn(u32, u32) -> [u8; 3]| RgbImage::from_fn(w, h, |x, y| image::Rgb(f(x, y)));
    let high = |v: u16| (v >> 8) as u8;
    Ok(match &img {
        D::ImageLuma16(g) => rgb(&|x, y| [g.get_pixel(x, y).0[0].min(255) as u8; 3]),
        D::ImageLumaA16(g) => rgb(&|x, y| [high(g.get_pixel(x, y).0[0]); 3]),
        D::ImageRgb16(c) => rgb(&|x, y| c.get_pixel(x, y).0.map(high)),
        D::ImageRgba16(c) => rgb(&|x, y| {
            let [r, g, b, _] = c.get_pixel(x, y).0;
            [high(r), high(g), high(b)]
        }),
        _ => img.into_rgb8(),
    })
}

fn read_dir(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    entries
        .map(|e| e.map(|e| e.path()).map_err(|e| Error::io(dir, e)))
        .collect()
}

/// All files below `dir` in torchvision's order: `sorted(os.walk(dir, followlinks=True))`
/// (folders by their full path), then each folder's files sorted by name.
fn walk_sorted(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut folders = vec![dir.to_owned()];
    let mut i = 0;
    while i < folders.len() {
        let sub: Vec<PathBuf> = read_dir(&folders[i])?
            .into_iter()
            .filter(|p| p.is_dir())
            .collect();
        folders.extend(sub);
        i += 1;
    }
    folders.sort_by(|a, b| a.to_string_lossy().cmp(&b.to_string_lossy()));
    let mut files = Vec::new();
    for folder in &folders {
        let mut names: Vec<PathBuf> = read_dir(folder)?
            .into_iter()
            .filter(|p| !p.is_dir())
            .collect();
        names.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
        files.extend(names);
    }
    Ok(files)
}
