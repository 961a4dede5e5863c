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
