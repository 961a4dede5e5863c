//! Getting and reading data: the data hub and downloads, image folders, transforms, the loader,
//! and the offline data sets.
mod download;
mod image_folder;
mod loader;
pub mod synthetic;
pub mod transforms;

pub use download::{
    data_dir, download, download_extract, extract, extract_with, fetch, mirrored, Checksum,
    DataHub, ExtractLimits, DATA_HUB, DATA_URL,
};
pub use image_folder::{decode_rgb, is_image_file, load_rgb, ImageFolder, IMG_EXTENSIONS};
pub use loader::{Batch, Batches, DataLoader};
