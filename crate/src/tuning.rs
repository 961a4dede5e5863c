//! Choices made by timing on the machine that runs, kept on disk so that the next process on the
//! same machine does not time them again.
//!
//! Two things are chosen by measurement: the path of each CPU convolution shape
//! ([`crate::model::conv_choices`]: libtorch's or im2col and a matrix product) and the memory
//! layout of a CPU training run ([`crate::train::set_layout_autotune`]: NCHW or channels-last).
//! Timing them costs a process its first steps: at 64 px, the convolutions' timing was about 7%
//! of a 2-epoch run on 600 images. PyTorch's `cudnn.benchmark` times again in every process;
//! TorchInductor keeps its autotuning results in a cache on disk, and so does this: one JSON
//! file a machine and setting, named by a hash of everything the times depend on (the CPU's model
//! name and flags as Linux reports them, the kernel variables libtorch reads,
//! `ATEN_CPU_CAPABILITY`, `ONEDNN_MAX_CPU_ISA`, `DNNL_MAX_CPU_ISA` and MKL's
//! `MKL_ENABLE_INSTRUCTIONS` and `MKL_CBWR`, libtorch's version and thread count, and this
//! crate's version and kernel [`GENERATION`]), so that another CPU, kernel set or thread count
//! times afresh. The file lives in `D2L_TUNING_DIR`, else `tuning/` under [`d2l_home`]; it is
//! read once a process, on first use, and each new measurement is merged into it and written
//! atomically (a reader sees the old file or the new one).
//!
//! A file that cannot be read is reported once on stderr and timed anew (the next measurement
//! replaces it); a cache folder that cannot be written is reported once and the process goes on
//! with what it measured. `D2L_TUNING_CACHE=0` or [`set_tuning_cache`]`(false)` turns the cache
//! off: every process times, as `cudnn.benchmark` does. To time again on a machine, delete the
//! folder ([`tuning_file`] names the file).
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::files::{d2l_home, env_nonempty, write_atomically};
use crate::model::ConvChoice;
use crate::switch::EnvSwitch;
use crate::train::LayoutTrial;

static CACHE: EnvSwitch = EnvSwitch::new("D2L_TUNING_CACHE");

/// Whether measured choices are kept on disk and read back by later processes (the default;
/// `D2L_TUNING_CACHE=0` in the environment makes it `false` at start). Process-wide.
pub fn set_tuning_cache(enabled: bool) {
    CACHE.set(enabled);
}

/// See [`set_tuning_cache`].
pub fn tuning_cache() -> bool {
    CACHE.get()
}

/// The kernel variables libtorch reads when it picks its CPU kernels.
const KERNEL_VARS: [&str; 5] = [
    "ATEN_CPU_CAPABILITY",
    "ONEDNN_MAX_CPU_ISA",
    "DNNL_MAX_CPU_ISA",
    // MKL's matrix products (the im2col path's and the weight gradient's) pick their
    // instruction set from these: the first on Intel CPUs only, the second (`COMPATIBLE`: SSE2)
    // on any.
    "MKL_ENABLE_INSTRUCTIONS",
    "MKL_CBWR",
];

/// Everything the measured times depend on besides the shapes: the cache file's key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Machine {
    /// The CPU's model name (`/proc/cpuinfo`).
    pub cpu: String,
    /// SHA-256 of its flags, sorted (they decide which kernels libtorch may use).
    pub cpu_flags: String,
    /// The kernel variables that are set, with their values.
    pub kernels: BTreeMap<String, String>,
    pub libtorch: String,
    pub threads: i64,
    pub d2l: String,
    /// [`GENERATION`]: timings made before this crate's own kernels changed are not reused.
    pub generation: u32,
}

/// Raised when this crate's own kernels change what the timed choices compare, so that older
/// cache files are not read (2: the CPU max pooling kernel, which changed NCHW's step against
/// channels-last's, and the one-pass SGD step; 3: the fused BatchNorm kernel, NCHW's again; 4:
/// the BatchNorm kernel for channels-last batches; 5: the matrix-product weight gradient for
/// channels-last convolutions, a new candidate in the convolution choices; 6: Winograd's 3x3
/// convolution, another).
pub const GENERATION: u32 = 6;

