//! Saving a fine-tuned model and classifying single images with it.
//!
//! A checkpoint is two files: `<name>.safetensors` (every tensor, torchvision's names) and
//! `<name>.json` (architecture, class names, the test transform, the SHA-256 of the weights
//! file). Each is written under a temporary name and renamed, and loading checks the hash, so
//! an interrupted save never passes for a good checkpoint.
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use image::RgbImage;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tch::nn::{ModuleT, VarStore};
use tch::{Device, Kind, Tensor};

use super::{resnet18, ResNet};
use crate::data::transforms::{CenterCrop, Compose, Normalize, Resize, ToTensor};
use crate::error::{Error, Result};
use crate::files::{write_atomically, AtomicFile};
use crate::settings::Settings;

/// What a checkpoint's JSON file holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckpointConfig {
    /// `"resnet18"`.
    pub arch: String,
    /// Class names in label order (the `ImageFolder`'s classes).
    pub classes: Vec<String>,
    /// The test transform: `Resize([resize, resize])`, `CenterCrop(crop)`, `ToTensor`,
    /// `Normalize(mean, std)`.
    pub resize: u32,
    pub crop: u32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    /// SHA-256 of the `.safetensors` file, checked on load.
    pub weights_sha256: String,
    /// Anything else worth keeping (learning rate, test accuracy).
    #[serde(default)]
    pub notes: BTreeMap<String, String>,
    /// The chapter's settings in force when it was saved ([`Settings::auto`]).
    #[serde(default)]
    pub settings: Option<Settings>,
}

/// The two files of a checkpoint named `stem` (`dir/hotdog` -> `dir/hotdog.safetensors`,
/// `dir/hotdog.json`).
pub fn checkpoint_paths(stem: &Path) -> (PathBuf, PathBuf) {
    (stem_with(stem, ".safetensors"), stem_with(stem, ".json"))
}

/// `stem` with `suffix` appended to its file name (`dir/run` + `.json` -> `dir/run.json`, also
/// when the stem has dots of its own).
pub(crate) fn stem_with(stem: &Path, suffix: &str) -> PathBuf {
    let mut name = stem.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    stem.with_file_name(name)
}

pub(crate) fn sha256_file(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(format!("{:x}", hasher.finalize()))
}

/// Checks that `file` has the SHA-256 `expected` that `described_in` (the JSON written after
/// it) names: two files of one save, not of two. `remedy` says what to do otherwise.
pub(crate) fn check_sha256(
    file: &Path,
    expected: &str,
    described_in: &Path,
    remedy: &str,
) -> Result<()> {
    let actual = sha256_file(file)?;
    if actual == expected {
        return Ok(());
    }
    Err(Error::Weights {
        path: file.to_owned(),
        msg: format!(
            "SHA-256 {actual} differs from {expected} in {}: the files are not from one save; {remedy}",
            described_in.display()
        ),
    })
}

/// Saves `net` as a checkpoint named `stem` with the chapter's test transform (`Resize` to
/// `resize`, `CenterCrop` to `crop`, ImageNet normalisation). Returns the two paths.
///
/// In distributed training (a default process group) rank 0 writes it (its running statistics
/// are the ones training kept) and every rank waits for that at a barrier, so that any rank may
/// load it next.
pub fn save_checkpoint(
    net: &ResNet,
    stem: impl AsRef<Path>,
    classes: &[String],
    (resize, crop): (u32, u32),
    notes: BTreeMap<String, String>,
) -> Result<(PathBuf, PathBuf)> {
    let stem = stem.as_ref();
    if classes.len() as i64 != net.fc.out_features {
        return Err(Error::arg(
            "save_checkpoint",
            format!(
                "{} class names for a model with {} outputs",
                classes.len(),
                net.fc.out_features
            ),
        ));
    }
    if crop == 0 || crop > resize {
        return Err(Error::arg(
            "save_checkpoint",
            format!("crop {crop} must be between 1 and resize {resize}"),
        ));
    }
    let group = crate::dist::default_group();
    let written = if group.as_ref().is_none_or(|g| g.rank() == 0) {
        write_checkpoint(net, stem, classes, (resize, crop), notes)
    } else {
        Ok(checkpoint_paths(stem))
    };
    if let Some(g) = &group {
        // Also after a failed write on rank 0, so that no rank waits for it in vain.
        g.barrier()?;
    }
    written
}

