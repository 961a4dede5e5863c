//! Data parallel training like `nn.DataParallel`, and the CUDA speed options (bf16 autocast,
//! channels-last).
use std::sync::OnceLock;

use tch::nn::{ModuleT, VarStore};
use tch::{Device, Kind, Tensor};

use super::{accuracy, Loss, Trainer};
use crate::error::{Error, Result};

/// A model that can be copied onto another device, so that [`DataParallel`] (and `train_ch13`
/// with several devices) can run one replica a device.
pub trait Replicate: ModuleT + Send {
    /// Every tensor (parameters and buffers) with its name, in a fixed order; shallow copies
    /// that share storage with the model.
    fn named_tensors(&self) -> Vec<(String, Tensor)>;

    /// A copy of the model on `device`, in a var store of its own, with the same values, kinds,
    /// memory formats and `requires_grad` flags.
    fn replicate(&self, device: Device) -> Result<(VarStore, Self)>
    where
        Self: Sized;
}

/// How a training step runs: the precision and memory-layout options (off by default, so that
/// results stay comparable with the book's).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StepOptions {
    /// Mixed precision on CUDA: matrix products and convolutions in bfloat16 (autocast), the
    /// rest in float32. No effect on the CPU.
    pub bf16: bool,
    /// Channels-last (NHWC) strides for the inputs and the convolution weights.
    pub channels_last: bool,
    /// Copies batches to the device without waiting (effective from pinned memory, see
    /// `DataLoader::pin_memory`).
    pub non_blocking: bool,
}

impl Default for StepOptions {
    fn default() -> Self {
        StepOptions {
            bf16: false,
            channels_last: false,
            non_blocking: true,
        }
    }
}

/// `t` with channels-last (NHWC) strides if it is 4-D; other tensors as they are.
pub fn to_channels_last(t: &Tensor) -> Result<Tensor> {
    if t.dim() != 4 {
        return Ok(t.shallow_clone());
    }
    Ok(t.f_permute([0, 2, 3, 1])?
        .f_contiguous()?
        .f_permute([0, 3, 1, 2])?)
}

/// Gives every 4-D tensor of `net` (the convolution weights) channels-last strides, in place.
pub fn convert_channels_last(net: &impl Replicate) -> Result<()> {
    for (_, mut t) in net.named_tensors() {
        if t.dim() == 4 {
            let nhwc = to_channels_last(&t.detach())?;
            t.f_set_data(&nhwc)?;
        }
    }
    Ok(())
}

type SetDtype = unsafe extern "C" fn(device_type: i8, dtype: i8);
type GetDtype = unsafe extern "C" fn(device_type: i8) -> i8;

/// c10's `DeviceType::CUDA` and `ScalarType::BFloat16`.
const CUDA_DEVICE_TYPE: i8 = 1;
const BFLOAT16: i8 = 15;

/// libtorch's `at::autocast::{get,set}_autocast_dtype(DeviceType, ScalarType)`, which tch does
/// not wrap; looked up in the loaded libtorch (both arguments are one-byte enums).
fn autocast_dtype_fns() -> Result<(GetDtype, SetDtype)> {
    static FNS: OnceLock<std::result::Result<(usize, usize), String>> = OnceLock::new();
    let fns = FNS.get_or_init(|| {
        let find = |name: &str| {
            let c = std::ffi::CString::new(name).expect("no NUL in a symbol name");
            // SAFETY: dlsym with RTLD_DEFAULT only looks a name up in the loaded libraries.
            let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c.as_ptr()) };
            if p.is_null() {
                Err(format!("libtorch has no {name}"))
            } else {
                Ok(p as usize)
            }
        };
        Ok((
            find("_ZN2at8autocast18get_autocast_dtypeEN3c1010DeviceTypeE")?,
            find("_ZN2at8autocast18set_autocast_dtypeEN3c1010DeviceTypeENS1_10ScalarTypeE")?,
        ))
    });
    match fns {
        // SAFETY: the symbols are the functions named above, whose C++ signatures take and
        // return one-byte enums, passed like i8 in the C calling convention.
        Ok((get, set)) => Ok(unsafe {
            (
                std::mem::transmute::<usize, GetDtype>(*get),
                std::mem::transmute::<usize, SetDtype>(*set),
            )
        }),
        Err(e) => Err(Error::Unsupported {
            what: format!("bf16 autocast: {e} (a libtorch other than 2.11?)"),
        }),
    }
}

