//! The offline stand-in for what the book downloads, for machines that cannot reach it: a
//! generated hotdog-like data set in place of `hotdog.zip`, and a ResNet-18 pre-trained here on
//! a generated 11-class food set (one class hot dogs, as ImageNet has one) in place of the
//! ImageNet weights.
//!
//! [`Settings::install`](crate::Settings::install) puts it in force; from then on the chapter's
//! own calls resolve to it, so the notebook's cells are the same code with or without it:
//! `download_extract("hotdog")` returns the generated set's folder and `resnet18_pretrained`
//! loads the source model trained here (both made once, then cached under
//! `<d2l_home>/chapter/`). Each says so, loudly, wherever it answers.
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::data::synthetic::{make_hotdog_dataset, HotdogConfig, SOURCE_CLASSES};
use crate::error::{Error, Result};
use crate::model::{pretrain_source_model, SourceModelConfig, RESNET18_IMAGENET1K_V1};
use crate::settings::{d2l_home, Settings};

/// What stands in for the book's data set and pre-trained weights.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StandIn {
    /// The generated set that `download_extract("hotdog")` gives.
    pub hotdog: HotdogConfig,
    /// The source model that `resnet18_pretrained` loads, pre-trained here.
    pub source: SourceModelConfig,
}

/// The stand-in of the settings in force, if they have one.
fn active() -> Option<StandIn> {
    Settings::current()?.stand_in
}

/// Where the stand-in keeps what it makes.
fn cache() -> PathBuf {
    d2l_home().join("chapter")
}

/// A short key for a configuration (FNV-1a of its JSON), so that each configuration gets a
/// folder of its own and switching between them remakes nothing.
pub(crate) fn config_key(config: &impl Serialize) -> Result<String> {
    let text = serde_json::to_string(config).map_err(|e| Error::json("a configuration key", e))?;
    let key = text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    });
    Ok(format!("{key:016x}"))
}

/// For `download_extract(name)`: the generated set in place of the book's `hotdog.zip`, when
/// the stand-in is in force; `None` otherwise (the data hub's archive is fetched).
pub(crate) fn data_set(name: &str) -> Option<Result<PathBuf>> {
    let s = active().filter(|_| name == "hotdog")?;
    Some((|| {
        let root = cache().join(format!("data-{}", config_key(&s.hotdog)?));
        let dir = make_hotdog_dataset(root, &s.hotdog)?;
        println!(
            "download_extract(\"hotdog\"): OFFLINE STAND-IN, generated images in {} (not the book's hotdog.zip)",
            dir.display()
        );
        Ok(dir)
    })())
}

/// For `weights_file(file_name)`: the source model pre-trained here in place of torchvision's
/// ImageNet weights, when the stand-in is in force; `None` otherwise.
pub(crate) fn weights(file_name: &str) -> Option<Result<PathBuf>> {
    let s = active().filter(|_| file_name == RESNET18_IMAGENET1K_V1)?;
    Some((|| {
        let model = pretrain_source_model(cache(), &s.source, crate::try_gpu(0))?;
        println!(
            "{RESNET18_IMAGENET1K_V1}: OFFLINE STAND-IN, {}",
            model.describe()
        );
        Ok(model.weights)
    })())
}

/// The stand-in source model's hot-dog class: its index in the source set's classes (sorted,
/// as `ImageFolder` numbers them) and its name.
pub(crate) fn source_hotdog_class() -> (i64, String) {
    let mut classes = SOURCE_CLASSES.to_vec();
    classes.sort_unstable();
    let index = classes.iter().position(|c| *c == "hotdog").unwrap_or(0);
    (index as i64, classes[index].to_owned())
}
