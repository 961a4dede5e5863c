//! Showing results: image grids and training curves, inline in an evcxr notebook or saved to
//! files outside one.
mod animator;
mod confusion;
mod font;
mod progress;

use std::io::Write;
use std::path::{Path, PathBuf};

pub use animator::Animator;
pub use confusion::confusion_matrix_figure;
pub use progress::ProgressBar;

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
            return Err(Error::arg(
                "Png::from_rgb",
                format!(
                    "{width}x{height} RGB needs {expected} bytes, got {}",
                    rgb.len()
                ),
            ));
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
                return Err(Error::arg(
                    "Png::from_tensor",
                    format!("expected a [3, h, w] or [1, h, w] image, got shape {size:?}"),
                ))
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
                return Err(Error::arg(
                    "Png::from_tensor",
                    format!("expected u8 or floating-point pixels, got {kind:?}"),
                ))
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

    /// Writes the PNG to `path`, creating its parent directories; the file appears whole or
    /// not at all.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        crate::files::write_atomically(path.as_ref(), &self.bytes)
    }

    /// In a notebook, shows the image as the cell's output; elsewhere saves `name.png` into
    /// [`figures_dir`] and prints where (in distributed training, rank 0 only). Returns the
    /// saved path outside a notebook.
    pub fn show(&self, name: &str) -> Result<Option<PathBuf>> {
        if in_notebook() {
            self.evcxr_display();
            return Ok(None);
        }
        if !crate::dist::is_main_process() {
            return Ok(None);
        }
        let path = figures_dir().join(format!("{name}.png"));
        self.save(&path)?;
        println!("saved figure {}", path.display());
        Ok(Some(path))
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

/// Whether this code runs inside an evcxr kernel (it sets `EVCXR_IS_RUNTIME` in the process
/// that runs cells).
pub fn in_notebook() -> bool {
    std::env::var_os("EVCXR_IS_RUNTIME").is_some()
}

pub use crate::files::{figures_dir, set_figures_dir};

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

/// A grid of images (d2l's `show_images(imgs, num_rows, num_cols, titles, scale)`): each image
/// is fitted into its cell with its aspect ratio kept, on white, axes hidden, with an optional
/// title above it. The grid is `num_cols * scale` by `num_rows * scale` inches at 100 dpi, as
/// matplotlib draws it (`2 x 8` at scale 1.4: 1120 x 280 pixels). Show it with `show` or
/// `evcxr_display` (the value of a cell), or save it.
pub fn show_images(
    imgs: &[image::RgbImage],
    num_rows: usize,
    num_cols: usize,
    titles: Option<&[String]>,
    scale: f64,
) -> Result<Png> {
    if num_rows == 0 || num_cols == 0 || scale.is_nan() || scale <= 0.0 || scale > 100.0 {
        return Err(Error::arg("show_images", format!(
            "num_rows and num_cols must be at least 1 and scale in (0, 100], got {num_rows}, {num_cols}, {scale}"
        )));
    }
    if imgs.len() > num_rows * num_cols {
        return Err(Error::arg(
            "show_images",
            format!(
                "{} images do not fit a {num_rows} x {num_cols} grid",
                imgs.len()
            ),
        ));
    }
    if let Some(t) = titles.filter(|t| t.len() != imgs.len()) {
        return Err(Error::arg(
            "show_images",
            format!(
                "{} titles for {} images; give one title an image",
                t.len(),
                imgs.len()
            ),
        ));
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
    // A title takes a line of text above its image (matplotlib's 12 pt at 100 dpi, scaled
    // down with small cells).
    let font_px = (cell_h * 0.11).clamp(7.0, 16.0);
    // Titles may have several lines (`"pred\ntrue"`).
    let lines = titles.map_or(0, |t| {
        t.iter()
            .map(|s| s.lines().count())
            .max()
            .unwrap_or(1)
            .max(1)
    });
    let title_h = lines as f64 * font_px * 1.3 + if lines > 0 { 0.3 * font_px } else { 0.0 };
    for (k, img) in imgs.iter().enumerate() {
        let (row, col) = (k / num_cols, k % num_cols);
        let (box_w, box_h) = (cell_w - 2.0 * pad, cell_h - 2.0 * pad - title_h);
        let fit = (box_w / img.width() as f64).min(box_h / img.height() as f64);
        let (w, h) = (
            ((img.width() as f64 * fit).round() as u32).max(1),
            ((img.height() as f64 * fit).round() as u32).max(1),
        );
        let resized =
            crate::data::transforms::resized_crop(img, 0, 0, img.height(), img.width(), (h, w))?;
        let x = (col as f64 * cell_w + (cell_w - w as f64) / 2.0).round() as i64;
        let y =
            (row as f64 * cell_h + title_h + (cell_h - title_h - h as f64) / 2.0).round() as i64;
        image::imageops::replace(&mut canvas, &resized, x, y);
    }
    if let Some(titles) = titles {
        draw_titles(
            &mut canvas,
            titles,
            num_cols,
            (cell_w, cell_h),
            pad,
            font_px,
        )?;
    }
    Png::from_rgb(width, height, canvas.as_raw())
}

fn draw_titles(
    canvas: &mut image::RgbImage,
    titles: &[String],
    num_cols: usize,
    (cell_w, cell_h): (f64, f64),
    pad: f64,
    font_px: f64,
) -> Result<()> {
    use plotters::prelude::*;
    use plotters::style::text_anchor::{HPos, Pos, VPos};
    font::ensure()?;
    let (w, h) = canvas.dimensions();
    let root = BitMapBackend::with_buffer(canvas.as_mut(), (w, h)).into_drawing_area();
    let style = TextStyle::from((font::FAMILY, font_px).into_font())
        .color(&BLACK)
        .pos(Pos::new(HPos::Center, VPos::Top));
    for (k, title) in titles.iter().enumerate() {
        let (row, col) = (k / num_cols, k % num_cols);
        let at = (
            (col as f64 * cell_w + cell_w / 2.0).round() as i32,
            (row as f64 * cell_h + pad).round() as i32,
        );
        for (l, line) in title.lines().enumerate() {
            let at = (at.0, at.1 + (l as f64 * font_px * 1.3).round() as i32);
            root.draw(&Text::new(line, at, style.clone()))
                .map_err(|e| Error::Plot(e.to_string()))?;
        }
    }
    root.present().map_err(|e| Error::Plot(e.to_string()))
}