/// CUDA autocast's lower precision: `Kind::Half` (libtorch's default) or `Kind::BFloat16`.
pub fn cuda_autocast_kind() -> Result<Kind> {
    let (get, _) = autocast_dtype_fns()?;
    // SAFETY: see autocast_dtype_fns.
    Ok(match unsafe { get(CUDA_DEVICE_TYPE) } {
        BFLOAT16 => Kind::BFloat16,
        5 => Kind::Half,
        other => {
            return Err(Error::Unsupported {
                what: format!(
                    "CUDA autocast dtype is c10 scalar type {other}, expected Half (5) or BFloat16 (15)"
                ),
            })
        }
    })
}

/// Sets CUDA autocast's lower precision to bfloat16 (`true`) or float16 (`false`) for this
/// thread.
pub fn set_cuda_autocast_bf16(bf16: bool) -> Result<()> {
    let (_, set) = autocast_dtype_fns()?;
    // SAFETY: see autocast_dtype_fns.
    unsafe { set(CUDA_DEVICE_TYPE, if bf16 { BFLOAT16 } else { 5 }) };
    Ok(())
}

/// Runs `f` under CUDA autocast to bfloat16 when `bf16` is set (and CUDA is there); otherwise
/// just runs it.
pub fn with_precision<T>(bf16: bool, f: impl FnOnce() -> Result<T>) -> Result<T> {
    if !bf16 || !tch::Cuda::is_available() {
        return f();
    }
    set_cuda_autocast_bf16(true)?;
    tch::autocast(true, f)
}

/// Moves a batch to `device` with the step options (non-blocking copy, channels-last).
pub(crate) fn to_device(x: &Tensor, device: Device, opts: &StepOptions) -> Result<Tensor> {
    let x = if x.device() == device {
        x.shallow_clone()
    } else {
        x.f_to_device_(
            device,
            x.kind(),
            opts.non_blocking && device.is_cuda(),
            false,
        )?
    };
    if opts.channels_last {
        to_channels_last(&x)
    } else {
        Ok(x)
    }
}

/// One replica's forward and backward on its share of the batch: summed loss, correct count.
fn forward_backward(
    net: &impl ModuleT,
    x: &Tensor,
    y: &Tensor,
    device: Device,
    loss: &(impl Loss + ?Sized),
    opts: &StepOptions,
) -> Result<(f64, f64)> {
    let x = to_device(x, device, opts)?;
    let y = y.f_to_device_(
        device,
        y.kind(),
        opts.non_blocking && device.is_cuda(),
        false,
    )?;
    let (l, pred) = with_precision(opts.bf16, || {
        let pred = net.forward_t(&x, true);
        let l = loss.loss(&pred, &y)?;
        Ok((l.f_sum(l.kind())?, pred)) // float32, or float64 for a float64 model
    })?;
    l.f_backward()?;
    Ok((l.f_double_value(&[])?, accuracy(&pred, &y)?))
}

struct Replica<N> {
    _vs: VarStore,
    net: N,
    tensors: Vec<Tensor>,
    device: Device,
}

/// `nn.DataParallel`: the model on the first device and a replica on each other one. Each step
/// splits the batch into one chunk a device (`torch.chunk`), runs forward and backward on each,
/// sums the gradients onto the first device and takes one optimiser step there; the replicas
/// get the new values before the next step. As in PyTorch, BatchNorm normalises each chunk with
/// its own statistics and the running statistics come from the first device's chunk.
pub struct DataParallel<'a, N: Replicate> {
    net: &'a N,
    device: Device,
    tensors: Vec<Tensor>,
    replicas: Vec<Replica<N>>,
}

