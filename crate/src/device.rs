//! Devices as d2l sees them: `try_gpu`, `try_all_gpus`, and PyTorch's way of printing them.
use std::ffi::CString;
use std::fmt;
use std::ops::Deref;
use std::sync::OnceLock;

use tch::{Cuda, Device};

/// Loads libtorch's CUDA backend once, if it is installed and can load.
///
/// Binaries built by this workspace link `libtorch_cuda.so` already (see `build.rs`), but a
/// notebook cell is a library that evcxr `dlopen`s, and rustc's `--as-needed` drops the CUDA
/// backend from it: without this, CUDA looks absent even on a GPU machine. With the small CPU
/// install the library's own dependencies are missing and loading fails: then there is no GPU.
fn load_cuda_backend() {
    static LOADED: OnceLock<()> = OnceLock::new();
    LOADED.get_or_init(|| {
        let dir = option_env!("D2L_LIBTORCH_LIB").map(|d| format!("{d}/"));
        let names = [
            dir.map(|d| d + "libtorch_cuda.so"),
            Some("libtorch_cuda.so".into()),
        ];
        for name in names.into_iter().flatten() {
            let Ok(name) = CString::new(name) else {
                continue;
            };
            // SAFETY: dlopen of a NUL-terminated path; the handle is kept open for the process.
            let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
            if !handle.is_null() {
                break;
            }
        }
    });
}

/// The number of CUDA devices libtorch can use (0 without a GPU or with the CPU install).
pub fn num_gpus() -> usize {
    load_cuda_backend();
    usize::try_from(Cuda::device_count()).unwrap_or(0)
}

/// GPU `i` if it exists, else the CPU (d2l's `try_gpu`).
pub fn try_gpu(i: usize) -> Device {
    if num_gpus() > i {
        Device::Cuda(i)
    } else {
        Device::Cpu
    }
}

/// All GPUs, or `[cpu]` when there are none (d2l 0.17's `try_all_gpus`; 1.0 returns `[]`,
/// with which `train_ch13` cannot run). In distributed training (a default process group), this
/// process's own GPU, `cuda:LOCAL_RANK`, as each of torchrun's processes drives one GPU.
pub fn try_all_gpus() -> Devices {
    match num_gpus() {
        0 => Devices(vec![Device::Cpu]),
        n => match crate::dist::default_group() {
            Some(g) => Devices(vec![Device::Cuda(g.local_rank() % n)]),
            None => Devices((0..n).map(Device::Cuda).collect()),
        },
    }
}

/// PyTorch's repr of a device: `device(type='cuda', index=0)`, `device(type='cpu')`.
pub fn device_repr(device: Device) -> String {
    match device {
        Device::Cpu => "device(type='cpu')".to_owned(),
        Device::Cuda(i) => format!("device(type='cuda', index={i})"),
        Device::Mps => "device(type='mps')".to_owned(),
        Device::Vulkan => "device(type='vulkan')".to_owned(),
    }
}

/// A list of devices that prints like Python's list of `torch.device`s.
///
/// It derefs to `[Device]`, so `devices[0]` is a plain `tch::Device`.
#[derive(Clone, PartialEq, Eq)]
pub struct Devices(pub Vec<Device>);

impl Deref for Devices {
    type Target = [Device];
    fn deref(&self) -> &[Device] {
        &self.0
    }
}

impl fmt::Display for Devices {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let items: Vec<String> = self.0.iter().map(|&d| device_repr(d)).collect();
        write!(f, "[{}]", items.join(", "))
    }
}

// A notebook shows a cell's value with Debug: make it read as the book does.
impl fmt::Debug for Devices {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// What this build runs on: versions of the pieces and the devices found.
#[derive(Clone, Debug)]
pub struct Versions {
    pub d2l: &'static str,
    pub tch: &'static str,
    /// libtorch's version as its Python package spells it (`2.11.0+cu130`).
    pub libtorch: &'static str,
    pub cuda_available: bool,
    pub cudnn_available: bool,
    pub num_threads: i32,
    pub devices: Devices,
}

/// Reports the versions of d2l, tch and libtorch and the devices available.
pub fn versions() -> Versions {
    let devices = try_all_gpus();
    Versions {
        d2l: env!("CARGO_PKG_VERSION"),
        tch: TCH_VERSION,
        libtorch: option_env!("D2L_LIBTORCH_VERSION").unwrap_or("unknown"),
        cuda_available: Cuda::is_available(),
        cudnn_available: Cuda::cudnn_is_available(),
        num_threads: tch::get_num_threads(),
        devices,
    }
}

/// The tch version this crate is pinned to (`tch = "=0.24.0"` in the workspace).
const TCH_VERSION: &str = "0.24.0";

impl fmt::Display for Versions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "d2l {}, tch {}, libtorch {}",
            self.d2l, self.tch, self.libtorch
        )?;
        writeln!(
            f,
            "CUDA available: {}, cuDNN available: {}, CPU threads: {}",
            self.cuda_available, self.cudnn_available, self.num_threads
        )?;
        write!(f, "devices: {}", self.devices)
    }
}
