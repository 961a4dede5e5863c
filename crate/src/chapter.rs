//! The chapter itself (§14.2 "Fine-Tuning"), shared by the notebook and its example binary:
//! which profile runs (the book's settings, or an offline stand-in), the data, the source
//! model, `train_fine_tuning`, and a grid of predictions.
//!
//! **book**: `hotdog.zip` and torchvision's ImageNet ResNet-18, 224 px, batch 128, 5 epochs.
//! **offline**: where those cannot be fetched: a generated hotdog-like set and a ResNet-18
//! pre-trained here on a generated 11-class food set, at sizes a CPU finishes in minutes.
//! **ci**: the offline path at toy sizes, for tests. `D2L_PROFILE=book|offline|ci` chooses;
//! otherwise [`Profile::auto`] looks at what can be had.
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tch::nn::{ModuleT, VarStore};
use tch::{Device, Kind, Tensor};

use crate::data::synthetic::{make_hotdog_dataset, HotdogConfig, SourceConfig};
use crate::data::transforms::{
    CenterCrop, Compose, Normalize, RandomHorizontalFlip, RandomResizedCrop, Resize, ToTensor,
};
use crate::data::{download_extract, mirrored, DataLoader, ImageFolder, DATA_HUB};
use crate::device::{try_all_gpus, Devices};
use crate::display::{show_images, Png};
use crate::error::{Error, Result};
use crate::model::{
    pretrain_source_model, read_weights, resnet18_from, torch_home, weights_file, ResNet,
    SourceModel, SourceModelConfig, RESNET18_IMAGENET1K_V1, WEIGHTS_URL,
};
use crate::train::{cross_entropy, sgd, train_ch13_with, History, StepOptions, TrainOptions};

/// The project's cache (`D2L_HOME`, else `~/.cache/d2l-rs`): generated data and source models
/// live under `chapter/` there, keyed by their configuration.
pub fn d2l_home() -> PathBuf {
    if let Some(home) = std::env::var_os("D2L_HOME") {
        return PathBuf::from(home);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("d2l-rs")
}

/// Which settings run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProfileName {
    Book,
    Offline,
    Ci,
}

impl ProfileName {
    pub fn as_str(self) -> &'static str {
        match self {
            ProfileName::Book => "book",
            ProfileName::Offline => "offline",
            ProfileName::Ci => "ci",
        }
    }
}

/// Everything the chapter's cells need to know about the run.
#[derive(Clone, Debug)]
pub struct Profile {
    pub name: ProfileName,
    /// Why this profile was chosen.
    pub why: String,
    /// `RandomResizedCrop` size for training; `CenterCrop` size for testing.
    pub crop: u32,
    /// Test images are first resized to `resize x resize` (the book: 256, then crop 224).
    pub resize: u32,
    pub batch_size: usize,
    pub num_epochs: usize,
    /// Epochs of each exercise run.
    pub exercise_epochs: usize,
    /// `train_ch13`'s devices (`try_all_gpus()`).
    pub devices: Devices,
    /// Data-loader threads.
    pub num_workers: usize,
    /// Step options (precision, layout); the book's numbers come with the defaults.
    pub step: StepOptions,
    /// The generated hotdog-like set (offline and ci).
    pub hotdog: Option<HotdogConfig>,
    /// The source model trained here (offline and ci).
    pub source: Option<SourceModelConfig>,
    pub seed: u64,
}

fn workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

impl Profile {
    /// The book's settings.
    pub fn book() -> Profile {
        let devices = try_all_gpus();
        let on_gpu = devices.iter().any(|d| d.is_cuda());
        Profile {
            name: ProfileName::Book,
            why: "chosen".into(),
            crop: 224,
            resize: 256,
            batch_size: 128,
            num_epochs: 5,
            exercise_epochs: 5,
            num_workers: if on_gpu { workers().min(8) } else { 1 },
            devices,
            step: StepOptions::default(),
            hotdog: None,
            source: None,
            seed: 0,
        }
    }

    /// The offline stand-in, sized for a 2-core CPU: the whole notebook in minutes.
    pub fn offline() -> Profile {
        Profile {
            name: ProfileName::Offline,
            why: "chosen".into(),
            crop: 64,
            resize: 72,
            batch_size: 32,
            num_epochs: 5,
            exercise_epochs: 3,
            num_workers: 1,
            devices: try_all_gpus(),
            step: StepOptions::default(),
            hotdog: Some(HotdogConfig {
                train_per_class: 500,
                test_per_class: 200,
                min_side: 64,
                max_side: 192,
                seed: 0,
            }),
            source: Some(SourceModelConfig::default()),
            seed: 0,
        }
    }

