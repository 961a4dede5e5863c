//! Getting and reading data: the data hub and downloads, image folders, transforms, the loader.
mod download;

pub use download::{
    data_dir, download, download_extract, extract, fetch, mirrored, Checksum, DataHub, DATA_HUB,
    DATA_URL,
};
