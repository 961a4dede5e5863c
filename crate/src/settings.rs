//! What the chapter runs with, chosen once at the top of the notebook: the book's values, or the
//! offline stand-in where the book's data and weights cannot be fetched.
//!
//! **book** ([`Settings::default`]): `hotdog.zip` and torchvision's ImageNet ResNet-18, 224 px,
//! batch 128, 5 epochs, learning rates 5e-5 (fine-tuning) and 5e-4 (from scratch).
//! **offline**: the same code on a generated hotdog-like set and a ResNet-18 pre-trained here
//! ([`crate::offline`]), at sizes a CPU finishes in minutes. **ci**: the offline path at toy sizes.
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::data::synthetic::{HotdogConfig, SourceConfig};
use crate::data::{data_dir, mirrored, DATA_HUB};
use crate::device::try_all_gpus;
use crate::error::{Error, Result};
use crate::model::{torch_home, weights_url, SourceModelConfig, RESNET18_IMAGENET1K_V1};
use crate::offline::StandIn;

/// The chapter's settings; `Default` is the book's. Saved with every `train_ch13` run
/// ([`History::settings`](crate::train::History)) and every checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    /// `book`, `offline` or `ci`.
    pub profile: String,
    /// Why these settings run.
    pub why: String,
    /// `RandomResizedCrop(crop)` for training, `CenterCrop(crop)` for testing (the book: 224).
    pub crop: u32,
    /// Test images are first resized to `resize x resize` (the book: 256).
    pub resize: u32,
    pub batch_size: usize,
    pub num_epochs: usize,
    /// The fine-tuning learning rate (the book: 5e-5; the new output layer learns at 10x).
    pub lr: f64,
    /// The learning rate of the model trained from scratch (the book: 5e-4).
    pub scratch_lr: f64,
    /// Epochs of each exercise run.
    pub exercise_epochs: usize,
    /// Loader threads (the book's `DataLoader` decodes in the training process; these decode
    /// beside the training step).
    pub num_workers: usize,
    /// Seeds libtorch's generator and the loaders' shuffles, so that runs repeat.
    pub seed: u64,
    /// What stands in for the book's data and weights; `None`: the book's own.
    pub stand_in: Option<StandIn>,
}

impl Default for Settings {
    fn default() -> Settings {
        let gpu = try_all_gpus().iter().any(|d| d.is_cuda());
        Settings {
            profile: "book".into(),
            why: "the book's settings".into(),
            crop: 224,
            resize: 256,
            batch_size: 128,
            num_epochs: 5,
            lr: 5e-5,
            scratch_lr: 5e-4,
            exercise_epochs: 5,
            num_workers: if gpu { cores().min(8) } else { 1 },
            seed: 0,
            stand_in: None,
        }
    }
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Where the settings in force live: the process environment, as JSON. Not a static: evcxr
/// links each notebook cell with a copy of its own of this crate, statics included, so a value a
/// static got in one cell is gone in the next; the environment is one for the whole process.
const SETTINGS_VAR: &str = "D2L_SETTINGS";

impl Settings {
    /// The offline stand-in, sized for a 2-core CPU: the whole notebook in minutes.
    pub fn offline() -> Settings {
        Settings {
            profile: "offline".into(),
            crop: 64,
            resize: 72,
            batch_size: 32,
            exercise_epochs: 3,
            num_workers: 1,
            stand_in: Some(StandIn {
                hotdog: HotdogConfig {
                    train_per_class: 500,
                    test_per_class: 200,
                    min_side: 64,
                    max_side: 192,
                    seed: 0,
                },
                source: SourceModelConfig::default(),
            }),
            ..Settings::default()
        }
    }

    /// The offline path at toy sizes (tests and CI): seconds, not minutes.
    pub fn ci() -> Settings {
        Settings {
            profile: "ci".into(),
            crop: 32,
            resize: 36,
            batch_size: 16,
            num_epochs: 2,
            exercise_epochs: 1,
            num_workers: 1,
            stand_in: Some(StandIn {
                hotdog: HotdogConfig {
                    train_per_class: 24,
                    test_per_class: 8,
                    min_side: 32,
                    max_side: 80,
                    seed: 0,
                },
                source: SourceModelConfig {
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
                },
            }),
            ..Settings::default()
        }
    }

    /// `book`, `offline` or `ci`, put in force ([`Settings::install`]).
    pub fn named(name: &str) -> Result<Settings> {
        let s = Settings::by_name(name, format!("asked for ({name:?})"))?;
        s.install();
        Ok(s)
    }

    fn by_name(name: &str, why: String) -> Result<Settings> {
        let s = match name.trim().to_ascii_lowercase().as_str() {
            "book" => Settings::default(),
            "offline" => Settings::offline(),
            "ci" => Settings::ci(),
            other => {
                return Err(Error::UnknownProfile {
                    name: other.to_owned(),
                })
            }
        };
        Ok(Settings { why, ..s })
    }

