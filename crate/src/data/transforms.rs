//! torchvision's transforms for the chapter, with torchvision's semantics: `RandomResizedCrop`,
//! `RandomHorizontalFlip`, `Resize`, `CenterCrop`, `ToTensor`, `Normalize`, chained by `Compose`.
//!
//! ```
//! use d2l::data::transforms::*;
//! let normalize = Normalize::new([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]);
//! let train_augs = Compose::new()
//!     .then(RandomResizedCrop::new(224))
//!     .then(RandomHorizontalFlip::new(0.5))
//!     .then(ToTensor)
//!     .then(normalize);
//! assert_eq!(train_augs.len(), 3); // ToTensor and Normalize run fused, as one step
//! ```
//!
//! Randomness comes from the `rng` passed to [`Transform::apply`]: the loader seeds one a sample,
//! so the same seed gives the same augmentations whatever the number of workers.
use std::any::Any;
use std::fmt;
use std::sync::Arc;

use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::RgbImage;
use rand::{Rng, RngCore};

use crate::error::{Error, Result};

/// A `[3, height, width]` image of `f32`s, channels first (what `ToTensor` makes).
#[derive(Clone, Debug, PartialEq)]
pub struct ImageTensor {
    /// Row-major `[c, h, w]` values.
    pub data: Vec<f32>,
    pub height: usize,
    pub width: usize,
}

/// An image on its way through a pipeline: pixels until `ToTensor`, floats after.
#[derive(Clone, Debug)]
pub enum Sample {
    Image(RgbImage),
    Tensor(ImageTensor),
}

impl Sample {
    fn into_image(self, by: &'static str) -> Result<RgbImage> {
        match self {
            Sample::Image(img) => Ok(img),
            Sample::Tensor(_) => Err(Error::arg(
                by,
                "takes an image, but got a tensor: put it before ToTensor in the Compose",
            )),
        }
    }

    fn into_tensor(self, by: &'static str) -> Result<ImageTensor> {
        match self {
            Sample::Tensor(t) => Ok(t),
            Sample::Image(_) => Err(Error::arg(
                by,
                "takes a tensor, but got an image: put ToTensor before it in the Compose",
            )),
        }
    }
}

/// One step of a pipeline.
pub trait Transform: Send + Sync + fmt::Debug {
    fn apply(&self, x: Sample, rng: &mut dyn RngCore) -> Result<Sample>;

    /// Whether this is [`ToTensor`] (lets [`Compose`] fuse it with a following [`Normalize`]).
    fn is_to_tensor(&self) -> bool {
        false
    }
}

/// Transforms applied in order (torchvision's `Compose`). Cheap to clone.
///
/// `ToTensor` directly followed by `Normalize` runs as one pass over the pixels (same values).
#[derive(Clone, Debug, Default)]
pub struct Compose(Vec<Arc<dyn Transform>>);

impl Compose {
    pub fn new() -> Compose {
        Compose(Vec::new())
    }