fn write_checkpoint(
    net: &ResNet,
    stem: &Path,
    classes: &[String],
    (resize, crop): (u32, u32),
    notes: BTreeMap<String, String>,
) -> Result<(PathBuf, PathBuf)> {
    let (weights, json) = checkpoint_paths(stem);
    let dir = match weights.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(d) => d.to_owned(),
        None => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    // Contiguous CPU copies: channels-last or GPU tensors are saved in the standard layout.
    let tensors = tch::no_grad(|| -> Result<Vec<(String, Tensor)>> {
        net.named_tensors()
            .into_iter()
            .map(|(n, t)| Ok((n, t.f_to_device(Device::Cpu)?.f_contiguous()?)))
            .collect()
    })?;
    let tmp = AtomicFile::create(&weights)?;
    Tensor::write_safetensors(&tensors, tmp.temp_path())
        .map_err(|e| super::torch_write_error(&weights, e))?;
    let config = CheckpointConfig {
        arch: "resnet18".into(),
        classes: classes.to_vec(),
        resize,
        crop,
        mean: [0.485, 0.456, 0.406],
        std: [0.229, 0.224, 0.225],
        weights_sha256: sha256_file(tmp.temp_path())?,
        notes,
        settings: Settings::current(),
    };
    tmp.commit()?;
    let text = serde_json::to_string_pretty(&config).map_err(|e| Error::json(json.display(), e))?;
    write_atomically(&json, text.as_bytes())?;
    Ok((weights, json))
}

/// One image's class.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Prediction {
    pub class: String,
    pub index: usize,
    /// Softmax probability of `class`.
    pub probability: f64,
    /// Softmax probabilities of all classes, in class order.
    pub probabilities: Vec<f64>,
}

impl std::fmt::Display for Prediction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({:.1}%)", self.class, 100.0 * self.probability)
    }
}

/// A saved model ready to classify images.
pub struct Classifier {
    _vs: VarStore,
    net: ResNet,
    config: CheckpointConfig,
    transform: Compose,
    device: Device,
}

impl Classifier {
    /// Loads the checkpoint named `stem` (its `.json` or `.safetensors` path works too) onto
    /// `device`.
    pub fn load(stem: impl AsRef<Path>, device: Device) -> Result<Classifier> {
        let stem = stem.as_ref();
        let stem = match stem.extension().and_then(|e| e.to_str()) {
            Some("json" | "safetensors") => stem.with_extension(""),
            _ => stem.to_owned(),
        };
        let (weights, json) = checkpoint_paths(&stem);
        let text = std::fs::read_to_string(&json).map_err(|e| Error::io(&json, e))?;
        let config: CheckpointConfig = serde_json::from_str(&text).map_err(|e| Error::Weights {
            path: json.clone(),
            msg: format!("not a checkpoint description: {e}"),
        })?;
        if config.arch != "resnet18" || config.classes.is_empty() {
            return Err(Error::Weights {
                path: json,
                msg: format!(
                    "arch {:?} with {} classes; only resnet18 with at least one class loads",
                    config.arch,
                    config.classes.len()
                ),
            });
        }
        check_sha256(
            &weights,
            &config.weights_sha256,
            &json,
            "save the model again",
        )?;
        let vs = VarStore::new(device);
        let net = resnet18(&vs.root(), config.classes.len() as i64);
        let state = Tensor::read_safetensors(&weights).map_err(|e| Error::Weights {
            path: weights.clone(),
            msg: e.to_string(),
        })?;
        super::load_state_dict(&vs, &state, &[], &weights)?;
        let transform = Compose::new()
            .then(Resize::new(config.resize, config.resize))
            .then(CenterCrop::new(config.crop))
            .then(ToTensor)
            .then(Normalize::new(config.mean, config.std));
        Ok(Classifier {
            _vs: vs,
            net,
            config,
            transform,
            device,
        })
    }

    /// The checkpoint's description.
    pub fn config(&self) -> &CheckpointConfig {
        &self.config
    }

    /// The model.
    pub fn net(&self) -> &ResNet {
        &self.net
    }

    /// Classifies the image file at `path`.
    pub fn predict(&self, path: impl AsRef<Path>) -> Result<Prediction> {
        let img = crate::data::load_rgb(path.as_ref())?;
        self.predict_image(&img)
    }

    /// Classifies an image.
    pub fn predict_image(&self, img: &RgbImage) -> Result<Prediction> {
        let mut one = self.predict_images(std::slice::from_ref(img))?;
        one.pop()
            .ok_or_else(|| Error::arg("predict", "the model gave no prediction"))
    }