    /// The offline path at toy sizes (tests and CI): seconds, not minutes.
    pub fn ci() -> Profile {
        Profile {
            name: ProfileName::Ci,
            why: "chosen".into(),
            crop: 32,
            resize: 36,
            batch_size: 16,
            num_epochs: 2,
            exercise_epochs: 1,
            num_workers: 1,
            devices: try_all_gpus(),
            step: StepOptions::default(),
            hotdog: Some(HotdogConfig {
                train_per_class: 24,
                test_per_class: 8,
                min_side: 32,
                max_side: 80,
                seed: 0,
            }),
            source: Some(SourceModelConfig {
                data: SourceConfig {
                    train_per_class: 24,
                    test_per_class: 6,
                    min_side: 32,
                    max_side: 64,
                    seed: 1,
                },
                image_size: 32,
                epochs: 2,
                batch_size: 32,
                ..SourceModelConfig::default()
            }),
            seed: 0,
        }
    }

    /// `book`, `offline` or `ci`. Like [`Profile::auto`], seeds libtorch's random generator with
    /// the profile's seed, so that the chapter's runs repeat.
    pub fn named(name: &str) -> Result<Profile> {
        let mut p = match name.trim().to_ascii_lowercase().as_str() {
            "book" => Profile::book(),
            "offline" => Profile::offline(),
            "ci" => Profile::ci(),
            other => {
                return Err(Error::Invalid(format!(
                    "unknown profile {other:?}: use book, offline or ci (D2L_PROFILE)"
                )))
            }
        };
        p.why = format!("asked for ({name:?})");
        tch::manual_seed(p.seed as i64);
        Ok(p)
    }

    /// `D2L_PROFILE` if set; else the book's settings when `hotdog.zip` and the ImageNet
    /// weights are on disk or reachable, and the offline stand-in when they are not.
    pub fn auto() -> Result<Profile> {
        if let Ok(name) = std::env::var("D2L_PROFILE") {
            if !name.trim().is_empty() {
                let mut p = Profile::named(&name)?;
                p.why = format!("D2L_PROFILE={name}");
                return Ok(p);
            }
        }
        let (url, _) = DATA_HUB
            .get("hotdog")
            .ok_or_else(|| Error::Invalid("DATA_HUB has no \"hotdog\" entry".into()))?;
        let data_here = crate::data::data_dir().join("hotdog.zip").is_file();
        let weights_here = torch_home()
            .join("hub/checkpoints")
            .join(RESNET18_IMAGENET1K_V1)
            .is_file();
        let weights_url = match std::env::var("D2L_WEIGHTS_URL") {
            Ok(m) if !m.is_empty() => {
                format!("{}/{RESNET18_IMAGENET1K_V1}", m.trim_end_matches('/'))
            }
            _ => format!("{WEIGHTS_URL}{RESNET18_IMAGENET1K_V1}"),
        };
        let data = data_here || reachable(&mirrored(&url));
        let weights = weights_here || reachable(&weights_url);
        let (mut p, why) = match (data, weights) {
            (true, true) => (
                Profile::book(),
                "hotdog.zip and the ImageNet weights can be had",
            ),
            (false, false) => (
                Profile::offline(),
                "neither hotdog.zip nor the ImageNet weights can be fetched from here",
            ),
            (false, true) => (Profile::offline(), "hotdog.zip cannot be fetched from here"),
            (true, false) => (
                Profile::offline(),
                "the ImageNet weights cannot be fetched from here",
            ),
        };
        p.why = if p.name == ProfileName::Book {
            why.to_owned()
        } else {
            format!("{why} (no network; set D2L_DATA_URL / D2L_WEIGHTS_URL to a mirror, or D2L_PROFILE=book)")
        };
        tch::manual_seed(p.seed as i64);
        Ok(p)
    }

    /// The device the model lives on (the first of `devices`).
    pub fn device(&self) -> Device {
        self.devices[0]
    }

    /// Where generated data and source models are kept.
    fn cache(&self) -> PathBuf {
        d2l_home().join("chapter")
    }

    /// The hotdog data folder (with `train/` and `test/`): downloaded and extracted in the book
    /// profile (`download_extract("hotdog")`), generated once otherwise.
    pub fn hotdog_dir(&self) -> Result<PathBuf> {
        match &self.hotdog {
            None => download_extract("hotdog"),
            Some(cfg) => make_hotdog_dataset(
                self.cache().join(format!("data-{}", self.name.as_str())),
                cfg,
            ),
        }
    }