    /// Appends a transform.
    pub fn then<T: Transform + 'static>(mut self, t: T) -> Compose {
        let any: &dyn Any = &t;
        if let (Some(n), Some(last)) = (any.downcast_ref::<Normalize>(), self.0.last()) {
            if last.is_to_tensor() {
                *self.0.last_mut().expect("checked") = Arc::new(ToTensorNormalize(n.clone()));
                return self;
            }
        }
        self.0.push(Arc::new(t));
        self
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Runs a deterministic pipeline (the test transform) on one image and gives the result as
    /// a tensor. Random transforms would always draw the same values here: use a `DataLoader`
    /// for those.
    ///
    /// # Shapes
    /// -> `[3, h, w]` f32 on the CPU
    pub fn tensor(&self, img: &RgbImage) -> Result<tch::Tensor> {
        let mut rng = rand::rngs::mock::StepRng::new(0, 0);
        let Sample::Tensor(t) = self.apply(Sample::Image(img.clone()), &mut rng)? else {
            return Err(Error::arg(
                "Compose::tensor",
                "the transform must end with ToTensor (it returned an image)",
            ));
        };
        Ok(tch::Tensor::from_slice(&t.data).f_reshape([3, t.height as i64, t.width as i64])?)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Transform for Compose {
    fn apply(&self, mut x: Sample, rng: &mut dyn RngCore) -> Result<Sample> {
        for t in &self.0 {
            x = t.apply(x, rng)?;
        }
        Ok(x)
    }
}

/// Python's `round()`: halves go to the even neighbour.
fn round_half_even(x: f64) -> i64 {
    x.round_ties_even() as i64
}

/// Crops a random region and resizes it to `size` (torchvision's `RandomResizedCrop`, bilinear
/// with antialias).
#[derive(Clone, Debug)]
pub struct RandomResizedCrop {
    /// Output `(height, width)`.
    pub size: (u32, u32),
    /// Range of the crop's area as a fraction of the image's.
    pub scale: (f64, f64),
    /// Range of the crop's aspect ratio (width / height), drawn log-uniformly.
    pub ratio: (f64, f64),
}

impl RandomResizedCrop {
    /// A square output, with torchvision's defaults: scale (0.08, 1), ratio (3/4, 4/3).
    pub fn new(size: u32) -> RandomResizedCrop {
        RandomResizedCrop {
            size: (size, size),
            scale: (0.08, 1.0),
            ratio: (3.0 / 4.0, 4.0 / 3.0),
        }
    }

    /// The crop `(top, left, height, width)` torchvision's `get_params` would pick with these
    /// draws: ten tries of area `U(scale) * H * W` and ratio `exp(U(ln ratio))`, then a central
    /// crop clamped to the ratio range.
    pub fn get_params(
        &self,
        height: u32,
        width: u32,
        rng: &mut dyn RngCore,
    ) -> (u32, u32, u32, u32) {
        let (h_in, w_in) = (height as f64, width as f64);
        let area = h_in * w_in;
        let (log_lo, log_hi) = (self.ratio.0.ln(), self.ratio.1.ln());
        for _ in 0..10 {
            let target_area = area * uniform(rng, self.scale.0, self.scale.1);
            let aspect = uniform(rng, log_lo, log_hi).exp();
            let w = round_half_even((target_area * aspect).sqrt());
            let h = round_half_even((target_area / aspect).sqrt());
            if 0 < w && w <= width as i64 && 0 < h && h <= height as i64 {
                let (h, w) = (h as u32, w as u32);
                let top = rng.gen_range(0..=height - h);
                let left = rng.gen_range(0..=width - w);
                return (top, left, h, w);
            }
        }
        let in_ratio = w_in / h_in;
        let (lo, hi) = (
            self.ratio.0.min(self.ratio.1),
            self.ratio.0.max(self.ratio.1),
        );
        let (h, w) = if in_ratio < lo {
            ((round_half_even(w_in / lo) as u32).min(height), width)
        } else if in_ratio > hi {
            (height, (round_half_even(h_in * hi) as u32).min(width))
        } else {
            (height, width)
        };
        ((height - h) / 2, (width - w) / 2, h, w)
    }
}

fn uniform(rng: &mut dyn RngCore, lo: f64, hi: f64) -> f64 {
    if hi > lo {
        rng.gen_range(lo..hi)
    } else {
        lo
    }
}

impl Transform for RandomResizedCrop {
    fn apply(&self, x: Sample, rng: &mut dyn RngCore) -> Result<Sample> {
        let img = x.into_image("RandomResizedCrop")?;
        let (top, left, h, w) = self.get_params(img.height(), img.width(), rng);
        Ok(Sample::Image(resized_crop(
            &img, top, left, h, w, self.size,
        )?))
    }
}

/// Crops `(top, left, height, width)` and resizes to `size` = `(height, width)`, bilinear with
/// antialias (PIL's `img.crop(...).resize(..., BILINEAR)`, as torchvision does on PIL images).
pub fn resized_crop(
    img: &RgbImage,
    top: u32,
    left: u32,
    height: u32,
    width: u32,
    size: (u32, u32),
) -> Result<RgbImage> {
    let fits =
        height > 0 && width > 0 && top + height <= img.height() && left + width <= img.width();
    if !fits || size.0 == 0 || size.1 == 0 {
        return Err(Error::arg(
            "resized_crop",
            format!(
                "crop {height}x{width} at ({top}, {left}) to {}x{} does not fit a {}x{} image",
                size.0,
                size.1,
                img.height(),
                img.width()
            ),
        ));
    }
    // Crop first, as PIL does: pixels outside the crop must not reach the resampling kernel at
    // its edges.
    let cropped;
    let region = if (top, left, height, width) == (0, 0, img.height(), img.width()) {
        img
    } else {
        cropped = crop_inside(img, top, left, height, width);
        &cropped
    };
    let src = ImageRef::new(width, height, region.as_raw(), PixelType::U8x3)
        .map_err(|e| Error::arg("resized_crop", e.to_string()))?;
    let mut dst = Image::new(size.1, size.0, PixelType::U8x3);
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear));
    Resizer::new()
        .resize(&src, &mut dst, &options)
        .map_err(|e| Error::arg("resized_crop", e.to_string()))?;
    RgbImage::from_raw(size.1, size.0, dst.into_vec())
        .ok_or_else(|| Error::arg("resized_crop", "output buffer has the wrong size"))
}