    /// `D2L_PROFILE` if set; else the book's settings when `hotdog.zip` and the ImageNet weights
    /// are on disk or can be fetched (one request each, only for what is not on disk), the
    /// offline stand-in when they cannot. Put in force ([`Settings::install`]). Call it once, at
    /// the top: later cells ask the settings, not the network.
    pub fn auto() -> Result<Settings> {
        if let Some(name) = crate::files::env_nonempty("D2L_PROFILE") {
            let s = Settings::by_name(&name, format!("D2L_PROFILE={name}"))?;
            s.install();
            return Ok(s);
        }
        let (data, weights) = book_files_reachable();
        let why = match (data, weights) {
            (true, true) => None,
            (false, false) => {
                Some("neither hotdog.zip nor the ImageNet weights can be fetched from here")
            }
            (false, true) => Some("hotdog.zip cannot be fetched from here"),
            (true, false) => Some("the ImageNet weights cannot be fetched from here"),
        };
        let s = match why {
            None => Settings {
                why: "hotdog.zip and the ImageNet weights can be had".into(),
                ..Settings::default()
            },
            Some(why) => Settings {
                why: format!(
                    "{why} (no network; set D2L_DATA_URL / D2L_WEIGHTS_URL to a mirror, or D2L_PROFILE=book)"
                ),
                ..Settings::offline()
            },
        };
        s.install();
        Ok(s)
    }

    /// Puts these settings in force for this process (and the programs it starts):
    /// libtorch's generator is seeded with `seed`, the stand-in (if any) answers
    /// `download_extract("hotdog")` and `resnet18_pretrained`, and runs and checkpoints record
    /// these settings. Call it at the top, before training starts threads.
    pub fn install(&self) {
        tch::manual_seed(self.seed as i64);
        if let Ok(json) = serde_json::to_string(self) {
            std::env::set_var(SETTINGS_VAR, json);
        }
    }

    /// The settings in force, if any were installed.
    pub fn current() -> Option<Settings> {
        serde_json::from_str(&std::env::var(SETTINGS_VAR).ok()?).ok()
    }

    /// The source model's class whose output starts the new hot-dog output in the chapter's
    /// third exercise: ImageNet's 934, or the stand-in's own hot-dog class.
    pub fn hotdog_class(&self) -> (i64, String) {
        match &self.stand_in {
            None => (934, "hotdog, hot dog, red hot".into()),
            Some(_) => crate::offline::source_hotdog_class(),
        }
    }

    fn cpu_warning(&self) -> Option<&'static str> {
        (self.stand_in.is_none() && !try_all_gpus().iter().any(|d| d.is_cuda())).then_some(
            "WARNING: the book's settings on the CPU: ResNet-18 at 224 px trains at roughly 13 images/s on 2 cores, \
             so each 5-epoch run takes about 2 h 40 min here (D2L_PROFILE=offline runs in minutes)",
        )
    }
}

pub use crate::files::d2l_home;

/// Whether `hotdog.zip` and the ImageNet weights are on disk, or else answer a request.
fn book_files_reachable() -> (bool, bool) {
    let data = data_dir().join("hotdog.zip").is_file()
        || DATA_HUB
            .get("hotdog")
            .is_some_and(|(url, _)| reachable(&mirrored(&url)));
    let weights = torch_home()
        .join("hub/checkpoints")
        .join(RESNET18_IMAGENET1K_V1)
        .is_file()
        || reachable(&weights_url(RESNET18_IMAGENET1K_V1));
    (data, weights)
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

/// The banner: which settings, on what data, from which source model.
impl fmt::Display for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rule = "=".repeat(78);
        writeln!(f, "{rule}")?;
        writeln!(f, "PROFILE: {} ({})", self.profile.to_uppercase(), self.why)?;
        match &self.stand_in {
            None => {
                writeln!(
                    f,
                    "  data: hotdog.zip from d2l (1000 + 400 photos per class)"
                )?;
                writeln!(f, "  source model: torchvision ResNet-18, ImageNet weights")?;
            }
            Some(s) => {
                let h = &s.hotdog;
                writeln!(
                    f,
                    "  data: GENERATED hotdog-like images ({} + {} per class, {}-{} px), not the book's photos",
                    h.train_per_class, h.test_per_class, h.min_side, h.max_side
                )?;
                writeln!(
                    f,
                    "  source model: ResNet-18 pre-trained HERE on a generated {}-class food set (one class hot dogs, as in ImageNet; {} px), NOT on ImageNet",
                    crate::data::synthetic::SOURCE_CLASSES.len(),
                    s.source.image_size
                )?;
                writeln!(f, "  numbers below are not comparable with the book's")?;
            }
        }
        writeln!(
            f,
            "  settings: {} px crops (test: resize to {} then crop), batch {}, {} epochs ({} for each exercise), lr {:e} (scratch {:e}), on {}",
            self.crop,
            self.resize,
            self.batch_size,
            self.num_epochs,
            self.exercise_epochs,
            self.lr,
            self.scratch_lr,
            try_all_gpus()
        )?;
        if let Some(w) = self.cpu_warning() {
            writeln!(f, "  {w}")?;
        }
        write!(f, "{rule}")
    }
}