    /// The source model's weights file and what it is: torchvision's ImageNet weights (book),
    /// or the ResNet-18 trained here on the generated food set (trained once, then cached).
    pub fn source_model(&self) -> Result<Source> {
        match &self.source {
            None => Ok(Source {
                weights: weights_file(RESNET18_IMAGENET1K_V1)?,
                num_classes: 1000,
                describe: "source model: torchvision ResNet-18, ImageNet weights (IMAGENET1K_V1)"
                    .into(),
                hotdog_class: (934, "hotdog, hot dog, red hot".into()),
                trained_here: None,
            }),
            Some(cfg) => {
                let model = pretrain_source_model(self.cache(), cfg, self.device())?;
                let index = model
                    .classes
                    .iter()
                    .position(|c| c == "hotdog")
                    .unwrap_or(0);
                Ok(Source {
                    weights: model.weights.clone(),
                    num_classes: model.classes.len() as i64,
                    describe: model.describe(),
                    hotdog_class: (index as i64, model.classes[index].clone()),
                    trained_here: Some(model),
                })
            }
        }
    }

    /// The chapter's training augmentation: `RandomResizedCrop(crop)`, `RandomHorizontalFlip()`,
    /// `ToTensor()`, ImageNet normalisation.
    pub fn train_augs(&self) -> Compose {
        Compose::new()
            .then(RandomResizedCrop::new(self.crop))
            .then(RandomHorizontalFlip::default())
            .then(ToTensor)
            .then(Normalize::imagenet())
    }

    /// The chapter's test transform: `Resize([resize, resize])`, `CenterCrop(crop)`,
    /// `ToTensor()`, ImageNet normalisation.
    pub fn test_augs(&self) -> Compose {
        Compose::new()
            .then(Resize::new(self.resize, self.resize))
            .then(CenterCrop::new(self.crop))
            .then(ToTensor)
            .then(Normalize::imagenet())
    }

    /// The chapter's two loaders: training (shuffled) and test.
    pub fn loaders(&self, data_dir: &Path) -> Result<(DataLoader, DataLoader)> {
        let pin = self.device().is_cuda();
        let train = DataLoader::new(
            ImageFolder::new(data_dir.join("train"))?,
            self.train_augs(),
            self.batch_size,
        )?
        .shuffle(true)
        .seed(self.seed)
        .num_workers(self.num_workers)
        .pin_memory(pin);
        let test = DataLoader::new(
            ImageFolder::new(data_dir.join("test"))?,
            self.test_augs(),
            self.batch_size,
        )?
        .num_workers(self.num_workers)
        .pin_memory(pin);
        Ok((train, test))
    }

    /// Rough time of one training run here, for the warning on a CPU with book settings.
    fn cpu_warning(&self) -> Option<String> {
        (self.name == ProfileName::Book && !self.device().is_cuda()).then(|| {
            "WARNING: the book's settings on the CPU: ResNet-18 at 224 px trains at roughly 13 images/s on 2 cores, \
             so each 5-epoch run takes about 2 h 40 min here (D2L_PROFILE=offline runs in minutes)"
                .to_owned()
        })
    }
}

/// What a profile's source model is.
#[derive(Clone, Debug)]
pub struct Source {
    pub weights: PathBuf,
    pub num_classes: i64,
    pub describe: String,
    /// The source's hot-dog class (ImageNet's 934; offline: the generated set's "hotdog").
    pub hotdog_class: (i64, String),
    pub trained_here: Option<SourceModel>,
}

impl Source {
    /// The pre-trained model, all its layers (`pretrained_net` in the chapter).
    pub fn pretrained_net(&self, vs: &VarStore) -> Result<ResNet> {
        resnet18_from(vs, &self.weights, self.num_classes)
    }

    /// The source weights as a state dict (for the exercise that starts the head from a class).
    pub fn state_dict(&self) -> Result<Vec<(String, Tensor)>> {
        read_weights(&self.weights)
    }
}

