//! # d2l: Dive into Deep Learning, fine-tuning chapter, in Rust
//!
//! The Rust twin of `from d2l import torch as d2l`, for §14.2 "Fine-Tuning" (hotdog
//! recognition), built on [`tch`] (libtorch). It is re-exported as `d2l::tch`, so a notebook
//! needs one `:dep` line:
//!
//! ```text
//! :dep d2l = { path = "../crate" }
//! ```
//!
//! Devices work as in the book: [`try_gpu`] and [`try_all_gpus`] fall back to the CPU, and a
//! device list prints like PyTorch's:
//!
//! ```no_run
//! let devices = d2l::try_all_gpus();
//! println!("{devices}"); // [device(type='cpu')] or [device(type='cuda', index=0)]
//! ```

pub mod data;
mod device;
mod display;
pub mod dist;
mod error;
pub mod files;
pub mod model;
pub mod offline;
mod settings;
mod switch;
pub mod train;
pub mod tuning;

pub use data::{download, download_extract, DataLoader, ImageFolder, DATA_HUB, DATA_URL};
pub use device::{device_repr, num_gpus, try_all_gpus, try_gpu, versions, Devices, Versions};
pub use display::{
    confusion_matrix_figure, evcxr_content, figures_dir, gradient_image, in_notebook,
    set_figures_dir, show_images, Animator, Png, ProgressBar,
};
pub use error::{exit_code, Error, Result};
pub use image;
pub use settings::{d2l_home, Settings};
pub use tch;
