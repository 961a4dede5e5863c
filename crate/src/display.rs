//! Showing results: PNG images, inline in an evcxr notebook or saved to a file.
use std::io::Write;
use std::path::Path;

use base64::Engine;
use image::codecs::png::PngEncoder;
use image::{ExtendedColorType, ImageEncoder};
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};

/// Sends one rich output to the evcxr kernel (its display protocol on stdout).
///
/// evcxr collects these per MIME type and sends them when the cell ends: only the last output
/// of each MIME type in a cell survives. Outside a notebook this prints the block as text.
pub fn evcxr_content(mime: &str, data: &str) {
    let mut out = std::io::stdout().lock();
    // A closed stdout is no reason to fail a computation: the display is lost, nothing else.
    let _ = writeln!(out, "EVCXR_BEGIN_CONTENT {mime}\n{data}\nEVCXR_END_CONTENT");
    let _ = out.flush();
}

/// An encoded PNG image.
#[derive(Clone)]
pub struct Png {
    bytes: Vec<u8>,
    width: u32,
    height: u32,
}

impl Png {
    /// Encodes `width * height` RGB pixels (row-major, 3 bytes a pixel).
    pub fn from_rgb(width: u32, height: u32, rgb: &[u8]) -> Result<Png> {
        let expected = width as usize * height as usize * 3;
        if rgb.len() != expected || expected == 0 {
            return Err(Error::Invalid(format!(
                "Png::from_rgb: {width}x{height} RGB needs {expected} bytes, got {}",
                rgb.len()
            )));
        }
        let mut bytes = Vec::new();
        PngEncoder::new(&mut bytes).write_image(rgb, width, height, ExtendedColorType::Rgb8)?;
        Ok(Png {
            bytes,
            width,
            height,
        })
    }

    /// Encodes an image tensor: `[3, h, w]` or `[1, h, w]`, either `u8` (0-255) or floating
    /// point (0-1, clamped), on any device.
    pub fn from_tensor(image: &Tensor) -> Result<Png> {
        let (h, w) = match image.size()[..] {
            [1 | 3, h, w] if h > 0 && w > 0 => (h, w),
            ref size => {
                return Err(Error::Invalid(format!(
                    "Png::from_tensor: expected a [3, h, w] or [1, h, w] image, got shape {size:?}"
                )))
            }
        };
        let image = image.to_device(Device::Cpu);
        let image = match image.kind() {
            Kind::Uint8 => image,
            Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16 => image
                .f_to_kind(Kind::Float)?
                .f_clamp(0.0, 1.0)?
                .f_mul_scalar(255.0)?
                .f_round()?
                .f_to_kind(Kind::Uint8)?,
            kind => {
                return Err(Error::Invalid(format!(
                    "Png::from_tensor: expected u8 or floating-point pixels, got {kind:?}"
                )))
            }
        };
        // [c, h, w] -> [h, w, 3]
        let hwc = image
            .f_expand([3, h, w], false)?
            .f_permute([1, 2, 0])?
            .f_contiguous()?;
        let rgb = Vec::<u8>::try_from(hwc.f_flatten(0, -1)?)?;
        Png::from_rgb(w as u32, h as u32, &rgb)
    }

    /// The encoded bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Width and height in pixels.
    pub fn size(&self) -> (u32, u32) {
        (self.width, self.height)
    }

    /// Writes the PNG to `path`, creating its parent directories.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        std::fs::write(path, &self.bytes).map_err(|e| Error::io(path, e))
    }

    /// Shows the image inline when it is the value of an evcxr cell.
    pub fn evcxr_display(&self) {
        let data = base64::engine::general_purpose::STANDARD.encode(&self.bytes);
        evcxr_content("image/png", &data);
    }
}

impl std::fmt::Debug for Png {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Png({}x{}, {} bytes)",
            self.width,
            self.height,
            self.bytes.len()
        )
    }
}

/// A test pattern: red grows from left to right, green from top to bottom, blue falls with red.
///
/// # Shapes
/// Returns `[3, height, width]` floats in 0-1 on `device`.
pub fn gradient_image(height: i64, width: i64, device: Device) -> Tensor {
    let opts = (Kind::Float, device);
    let x = Tensor::linspace(0.0, 1.0, width, opts).expand([height, width], false);
    let y = Tensor::linspace(0.0, 1.0, height, opts)
        .unsqueeze(1)
        .expand([height, width], false);
    Tensor::stack(&[&x, &y, &(1.0 - &x)], 0) // [3, h, w]
}

/// A grid of images (d2l's `show_images(imgs, num_rows, num_cols, scale)`): each image is fitted
/// into its cell with its aspect ratio kept, on white, axes hidden. The grid is
/// `num_cols * scale` by `num_rows * scale` inches at 100 dpi, as matplotlib draws it
/// (`2 x 8` at scale 1.4: 1120 x 280 pixels). Show it with `evcxr_display` (the value of a cell)
/// or save it.
pub fn show_images(
    imgs: &[image::RgbImage],
    num_rows: usize,
    num_cols: usize,
    scale: f64,
) -> Result<Png> {
    if num_rows == 0 || num_cols == 0 || scale.is_nan() || scale <= 0.0 {
        return Err(Error::Invalid(format!(
            "show_images: num_rows and num_cols must be at least 1 and scale positive, got {num_rows}, {num_cols}, {scale}"
        )));
    }
    if imgs.len() > num_rows * num_cols {
        return Err(Error::Invalid(format!(
            "show_images: {} images do not fit a {num_rows} x {num_cols} grid",
            imgs.len()
        )));
    }
    let (width, height) = (
        (num_cols as f64 * scale * 100.0).round() as u32,
        (num_rows as f64 * scale * 100.0).round() as u32,
    );
    let mut canvas = image::RgbImage::from_pixel(width, height, image::Rgb([255, 255, 255]));
    let (cell_w, cell_h) = (
        width as f64 / num_cols as f64,
        height as f64 / num_rows as f64,
    );
    // matplotlib leaves some space between subplots; 5% of a cell on each side looks alike.
    let pad = 0.05 * cell_w.min(cell_h);
    for (k, img) in imgs.iter().enumerate() {
        let (row, col) = (k / num_cols, k % num_cols);
        let (box_w, box_h) = (cell_w - 2.0 * pad, cell_h - 2.0 * pad);
        let fit = (box_w / img.width() as f64).min(box_h / img.height() as f64);
        let (w, h) = (
            ((img.width() as f64 * fit).round() as u32).max(1),
            ((img.height() as f64 * fit).round() as u32).max(1),
        );
        let resized =
            crate::data::transforms::resized_crop(img, 0, 0, img.height(), img.width(), (h, w))?;
        let x = (col as f64 * cell_w + (cell_w - w as f64) / 2.0).round() as i64;
        let y = (row as f64 * cell_h + (cell_h - h as f64) / 2.0).round() as i64;
        image::imageops::replace(&mut canvas, &resized, x, y);
    }
    Png::from_rgb(width, height, canvas.as_raw())
}