/// Copies a region that lies inside the image, a row at a time.
fn crop_inside(img: &RgbImage, top: u32, left: u32, height: u32, width: u32) -> RgbImage {
    let stride = img.width() as usize * 3;
    let (x0, row_len) = (left as usize * 3, width as usize * 3);
    let mut raw = Vec::with_capacity(row_len * height as usize);
    for row in img
        .as_raw()
        .chunks_exact(stride)
        .skip(top as usize)
        .take(height as usize)
    {
        raw.extend_from_slice(&row[x0..x0 + row_len]);
    }
    RgbImage::from_raw(width, height, raw).expect("width * height pixels")
}

/// Mirrors each row in place.
fn hflip_image(mut img: RgbImage) -> RgbImage {
    let w = img.width() as usize;
    for row in img.chunks_exact_mut(w * 3) {
        for x in 0..w / 2 {
            let (a, b) = (x * 3, (w - 1 - x) * 3);
            for c in 0..3 {
                row.swap(a + c, b + c);
            }
        }
    }
    img
}

/// Flips left-right with probability `p` (torchvision's `RandomHorizontalFlip`).
#[derive(Clone, Debug)]
pub struct RandomHorizontalFlip {
    pub p: f64,
}

impl RandomHorizontalFlip {
    pub fn new(p: f64) -> RandomHorizontalFlip {
        RandomHorizontalFlip { p }
    }
}

impl Default for RandomHorizontalFlip {
    fn default() -> Self {
        RandomHorizontalFlip::new(0.5)
    }
}

impl Transform for RandomHorizontalFlip {
    fn apply(&self, x: Sample, rng: &mut dyn RngCore) -> Result<Sample> {
        let flip = rng.gen::<f64>() < self.p;
        Ok(match x {
            Sample::Image(img) if flip => Sample::Image(hflip_image(img)),
            Sample::Tensor(t) if flip => Sample::Tensor(hflip_tensor(t)),
            other => other,
        })
    }
}

fn hflip_tensor(mut t: ImageTensor) -> ImageTensor {
    for row in t.data.chunks_mut(t.width.max(1)) {
        row.reverse();
    }
    t
}

/// Resizes to exactly `(height, width)`, bilinear with antialias; the aspect ratio is not kept
/// (torchvision's `Resize([256, 256])`, as the book's test transform does).
#[derive(Clone, Debug)]
pub struct Resize {
    pub size: (u32, u32),
}

impl Resize {
    pub fn new(height: u32, width: u32) -> Resize {
        Resize {
            size: (height, width),
        }
    }
}

impl Transform for Resize {
    fn apply(&self, x: Sample, _rng: &mut dyn RngCore) -> Result<Sample> {
        let img = x.into_image("Resize")?;
        let (h, w) = (img.height(), img.width());
        Ok(Sample::Image(resized_crop(&img, 0, 0, h, w, self.size)?))
    }
}

/// Crops the centre `(height, width)`, offsets `round((H - h) / 2)`; pads with black where the
/// image is smaller (torchvision's `CenterCrop`).
#[derive(Clone, Debug)]
pub struct CenterCrop {
    pub size: (u32, u32),
}

impl CenterCrop {
    pub fn new(size: u32) -> CenterCrop {
        CenterCrop { size: (size, size) }
    }
}

