//! The one font plots use: DejaVu Sans (matplotlib's default), embedded in the binary, so that
//! text renders the same on a machine with no system fonts at all.
use std::sync::OnceLock;

use plotters::style::FontStyle;

use crate::error::{Error, Result};

/// The family name plots ask for; [`ensure`] registers DejaVu Sans under it.
pub(crate) const FAMILY: &str = "sans-serif";

/// Registers the embedded fonts once per process.
pub(crate) fn ensure() -> Result<()> {
    static REGISTERED: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            for (style, bytes) in [
                (FontStyle::Normal, dejavu::sans::regular()),
                (FontStyle::Bold, dejavu::sans::bold()),
            ] {
                plotters::style::register_font(FAMILY, style, bytes).map_err(|_| {
                    format!(
                        "the embedded DejaVu Sans ({}) is not a font",
                        style.as_str()
                    )
                })?;
            }
            Ok(())
        })
        .clone()
        .map_err(Error::Plot)
}
