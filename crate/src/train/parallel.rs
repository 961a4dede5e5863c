//! Data parallel training like `nn.DataParallel`, and the CUDA speed options (bf16 autocast,
//! channels-last).
use std::sync::{Arc, OnceLock};

use tch::nn::{ModuleT, VarStore};
use tch::{Device, Kind, Tensor};

use super::{accuracy, Loss, Trainer};
use crate::dist::{ProcessGroup, ReduceOp};
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
///
/// With a process group ([`DataParallel::distributed`]; `train_ch13` passes the default one
/// of [`crate::dist::init_process_group`]) it is also PyTorch's
/// `DistributedDataParallel`: each process holds the model, rank 0's parameters and buffers are
/// copied to every rank at the start, each rank runs its share of the batch, and after backward
/// the gradients are added across the ranks in buckets of about 25 MB (PyTorch's
/// `bucket_cap_mb`), so that every rank takes the same step. They are summed, not averaged as
/// PyTorch's DDP does: the chapter's loss is a sum over the batch, and the sum makes the step the
/// one a single process takes over the whole batch (as the devices' gradients are summed here).
/// Before each forward the buffers (BatchNorm's running statistics) come from rank 0, as DDP's
/// `broadcast_buffers`; BatchNorm normalises each rank's share with its own statistics (no
/// `SyncBatchNorm`), as on several devices.
pub struct DataParallel<'a, N: Replicate> {
    net: &'a N,
    device: Device,
    tensors: Vec<Tensor>,
    replicas: Vec<Replica<N>>,
    group: Option<Arc<ProcessGroup>>,
    /// Seconds spent in the group's collectives during steps (gradients and buffers).
    comm_s: f64,
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
            group: None,
            comm_s: 0.0,
        })
    }

    /// Trains across the processes of `group` as well (PyTorch's `DistributedDataParallel`):
    /// copies rank 0's parameters and buffers to every rank now; from then on each step sums the
    /// gradients across the ranks. `None` changes nothing.
    pub fn distributed(mut self, group: Option<Arc<ProcessGroup>>) -> Result<Self> {
        if let Some(g) = &group {
            let all: Vec<&Tensor> = self.tensors.iter().collect();
            sync_in_buckets(g, &all, Collective::Broadcast)?;
        }
        self.group = group;
        Ok(self)
    }

    /// Seconds the steps spent in collectives across the group (0 without one).
    pub fn comm_seconds(&self) -> f64 {
        self.comm_s
    }

    /// The process group this trains across, if any.
    pub fn group(&self) -> Option<&Arc<ProcessGroup>> {
        self.group.as_ref()
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
    if let Some(g) = &net.group {
        let t = std::time::Instant::now();
        let buffers: Vec<&Tensor> = net.tensors.iter().filter(|t| !t.requires_grad()).collect();
        sync_in_buckets(g, &buffers, Collective::Broadcast)?;
        net.comm_s += t.elapsed().as_secs_f64();
    }
    if x.size().first() == Some(&0) {
        // This rank's share of a small last batch is empty: it only joins the reduction
        // (with zero gradients).
        all_reduce_grads(net)?;
        trainer.step()?;
        return Ok((0.0, 0.0));
    }
    if net.replicas.is_empty() {
        let r = forward_backward(net.net, x, y, net.device, loss, opts)?;
        all_reduce_grads(net)?;
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
    all_reduce_grads(net)?;
    trainer.step()?;
    for r in net.replicas[..used - 1].iter_mut() {
        for t in &mut r.tensors {
            t.zero_grad();
        }
    }
    Ok(results
        .iter()
        .fold((0.0, 0.0), |(l, a), (rl, ra)| (l + rl, a + ra)))
}

/// What [`sync_in_buckets`] does with each bucket.
#[derive(Clone, Copy)]
enum Collective {
    /// Rank 0's values to every rank.
    Broadcast,
    /// The sum over the ranks, to every rank.
    Sum,
}

/// Most bytes in one flat buffer sent to a collective (PyTorch DDP's `bucket_cap_mb = 25`).
const BUCKET_BYTES: usize = 25 << 20;

/// Broadcasts or sums `tensors` across the group, packed into flat buckets of one kind and
/// device (fewer, larger messages; any memory layout), then copied back in place.
fn sync_in_buckets(group: &ProcessGroup, tensors: &[&Tensor], how: Collective) -> Result<()> {
    let mut buckets: Vec<Vec<&Tensor>> = Vec::new();
    let mut bytes = 0;
    for &t in tensors {
        let size = t.numel() * t.kind().elt_size_in_bytes();
        let fits = buckets.last().is_some_and(|b| {
            let first = b[0];
            first.kind() == t.kind() && first.device() == t.device() && bytes + size <= BUCKET_BYTES
        });
        if !fits {
            buckets.push(Vec::new());
            bytes = 0;
        }
        buckets.last_mut().expect("pushed above").push(t);
        bytes += size;
    }
    tch::no_grad(|| -> Result<()> {
        for bucket in &buckets {
            let flat: Vec<Tensor> = bucket
                .iter()
                .map(|t| t.f_reshape([-1]))
                .collect::<std::result::Result<_, _>>()?;
            let flat = Tensor::f_cat(&flat, 0)?;
            match how {
                Collective::Broadcast => group.broadcast(&[&flat], 0)?,
                Collective::Sum => group.all_reduce(&[&flat], ReduceOp::Sum)?,
            }
            let mut at = 0;
            for t in bucket {
                let n = t.numel() as i64;
                let mut dst = t.shallow_clone();
                dst.f_copy_(&flat.f_narrow(0, at, n)?.f_view(t.size().as_slice())?)?;
                at += n;
            }
        }
        Ok(())
    })
}

/// Gives every trainable tensor a gradient (zeros where backward gave none), so that every rank
/// sends the same buckets.
fn define_grads(tensors: &[Tensor]) -> Result<()> {
    // One backward through `0 * sum(t)` for each tensor without a gradient (all on one device).
    let mut zero: Option<Tensor> = None;
    for t in tensors
        .iter()
        .filter(|t| t.requires_grad() && !t.grad().defined())
    {
        let z = t.f_sum(t.kind())?.f_mul_scalar(0.0)?;
        zero = Some(match zero {
            None => z,
            Some(acc) => acc.f_add(&z)?,
        });
    }
    if let Some(zero) = zero {
        zero.f_backward()?;
    }
    Ok(())
}

/// Under a process group, the first device's gradients summed across the ranks.
fn all_reduce_grads<N: Replicate>(net: &mut DataParallel<'_, N>) -> Result<()> {
    let Some(group) = net.group.clone() else {
        return Ok(());
    };
    let start = std::time::Instant::now();
    define_grads(&net.tensors)?;
    let grads: Vec<Tensor> = net
        .tensors
        .iter()
        .filter(|t| t.requires_grad())
        .map(|t| t.grad())
        .collect();
    let refs: Vec<&Tensor> = grads.iter().collect();
    sync_in_buckets(&group, &refs, Collective::Sum)?;
    net.comm_s += start.elapsed().as_secs_f64();
    Ok(())
}