/// Crops `(top, left, height, width)`; parts outside the image are black.
pub fn crop(img: &RgbImage, top: i64, left: i64, height: u32, width: u32) -> RgbImage {
    let mut out = RgbImage::new(width, height);
    for y in 0..height {
        let sy = top + y as i64;
        if sy < 0 || sy >= img.height() as i64 {
            continue;
        }
        for x in 0..width {
            let sx = left + x as i64;
            if sx >= 0 && sx < img.width() as i64 {
                out.put_pixel(x, y, *img.get_pixel(sx as u32, sy as u32));
            }
        }
    }
    out
}

impl Transform for CenterCrop {
    fn apply(&self, x: Sample, _rng: &mut dyn RngCore) -> Result<Sample> {
        let img = x.into_image("CenterCrop")?;
        let (th, tw) = self.size;
        let top = round_half_even((img.height() as f64 - th as f64) / 2.0);
        let left = round_half_even((img.width() as f64 - tw as f64) / 2.0);
        Ok(Sample::Image(crop(&img, top, left, th, tw)))
    }
}

/// Pixels to a `[3, h, w]` float tensor in 0-1 (torchvision's `ToTensor`).
#[derive(Clone, Copy, Debug)]
pub struct ToTensor;

/// HWC `u8` to CHW `f32` / 255.
pub fn to_tensor(img: &RgbImage) -> ImageTensor {
    // Subtracting 0 and dividing by 1 are exact: the same values as a plain x / 255.
    to_tensor_normalized(img, [0.0; 3], [1.0; 3])
}

/// HWC `u8` to CHW `(x / 255 - mean) / std` in one pass over the pixels.
fn to_tensor_normalized(img: &RgbImage, m: [f32; 3], s: [f32; 3]) -> ImageTensor {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let plane = w * h;
    let mut data = vec![0f32; 3 * plane];
    let (r, rest) = data.split_at_mut(plane);
    let (g, b) = rest.split_at_mut(plane);
    let planes = r.iter_mut().zip(g.iter_mut()).zip(b.iter_mut());
    for (px, ((r, g), b)) in img.as_raw().chunks_exact(3).zip(planes) {
        *r = (px[0] as f32 / 255.0 - m[0]) / s[0];
        *g = (px[1] as f32 / 255.0 - m[1]) / s[1];
        *b = (px[2] as f32 / 255.0 - m[2]) / s[2];
    }
    ImageTensor {
        data,
        height: h,
        width: w,
    }
}

impl Transform for ToTensor {
    fn apply(&self, x: Sample, _rng: &mut dyn RngCore) -> Result<Sample> {
        Ok(Sample::Tensor(to_tensor(&x.into_image("ToTensor")?)))
    }

    fn is_to_tensor(&self) -> bool {
        true
    }
}

/// `ToTensor` then `Normalize` in one pass: `(x / 255 - mean) / std` per channel.
#[derive(Clone, Debug)]
struct ToTensorNormalize(Normalize);

impl Transform for ToTensorNormalize {
    fn apply(&self, x: Sample, _rng: &mut dyn RngCore) -> Result<Sample> {
        let img = x.into_image("ToTensor")?;
        Ok(Sample::Tensor(to_tensor_normalized(
            &img,
            self.0.mean,
            self.0.std,
        )))
    }
}

/// `(x - mean) / std` per channel (torchvision's `Normalize`).
#[derive(Clone, Debug)]
pub struct Normalize {
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Normalize {
    pub fn new(mean: [f32; 3], std: [f32; 3]) -> Normalize {
        Normalize { mean, std }
    }

    /// ImageNet's channel statistics, which the chapter uses.
    pub fn imagenet() -> Normalize {
        Normalize::new([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    }
}

impl Transform for Normalize {
    fn apply(&self, x: Sample, _rng: &mut dyn RngCore) -> Result<Sample> {
        let mut t = x.into_tensor("Normalize")?;
        let plane = t.height * t.width;
        for (c, chunk) in t.data.chunks_mut(plane.max(1)).enumerate().take(3) {
            let (m, s) = (self.mean[c], self.std[c]);
            for v in chunk {
                *v = (*v - m) / s;
            }
        }
        Ok(Sample::Tensor(t))
    }
}
