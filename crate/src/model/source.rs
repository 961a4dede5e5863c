//! The offline source model: where the ImageNet weights cannot be had, the chapter's first step
//! (pre-train a source model on a source data set) done for real, on the synthetic food set.
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tch::nn::VarStore;
use tch::{Device, Reduction};

use super::resnet18;
use crate::data::synthetic::{make_source_dataset, SourceConfig};
use crate::data::transforms::{
    Compose, Normalize, RandomHorizontalFlip, RandomResizedCrop, Resize, ToTensor,
};
use crate::data::{DataLoader, ImageFolder};
use crate::error::{Error, Result};
use crate::files::{lock, AtomicDir};
use crate::train::{
    evaluate_accuracy_gpu, train_batch_ch13, CrossEntropyLoss, DataParallel, ParamGroup,
    StepOptions, SGD,
};

/// How the source model is trained.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SourceModelConfig {
    pub data: SourceConfig,
    /// Training and test images are this many pixels square.
    pub image_size: u32,
    pub epochs: usize,
    pub batch_size: usize,
    /// SGD with momentum 0.9 on the mean loss (a from-scratch recipe, not the chapter's).
    pub lr: f64,
    pub weight_decay: f64,
    pub seed: u64,
}

impl Default for SourceModelConfig {
    fn default() -> Self {
        SourceModelConfig {
            data: SourceConfig::default(),
            image_size: 64,
            epochs: 6,
            batch_size: 64,
            lr: 0.05,
            weight_decay: 5e-4,
            seed: 0,
        }
    }
}

/// A trained source model and what it is.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SourceModel {
    /// ResNet-18 weights (safetensors), `fc` with one output per source class.
    pub weights: PathBuf,
    pub config: SourceModelConfig,
    pub classes: Vec<String>,
    pub test_acc: f64,
    pub train_seconds: f64,
}

impl SourceModel {
    /// One line that says plainly what this model is.
    pub fn describe(&self) -> String {
        format!(
            "source model: ResNet-18 pre-trained on the synthetic {}-class food set (with a hot-dog class, as ImageNet has; \
             {} images, {}px, {} epochs), NOT on ImageNet; source test acc {:.3}",
            self.classes.len(),
            self.classes.len() * self.config.data.train_per_class,
            self.config.image_size,
            self.config.epochs,
            self.test_acc
        )
    }
}

/// Trains (or finds in `cache`) the source model for `cfg`: the source set is drawn, a
/// ResNet-18 trained on it from scratch, and the weights, config and report are kept in
/// `cache/source-model-<key>/`, written under temporary names and renamed when complete.
pub fn pretrain_source_model(
    cache: impl AsRef<Path>,
    cfg: &SourceModelConfig,
    device: Device,
) -> Result<SourceModel> {
    let cache = cache.as_ref();
    // The classes are part of what the model is: a new class list makes a new model.
    let key = crate::offline::config_key(&(cfg, crate::data::synthetic::SOURCE_CLASSES))?;
    let dir = cache.join(format!("source-model-{key}"));
    let report = dir.join("report.json");
    let cached = || -> Option<SourceModel> {
        let text = std::fs::read_to_string(&report).ok()?;
        let model = serde_json::from_str::<SourceModel>(&text).ok()?;
        (model.config == *cfg
            && model.classes == crate::data::synthetic::SOURCE_CLASSES
            && model.weights.is_file())
        .then_some(model)
    };
    if let Some(model) = cached() {
        return Ok(model);
    }
    // One process trains it; others sharing the cache wait, then load it.
    let _lock = lock(&dir)?;
    if let Some(model) = cached() {
        return Ok(model);
    }

    let root = make_source_dataset(cache.join("data"), &cfg.data)?;
    let (train, test) = (
        ImageFolder::new(root.join("train"))?,
        ImageFolder::new(root.join("test"))?,
    );
    let classes = train.classes().to_vec();
    let size = cfg.image_size;
    let train_augs = Compose::new()
        .then(RandomResizedCrop {
            size: (size, size),
            scale: (0.25, 1.0),
            ratio: (3.0 / 4.0, 4.0 / 3.0),
        })
        .then(RandomHorizontalFlip::new(0.5))
        .then(ToTensor)
        .then(Normalize::imagenet());
    let test_augs = Compose::new()
        .then(Resize::new(size, size))
        .then(ToTensor)
        .then(Normalize::imagenet());
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let train_iter = DataLoader::new(train, train_augs, cfg.batch_size)?
        .shuffle(true)
        .seed(cfg.seed)
        .num_workers(workers);
    let test_iter = DataLoader::new(test, test_augs, cfg.batch_size)?.num_workers(workers);

    tch::manual_seed(cfg.seed as i64);
    let vs = VarStore::new(device);
    let net = resnet18(&vs.root(), classes.len() as i64);
    let mut trainer = SGD::with_momentum(
        [ParamGroup::new(net.parameters())],
        cfg.lr,
        0.9,
        cfg.weight_decay,
    )?;
    // The mean over the batch (train_batch_ch13 sums what the loss gives: one value here).
    let loss = CrossEntropyLoss::new(Reduction::Mean);
    let mut parallel = DataParallel::new(&net, &[device])?;
    let opts = StepOptions::default();
    let start = Instant::now();
    let steps = (cfg.epochs * train_iter.len()).max(1);
    let mut step = 0;
    for epoch in 0..cfg.epochs {
        let mut loss_sum = 0.0;
        for batch in &train_iter {
            let (x, y) = batch?;
            // Cosine decay: from-scratch training on a small set settles better with it.
            let lr =
                cfg.lr * 0.5 * (1.0 + (std::f64::consts::PI * step as f64 / steps as f64).cos());
            trainer.set_lr(0, lr)?;
            let (l, _) = train_batch_ch13(&mut parallel, &x, &y, &loss, &mut trainer, &opts)?;
            loss_sum += l;
            step += 1;
        }
        println!(
            "source model: epoch {}/{}, loss {:.3}",
            epoch + 1,
            cfg.epochs,
            loss_sum / train_iter.len() as f64
        );
    }
    let test_acc = evaluate_accuracy_gpu(&net, &test_iter, device)?;

    let staging = AtomicDir::create(&dir)?;
    let weights = staging.path().join("model.safetensors");
    vs.save(&weights)
        .map_err(|e| crate::model::torch_write_error(&weights, e))?;
    let model = SourceModel {
        weights: dir.join("model.safetensors"),
        config: cfg.clone(),
        classes,
        test_acc,
        train_seconds: start.elapsed().as_secs_f64(),
    };
    let text =
        serde_json::to_string_pretty(&model).map_err(|e| Error::json("source model report", e))?;
    let staged_report = staging.path().join("report.json");
    std::fs::write(&staged_report, text).map_err(|e| Error::io(&staged_report, e))?;
    staging.commit(None)?;
    Ok(model)
}