impl Machine {
    /// This process's machine and setting, now (the thread count may change).
    pub fn current() -> Machine {
        static CPU: OnceLock<(String, String)> = OnceLock::new();
        let (cpu, flags) = CPU.get_or_init(|| {
            let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
            let field = |name: &str| {
                info.lines()
                    .find(|l| l.split(':').next().is_some_and(|k| k.trim() == name))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_owned())
                    .unwrap_or_default()
            };
            let mut flags: Vec<_> = field("flags")
                .split_whitespace()
                .map(str::to_owned)
                .collect();
            flags.sort();
            let name = match field("model name") {
                n if n.is_empty() => std::env::consts::ARCH.to_owned(),
                n => n,
            };
            (name, hex(&Sha256::digest(flags.join(" ").as_bytes())))
        });
        Machine {
            cpu: cpu.clone(),
            cpu_flags: flags.clone(),
            kernels: KERNEL_VARS
                .iter()
                .filter_map(|&v| env_nonempty(v).map(|value| (v.to_owned(), value)))
                .collect(),
            libtorch: option_env!("D2L_LIBTORCH_VERSION")
                .unwrap_or("unknown")
                .to_owned(),
            threads: tch::get_num_threads().into(),
            d2l: env!("CARGO_PKG_VERSION").to_owned(),
            generation: GENERATION,
        }
    }

    /// Its cache file: `tuning-<first 16 hex digits of the key's hash>.json` in [`tuning_dir`].
    fn path(&self) -> PathBuf {
        let key = serde_json::to_string(self).unwrap_or_default();
        let hash = hex(&Sha256::digest(key.as_bytes()));
        tuning_dir().join(format!("tuning-{}.json", &hash[..16]))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The folder of the cache files: `D2L_TUNING_DIR`, else `tuning/` under [`d2l_home`].
pub fn tuning_dir() -> PathBuf {
    env_nonempty("D2L_TUNING_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| d2l_home().join("tuning"))
}

/// The cache file for this machine and setting now.
pub fn tuning_file() -> PathBuf {
    Machine::current().path()
}

/// A layout choice: for which model and input it holds, and what the trial measured.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct LayoutEntry {
    /// SHA-256 of the model's tensors' names, shapes, kinds and `requires_grad` flags.
    pub model: String,
    /// A training batch's shape, `[n, c, h, w]`.
    pub input: Vec<i64>,
    pub trial: LayoutTrial,
}

/// The cache file's contents.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct Tuning {
    pub machine: Option<Machine>,
    #[serde(default)]
    pub conv: Vec<ConvChoice>,
    #[serde(default)]
    pub layout: Vec<LayoutEntry>,
}

/// At most this many entries of each kind are kept (the newest).
const MAX_ENTRIES: usize = 256;

/// Says `msg` on stderr the first time only.
fn warn_once(msg: String) {
    static SAID: AtomicBool = AtomicBool::new(false);
    if !SAID.swap(true, Ordering::Relaxed) {
        eprintln!("d2l: {msg}");
    }
}

/// The cache file for `machine` as it is on disk: empty when there is none; an error when it
/// cannot be read or parsed.
fn read(machine: &Machine) -> Result<Tuning> {
    let path = machine.path();
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Tuning::default()),
        Err(e) => return Err(Error::io(&path, e)),
    };
    let tuning: Tuning = serde_json::from_str(&text).map_err(|source| Error::Json {
        what: format!("{}: not a tuning cache file", path.display()),
        source,
    })?;
    // Another key with the same hash prefix (a copied file): not this machine's choices.
    if tuning.machine.as_ref() != Some(machine) {
        return Ok(Tuning::default());
    }
    Ok(tuning)
}

/// What the cache holds for this machine and setting now: nothing when the cache is off, or the
/// file is missing or unreadable (said once on stderr).
pub(crate) fn load() -> Tuning {
    if !tuning_cache() {
        return Tuning::default();
    }
    read(&Machine::current()).unwrap_or_else(|e| {
        warn_once(format!(
            "{e}; timing again, and the next measurement replaces it (D2L_TUNING_CACHE=0 turns the cache off)"
        ));
        Tuning::default()
    })
}

/// Adds what `change` adds to the cache file as it is on disk now, so that another process's
/// entries are kept, and writes it atomically. Two processes writing at the same moment can
/// lose one's new entry (no lock: a cache entry lost is only timed again, and no process
/// waits). A failure is said once on stderr and otherwise ignored: the process keeps what it
/// measured.
pub(crate) fn update(change: impl FnOnce(&mut Tuning)) {
    if !tuning_cache() {
        return;
    }
    let machine = Machine::current();
    let path = machine.path();
    let result = (|| -> Result<()> {
        let dir = tuning_dir();
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let mut tuning = read(&machine).unwrap_or_default();
        tuning.machine = Some(machine);
        change(&mut tuning);
        let excess = tuning.conv.len().saturating_sub(MAX_ENTRIES);
        tuning.conv.drain(..excess);
        let excess = tuning.layout.len().saturating_sub(MAX_ENTRIES);
        tuning.layout.drain(..excess);
        let json = serde_json::to_vec_pretty(&tuning).map_err(|source| Error::Json {
            what: path.display().to_string(),
            source,
        })?;
        write_atomically(&path, &json)
    })();
    if let Err(e) = result {
        warn_once(format!(
            "could not keep a measured choice in the tuning cache: {e} (D2L_TUNING_DIR moves it, D2L_TUNING_CACHE=0 turns it off)"
        ));
    }
}

/// A hash of a model's tensors: names, shapes, kinds and `requires_grad` flags (what a training
/// step's cost depends on besides the input).
pub(crate) fn model_signature(tensors: &[(String, tch::Tensor)]) -> String {
    let mut h = Sha256::new();
    for (name, t) in tensors {
        h.update(
            format!(
                "{name} {:?} {:?} {}\n",
                t.size(),
                t.kind(),
                t.requires_grad()
            )
            .as_bytes(),
        );
    }
    hex(&h.finalize())
}
