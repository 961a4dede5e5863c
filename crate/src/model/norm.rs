//! ResNet's BatchNorm on the CPU with the residual addition and the ReLU that follow it, in one
//! kernel for float batches (NCHW or channels-last), forward and backward.
//!
//! libtorch's training-mode statistics for NCHW batches add each channel's values one at a time
//! into one double, twice (mean, then squared deviations), and its backward loops over each
//! plane separately, which at 64 px crops (2x2 planes in layer4) costs more than the
//! arithmetic. `norm.cpp` makes the same sums (double, the float terms libtorch forms) over
//! independent partial sums that vectorise, computes mean, invstd and the running statistics
//! with libtorch's formulas, and writes `relu(bn(x) + identity)` in one pass where the block's
//! ops make three; its backward is libtorch's formulas with ReLU's mask folded in. Only the order
//! of the double additions differs from libtorch's (tests/norm.rs measures both against
//! float64). Channels-last batches take the kernel too (sums along each row of channels, over
//! fixed blocks of rows): there libtorch's BatchNorm backward and the ReLU's backward are slower
//! than in NCHW (at 224 px with AVX2 kernels, 19 and 18 ms a call against 13 and 3 in PyTorch's
//! profiler), and channels-last is the layout the trial picks for 224 px on AVX-512 machines.
//! Other inputs (other kinds, other devices, an identity in another layout, one value a channel,
//! evaluation under autograd, layers without weight and bias) take libtorch's ops, as does a
//! model traced for TorchScript. `D2L_FAST_BATCH_NORM=0` or [`set_cpu_fast_batch_norm`]`(false)`
//! uses libtorch's everywhere.
use std::os::raw::{c_char, c_int};

use tch::nn::BatchNorm;
use tch::{Device, Kind, Tensor};
use torch_sys::C_tensor;

use super::layout;
use crate::switch::EnvSwitch;

static FAST: EnvSwitch = EnvSwitch::new("D2L_FAST_BATCH_NORM");

/// The momentum and eps of ResNet's BatchNorm layers (PyTorch's defaults, which tch's
/// `BatchNormConfig::default()` has too).
pub const BN_MOMENTUM: f64 = 0.1;
pub const BN_EPS: f64 = 1e-5;