/// The banner: which profile, on what data, from which source model.
impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rule = "=".repeat(78);
        writeln!(f, "{rule}")?;
        match self.name {
            ProfileName::Book => {
                writeln!(f, "PROFILE: BOOK ({})", self.why)?;
                writeln!(
                    f,
                    "  data: hotdog.zip from d2l (1000 + 400 photos per class)"
                )?;
                writeln!(f, "  source model: torchvision ResNet-18, ImageNet weights")?;
            }
            ProfileName::Offline | ProfileName::Ci => {
                let h = self
                    .hotdog
                    .as_ref()
                    .expect("offline profiles generate data");
                writeln!(
                    f,
                    "PROFILE: {} ({})",
                    self.name.as_str().to_uppercase(),
                    self.why
                )?;
                writeln!(
                    f,
                    "  data: GENERATED hotdog-like images ({} + {} per class, {}-{} px), not the book's photos",
                    h.train_per_class, h.test_per_class, h.min_side, h.max_side
                )?;
                let s = self
                    .source
                    .as_ref()
                    .expect("offline profiles train a source model");
                writeln!(
                    f,
                    "  source model: ResNet-18 pre-trained HERE on a generated {}-class food set (one class hot dogs, as in ImageNet; {} px), NOT on ImageNet",
                    crate::data::synthetic::SOURCE_CLASSES.len(),
                    s.image_size
                )?;
                writeln!(f, "  numbers below are not comparable with the book's")?;
            }
        }
        writeln!(
            f,
            "  settings: {} px crops (test: resize to {} then crop), batch {}, {} epochs ({} for each exercise), on {}",
            self.crop, self.resize, self.batch_size, self.num_epochs, self.exercise_epochs, self.devices
        )?;
        if let Some(w) = self.cpu_warning() {
            writeln!(f, "  {w}")?;
        }
        write!(f, "{rule}")
    }
}

/// Whether `url` answers a HEAD request within a few seconds.
fn reachable(url: &str) -> bool {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(4)))
        .http_status_as_error(false)
        .build()
        .into();
    matches!(agent.head(url).call(), Ok(r) if r.status().is_success() || r.status().is_redirection())
}

/// The chapter's `train_fine_tuning(net, learning_rate, batch_size, num_epochs, param_group)`:
/// the profile's loaders, summed cross-entropy, SGD with weight decay 0.001 (the new output layer
/// at 10x the rate with `param_group`), `train_ch13` on the profile's devices. The curves are
/// shown in a notebook, saved as `<name>.png`/`.svg` elsewhere.
pub fn train_fine_tuning(
    net: &ResNet,
    vs: &VarStore,
    profile: &Profile,
    learning_rate: f64,
    param_group: bool,
    num_epochs: usize,
) -> Result<History> {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    let run = RUNS.fetch_add(1, Ordering::SeqCst) + 1;
    let data_dir = profile.hotdog_dir()?;
    let (train_iter, test_iter) = profile.loaders(&data_dir)?;
    let mut trainer = sgd(vs, learning_rate, 0.001, param_group)?;
    let opts = TrainOptions {
        step: profile.step.clone(),
        figure: Some(format!("fine-tuning-run{run}-lr{learning_rate:e}")),
        config: BTreeMap::from([
            ("profile".to_owned(), profile.name.as_str().to_owned()),
            ("learning_rate".to_owned(), format!("{learning_rate:e}")),
            ("param_group".to_owned(), param_group.to_string()),
        ]),
        ..TrainOptions::default()
    };
    train_ch13_with(
        net,
        &train_iter,
        &test_iter,
        cross_entropy,
        &mut trainer,
        num_epochs,
        &profile.devices,
        &opts,
    )
}

/// The first `n / 2` hotdog and the last `n / 2` not-hotdog test images, each titled with the
/// model's prediction and the true label (`pred / true`), in a grid of `n / 8` rows.
pub fn prediction_grid(net: &ResNet, profile: &Profile, n: usize) -> Result<Png> {
    let data_dir = profile.hotdog_dir()?;
    let test = ImageFolder::new(data_dir.join("test"))?;
    let half = (n / 2).min(test.len() / 2);
    let mut items = Vec::with_capacity(2 * half);
    for i in 0..half {
        items.push(test.get(i)?);
    }
    for i in 0..half {
        items.push(test.get_rev(i)?);
    }
    let t = profile.test_augs();
    let xs = items
        .iter()
        .map(|(img, _)| t.tensor(img))
        .collect::<Result<Vec<_>>>()?;
    let x = Tensor::f_stack(&xs, 0)?.f_to_device(profile.device())?;
    let pred = tch::no_grad(|| net.forward_t(&x, false).f_argmax(-1, false))?;
    let pred = Vec::<i64>::try_from(pred.f_to_device(Device::Cpu)?.f_to_kind(Kind::Int64)?)?;
    let classes = test.classes();
    let titles: Vec<String> = items
        .iter()
        .zip(&pred)
        .map(|((_, y), p)| {
            let mark = if *p == *y { "" } else { " (wrong)" };
            format!(
                "{}{mark}\ntrue: {}",
                classes[*p as usize], classes[*y as usize]
            )
        })
        .collect();
    let imgs: Vec<_> = items.into_iter().map(|(img, _)| img).collect();
    show_images(&imgs, imgs.len().div_ceil(8).max(1), 8, Some(&titles), 1.6)
}