    /// Classifies images as one batch.
    pub fn predict_images(&self, imgs: &[RgbImage]) -> Result<Vec<Prediction>> {
        if imgs.is_empty() {
            return Ok(Vec::new());
        }
        let xs = imgs
            .iter()
            .map(|img| self.transform.tensor(img))
            .collect::<Result<Vec<_>>>()?;
        self.predict_tensors(&xs)
    }

    fn predict_tensors(&self, xs: &[Tensor]) -> Result<Vec<Prediction>> {
        let x = Tensor::f_stack(xs, 0)?.f_to_device(self.device)?;
        let probs = tch::no_grad(|| -> Result<Tensor> {
            Ok(self
                .net
                .forward_t(&x, false)
                .f_softmax(-1, Kind::Float)?
                .f_to_device(Device::Cpu)?
                .f_to_kind(Kind::Double)?)
        })?;
        let mut out = Vec::with_capacity(xs.len());
        for row in 0..probs.size()[0] {
            let probabilities = Vec::<f64>::try_from(probs.f_get(row)?)?;
            let (index, &probability) = probabilities
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .ok_or_else(|| Error::arg("predict", "the model has no outputs"))?;
            out.push(Prediction {
                class: self.config.classes[index].clone(),
                index,
                probability,
                probabilities,
            });
        }
        Ok(out)
    }

    /// Classifies every image file under `dir` (torchvision's image extensions, sub-folders
    /// included, in path order), `batch_size` at a time, the images of a batch decoded on all
    /// cores; with `progress`, a progress bar on standard error. An unreadable image is an error
    /// that names it.
    pub fn predict_folder(
        &self,
        dir: impl AsRef<Path>,
        batch_size: usize,
        progress: bool,
    ) -> Result<Vec<(PathBuf, Prediction)>> {
        let dir = dir.as_ref();
        if batch_size == 0 {
            return Err(Error::arg(
                "predict_folder",
                "batch_size must be at least 1",
            ));
        }
        let mut paths = Vec::new();
        collect_images(dir, &mut paths)?;
        paths.sort();
        if paths.is_empty() {
            return Err(Error::arg(
                "predict_folder",
                format!(
                    "{} holds no image files ({})",
                    dir.display(),
                    crate::data::IMG_EXTENSIONS.join(" ")
                ),
            ));
        }
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut bar = crate::display::ProgressBar::new("predict", paths.len(), progress);
        let mut out = Vec::with_capacity(paths.len());
        for chunk in paths.chunks(batch_size) {
            let per = chunk.len().div_ceil(threads);
            let transform = &self.transform; // the model stays on this thread
            let xs = std::thread::scope(|s| -> Result<Vec<Tensor>> {
                let handles: Vec<_> = chunk
                    .chunks(per)
                    .map(|part| {
                        s.spawn(move || -> Result<Vec<Tensor>> {
                            part.iter()
                                .map(|p| transform.tensor(&crate::data::load_rgb(p)?))
                                .collect()
                        })
                    })
                    .collect();
                let mut xs = Vec::with_capacity(chunk.len());
                for h in handles {
                    xs.extend(h.join().map_err(|_| Error::Panicked {
                        what: "predict_folder: decoding images".into(),
                    })??);
                }
                Ok(xs)
            })?;
            for (p, pred) in chunk.iter().zip(self.predict_tensors(&xs)?) {
                out.push((p.clone(), pred));
            }
            bar.inc(chunk.len());
        }
        bar.finish();
        Ok(out)
    }
}

fn collect_images(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for entry in entries {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        if path.is_dir() {
            collect_images(&path, out)?;
        } else if crate::data::is_image_file(&path) {
            out.push(path);
        }
    }
    Ok(())
}

/// A CSV field, quoted when it must be (RFC 4180: commas, quotes, line breaks).
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

/// Writes `path,label,probability` lines (with that header) for [`Classifier::predict_folder`]'s
/// results; the file appears whole or not at all.
pub fn write_predictions_csv(path: impl AsRef<Path>, rows: &[(PathBuf, Prediction)]) -> Result<()> {
    let mut text = String::from("path,label,probability\n");
    for (p, pred) in rows {
        text.push_str(&format!(
            "{},{},{:.6}\n",
            csv_field(&p.to_string_lossy()),
            csv_field(&pred.class),
            pred.probability
        ));
    }
    let path = path.as_ref();
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    write_atomically(path, text.as_bytes())
}