extern "C" {
    #[allow(clippy::too_many_arguments)]
    fn d2l_batch_norm_act(
        x: *const C_tensor,
        weight: *const C_tensor,
        bias: *const C_tensor,
        identity: *const C_tensor,
        running_mean: *const C_tensor,
        running_var: *const C_tensor,
        train: c_int,
        momentum: f64,
        eps: f64,
        relu: c_int,
        out: *mut *mut C_tensor,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
}

/// Whether ResNet's CPU BatchNorm of NCHW float batches (with the addition and ReLU after it)
/// takes the fused kernel (the default) or libtorch's ops (`false`). Process-wide.
pub fn set_cpu_fast_batch_norm(enabled: bool) {
    FAST.set(enabled);
}

/// See [`set_cpu_fast_batch_norm`].
pub fn cpu_fast_batch_norm() -> bool {
    FAST.get() && !super::conv::libtorch_only()
}

/// A 1-d float CPU tensor of `c` values, contiguous.
fn is_channel_vector(t: &Tensor, c: i64) -> bool {
    t.size() == [c] && t.device() == Device::Cpu && t.kind() == Kind::Float && t.is_contiguous()
}

/// Whether [`batch_norm_act`] with these arguments takes the fused kernel (else libtorch's ops).
pub fn batch_norm_act_uses_kernel(
    xs: &Tensor,
    bn: &BatchNorm,
    train: bool,
    identity: Option<&Tensor>,
) -> bool {
    let size = xs.size();
    if size.len() != 4 || xs.device() != Device::Cpu || xs.kind() != Kind::Float {
        return false;
    }
    let c = size[1];
    let per_channel = size[0] * size[2] * size[3];
    // libtorch raises "Expected more than 1 value per channel when training": let it.
    if per_channel == 0 || (train && per_channel < 2) {
        return false;
    }
    let Some(channels_last) = layout(xs) else {
        return false;
    };
    // The kernel records training for autograd, not evaluation: libtorch's ops do.
    let needs_grad = || {
        [Some(xs), bn.ws.as_ref(), bn.bs.as_ref(), identity]
            .into_iter()
            .flatten()
            .any(Tensor::requires_grad)
    };
    if !train && super::conv::grad_enabled() && needs_grad() {
        return false;
    }
    // An affine layer (weight and bias: what autograd's record of the kernel takes).
    let vectors_ok = [
        Some(&bn.running_mean),
        Some(&bn.running_var),
        bn.ws.as_ref(),
        bn.bs.as_ref(),
    ]
    .into_iter()
    .all(|t| t.is_some_and(|t| is_channel_vector(t, c)));
    vectors_ok
        && identity.is_none_or(|t| {
            t.size() == size
                && t.kind() == Kind::Float
                && t.device() == Device::Cpu
                && layout(t) == Some(channels_last)
        })
        && cpu_fast_batch_norm()
}

/// `relu(F.batch_norm(xs, ...) + identity)`, each part optional, with `bn`'s weight, bias and
/// running statistics and the given `momentum` and `eps` (PyTorch's functional form: `bn`'s own
/// settings, which tch keeps private, are not read; ResNet's are [`BN_MOMENTUM`] and
/// [`BN_EPS`]). In a ResNet block: `bn1` and the in-place ReLU, or `bn2`, `+= identity` and the
/// ReLU. In training the running statistics are updated in place.
///
/// # Shapes
/// `xs`, `identity`: `[n, c, h, w]`; `bn`: `c` channels. Out: `[n, c, h, w]`.
pub fn batch_norm_act(
    xs: &Tensor,
    bn: &BatchNorm,
    train: bool,
    momentum: f64,
    eps: f64,
    identity: Option<&Tensor>,
    relu: bool,
) -> Tensor {
    if batch_norm_act_uses_kernel(xs, bn, train, identity) {
        let ptr = |t: Option<&Tensor>| t.map_or(std::ptr::null(), |t| t.as_ptr());
        let mut out: *mut C_tensor = std::ptr::null_mut();
        let mut err = [0 as c_char; 512];
        // SAFETY: live tensors (or null for the optional ones) that `batch_norm_act_uses_kernel`
        // checked: f32 on the CPU, contiguous NCHW or channels-last, [C] vectors, an identity of
        // the same shape and layout; the function writes a new tensor to `out` and returns 0, or
        // writes a NUL-terminated message of at most `err.len()` bytes and returns 1.
        let rc = unsafe {
            d2l_batch_norm_act(
                xs.as_ptr(),
                ptr(bn.ws.as_ref()),
                ptr(bn.bs.as_ref()),
                ptr(identity),
                bn.running_mean.as_ptr(),
                bn.running_var.as_ptr(),
                c_int::from(train),
                momentum,
                eps,
                c_int::from(relu),
                &mut out,
                err.as_mut_ptr(),
                err.len(),
            )
        };
        if rc == 0 {
            // SAFETY: a tensor the function allocated for us; `Tensor` frees it.
            return unsafe { Tensor::from_ptr(out) };
        }
        // 2: evaluation with autograd recording (checked above too: the kernel records
        // training only).
        if rc == 1 {
            FAST.turn_off("the fused BatchNorm kernel", &err);
        }
    }
    let mut ys = Tensor::batch_norm(
        xs,
        bn.ws.as_ref(),
        bn.bs.as_ref(),
        Some(&bn.running_mean),
        Some(&bn.running_var),
        train,
        momentum,
        eps,
        true,
    );
    if let Some(identity) = identity {
        ys += identity;
    }
    if relu {
        ys = ys.relu_();
    }
    ys
}
