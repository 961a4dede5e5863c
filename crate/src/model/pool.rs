//! ResNet's max pooling (`nn.MaxPool2d(kernel_size=3, stride=2, padding=1)`), on the CPU through
//! a faster kernel with libtorch's exact results.
//!
//! libtorch's kernel for NCHW batches visits every output's window one value at a time: at 64 px
//! crops it took 7 ms of a 125 ms ResNet-18 training step (batch 32) on an AMD EPYC, at 224 px
//! 100 ms. `pool.cpp` takes the same maxima in a row pass and a vectorised column pass on
//! libtorch's threads, and gives the same values and the same indices (the first maximum of a
//! window in row-major order, NaN as the largest), so the backward is libtorch's own
//! `max_pool2d_with_indices_backward` and the gradients are PyTorch's to the bit. Other inputs
//! (channels-last, whose libtorch kernel is vectorised already, other kinds, other devices) take
//! libtorch's `max_pool2d`, as does a model traced for TorchScript. `D2L_FAST_MAX_POOL=0` or
//! [`set_cpu_fast_max_pool`]`(false)` uses libtorch's everywhere.
use std::os::raw::{c_char, c_int};

use tch::{Device, Kind, Tensor};
use torch_sys::C_tensor;

use crate::switch::EnvSwitch;

static FAST: EnvSwitch = EnvSwitch::new("D2L_FAST_MAX_POOL");

extern "C" {
    fn d2l_max_pool2d(
        x: *const C_tensor,
        k: i64,
        s: i64,
        p: i64,
        out: *mut *mut C_tensor,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
}

/// Whether ResNet's CPU max pooling of NCHW float batches takes the faster kernel (the default)
/// or libtorch's (`false`; the results are the same). Process-wide.
pub fn set_cpu_fast_max_pool(enabled: bool) {
    FAST.set(enabled);
}

/// See [`set_cpu_fast_max_pool`].
pub fn cpu_fast_max_pool() -> bool {
    FAST.get() && !super::conv::libtorch_only()
}

/// Whether [`max_pool2d`] takes the faster kernel for `xs`.
fn fast_applies(xs: &Tensor, k: i64, stride: i64, padding: i64) -> bool {
    let size = xs.size();
    size.len() == 4
        && xs.device() == Device::Cpu
        && xs.kind() == Kind::Float
        && k >= 1
        && stride >= 1
        && (0..=k / 2).contains(&padding)
        && size[2] + 2 * padding >= k
        && size[3] + 2 * padding >= k
        && size[3] <= i32::MAX as i64
        && xs.is_contiguous()
        && cpu_fast_max_pool()
}

/// `F.max_pool2d(xs, k, stride, padding)` (square window, no dilation, floor mode).
///
/// # Shapes
/// `[n, c, h, w]` -> `[n, c, (h + 2p - k) / stride + 1, (w + 2p - k) / stride + 1]`
pub fn max_pool2d(xs: &Tensor, k: i64, stride: i64, padding: i64) -> Tensor {
    if fast_applies(xs, k, stride, padding) {
        let mut out: *mut C_tensor = std::ptr::null_mut();
        let mut err = [0 as c_char; 512];
        // SAFETY: `xs` is a live tensor that `fast_applies` checked (contiguous 4-d f32 on the
        // CPU, a window that fits); the function writes a new tensor to `out` and returns 0, or
        // writes a NUL-terminated message of at most `err.len()` bytes and returns 1.
        let rc = unsafe {
            d2l_max_pool2d(
                xs.as_ptr(),
                k,
                stride,
                padding,
                &mut out,
                err.as_mut_ptr(),
                err.len(),
            )
        };
        if rc == 0 {
            // SAFETY: a tensor the function allocated for us; `Tensor` frees it.
            return unsafe { Tensor::from_ptr(out) };
        }
        FAST.turn_off("the fast max pooling", &err);
    }
    xs.max_pool2d([k, k], [stride, stride], [padding, padding], [1, 1], false)
}