impl<'a, N: Replicate> DataParallel<'a, N> {
    /// Replicates `net` (which lives on `devices[0]`) onto `devices[1..]`.
    pub fn new(net: &'a N, devices: &[Device]) -> Result<DataParallel<'a, N>> {
        let Some(&device) = devices.first() else {
            return Err(Error::arg(
                "DataParallel",
                "no devices; use d2l::try_all_gpus()",
            ));
        };
        let tensors: Vec<Tensor> = net.named_tensors().into_iter().map(|(_, t)| t).collect();
        if let Some(t) = tensors.iter().find(|t| t.device() != device) {
            return Err(Error::arg(
                "DataParallel",
                format!(
                    "the model is on {:?}, the first device is {device:?}; build it there",
                    t.device()
                ),
            ));
        }
        let replicas = devices[1..]
            .iter()
            .map(|&d| {
                let (vs, copy) = net.replicate(d)?;
                let tensors = copy.named_tensors().into_iter().map(|(_, t)| t).collect();
                Ok(Replica {
                    _vs: vs,
                    net: copy,
                    tensors,
                    device: d,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(DataParallel {
            net,
            device,
            tensors,
            replicas,
        })
    }

    /// The number of devices.
    pub fn len(&self) -> usize {
        1 + self.replicas.len()
    }

    /// Always false: there is at least the first device.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Copies the first device's values (parameters and buffers) into every replica.
    fn broadcast(&mut self) -> Result<()> {
        tch::no_grad(|| -> Result<()> {
            for r in &mut self.replicas {
                for (dst, src) in r.tensors.iter_mut().zip(&self.tensors) {
                    dst.f_copy_(src)?;
                }
            }
            Ok(())
        })
    }
}

/// One training step (d2l's `train_batch_ch13`, whose `net` is an `nn.DataParallel`): the batch
/// `x`, `y` split across `net`'s devices, forward, the loss summed (`l.sum().backward()`),
/// backward, the gradients added onto the first device, one `trainer` step. Returns the summed
/// loss and the number of correct predictions over the whole batch. `train_ch13` and the
/// benchmarks take every step through here.
pub fn train_batch_ch13<N: Replicate>(
    net: &mut DataParallel<'_, N>,
    x: &Tensor,
    y: &Tensor,
    loss: &(impl Loss + ?Sized),
    trainer: &mut (impl Trainer + ?Sized),
    opts: &StepOptions,
) -> Result<(f64, f64)> {
    trainer.zero_grad()?;
    if net.replicas.is_empty() {
        let r = forward_backward(net.net, x, y, net.device, loss, opts)?;
        trainer.step()?;
        return Ok(r);
    }
    net.broadcast()?;
    let n = net.len() as i64;
    let (xs, ys) = (x.f_chunk(n, 0)?, y.f_chunk(n, 0)?);
    let used = xs.len(); // torch.chunk gives fewer chunks for a small last batch
    let (first, device, tensors) = (net.net, net.device, &net.tensors);
    let rest = &mut net.replicas[..used - 1];
    let threaded = device.is_cuda() && rest.iter().all(|r| r.device.is_cuda());
    let mut results = Vec::with_capacity(used);
    if threaded {
        // One thread a GPU, as nn.DataParallel's parallel_apply.
        std::thread::scope(|s| -> Result<()> {
            let handles: Vec<_> = rest
                .iter_mut()
                .zip(xs[1..].iter().zip(&ys[1..]))
                .map(|(r, (xc, yc))| {
                    let (xc, yc) = (xc.shallow_clone(), yc.shallow_clone());
                    s.spawn(move || forward_backward(&r.net, &xc, &yc, r.device, loss, opts))
                })
                .collect();
            results.push(forward_backward(first, &xs[0], &ys[0], device, loss, opts)?);
            for h in handles {
                results.push(h.join().map_err(|_| Error::Panicked {
                    what: "DataParallel: a replica".into(),
                })??);
            }
            Ok(())
        })?;
    } else {
        results.push(forward_backward(first, &xs[0], &ys[0], device, loss, opts)?);
        for (r, (xc, yc)) in rest.iter().zip(xs[1..].iter().zip(&ys[1..])) {
            results.push(forward_backward(&r.net, xc, yc, r.device, loss, opts)?);
        }
    }
    // Reduce: the gradients of every replica added onto the first device's.
    tch::no_grad(|| -> Result<()> {
        for (i, t) in tensors.iter().enumerate() {
            if !t.requires_grad() {
                continue;
            }
            let mut g = t.grad();
            for r in rest.iter() {
                let rg = r.tensors[i].grad();
                if !rg.defined() {
                    continue;
                }
                if g.defined() {
                    let _ = g.f_add_(&rg.f_to_device(device)?)?;
                }
            }
        }
        Ok(())
    })?;
    trainer.step()?;
    for r in rest.iter_mut() {
        for t in &mut r.tensors {
            t.zero_grad();
        }
    }
    Ok(results
        .iter()
        .fold((0.0, 0.0), |(l, a), (rl, ra)| (l + rl, a + ra)))
}
