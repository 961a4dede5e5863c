//! ResNet's convolution (`nn.Conv2d(..., bias=False)`), with a faster CPU path for layers whose
//! output has only a few positions.
//!
//! libtorch runs CPU convolutions through oneDNN. For a layer whose output is 1x1 or 2x2 (ResNet's
//! last stages on 32 or 64 px images) oneDNN's weight gradient is slow: for 512 -> 512 channels,
//! 3x3, on a `[32, 512, 1, 1]` input it takes 23 ms (2 cores) where the same sums as one matrix
//! product take 1.9 ms. There, the layer is computed as im2col followed by one matrix product:
//! the same convolution (it agrees with oneDNN's to float rounding), and autograd's backward of
//! a matrix product is fast. Larger outputs, other devices and channels-last inputs keep
//! libtorch's convolution, which is faster there.
use std::sync::atomic::{AtomicBool, Ordering};

use tch::nn::{self, Init};
use tch::{Device, Kind, Tensor};

/// The most output positions an image (`out_h * out_w`) for which the CPU path is im2col and a
/// matrix product. Measured on 2 cores (ms for forward and backward, batch 32, oneDNN against
/// im2col): 512 ch 1x1 36.5 / 9.2, 512 ch 2x2 40.7 / 20.9, 256 ch 2x2 6.9 / 5.4, 256 ch 4x4
/// 14.8 / 16.8, 128 ch 4x4 3.8 / 5.7: oneDNN wins from 4x4 on.
const IM2COL_MAX_POSITIONS: i64 = 4;

static IM2COL: AtomicBool = AtomicBool::new(true);

/// Whether ResNet's small CPU convolutions use im2col and a matrix product (the default, `true`)
/// or libtorch's convolution everywhere (`false`, to compare with PyTorch kernel for kernel).
/// Process-wide, like `tch::set_num_threads`.
pub fn set_cpu_im2col(enabled: bool) {
    IM2COL.store(enabled, Ordering::Relaxed);
}

/// See [`set_cpu_im2col`].
pub fn cpu_im2col() -> bool {
    IM2COL.load(Ordering::Relaxed) && !LIBTORCH_ONLY.get()
}

thread_local! {
    /// Set while this thread traces a model for TorchScript: the im2col path's reshapes would
    /// fix the traced batch size, libtorch's convolution does not.
    static LIBTORCH_ONLY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with libtorch's convolution everywhere on this thread (other threads keep theirs).
pub(crate) fn with_libtorch_conv<T>(f: impl FnOnce() -> T) -> T {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            LIBTORCH_ONLY.set(self.0);
        }
    }
    let _restore = Restore(LIBTORCH_ONLY.replace(true));
    f()
}

/// A square convolution without bias, weight `[c_out, c_in, k, k]`, initialised like
/// torchvision's ResNet: `kaiming_normal_(mode="fan_out", nonlinearity="relu")`.
#[derive(Debug)]
pub struct Conv2d {
    pub ws: Tensor,
    pub stride: i64,
    pub padding: i64,
}

pub fn conv2d(p: nn::Path, c_in: i64, c_out: i64, k: i64, stride: i64, padding: i64) -> Conv2d {
    let fan_out = (c_out * k * k) as f64;
    let init = Init::Randn {
        mean: 0.0,
        stdev: (2.0 / fan_out).sqrt(),
    };
    Conv2d {
        ws: p.var("weight", &[c_out, c_in, k, k], init),
        stride,
        padding,
    }
}

impl Conv2d {
    /// `[n, c_in, h, w]` -> `[n, c_out, out_h, out_w]`.
    fn out_size(&self, h: i64, w: i64) -> (i64, i64) {
        let k = self.ws.size()[2];
        let out = |x: i64| (x + 2 * self.padding - k) / self.stride + 1;
        (out(h), out(w))
    }

    /// Whether `forward` on `xs` takes the im2col path: a contiguous f32 CPU batch whose output
    /// has at most 4 positions an image, while [`cpu_im2col`] is on.
    pub fn uses_im2col(&self, xs: &Tensor) -> bool {
        let size = xs.size();
        if size.len() != 4
            || xs.device() != Device::Cpu
            || xs.kind() != Kind::Float
            || !xs.is_contiguous()
            || !cpu_im2col()
        {
            return false;
        }
        let (oh, ow) = self.out_size(size[2], size[3]);
        oh > 0 && ow > 0 && oh * ow <= IM2COL_MAX_POSITIONS
    }

    /// The convolution as im2col and one matrix product.
    ///
    /// # Shapes
    /// `[n, c, h, w]` -> cols `[n, c*k*k, l]` -> `[n*l, c*k*k] x [c*k*k, c_out]` -> `[n, c_out, oh, ow]`
    fn im2col_forward(&self, xs: &Tensor) -> Tensor {
        let size = xs.size();
        let (n, h, w) = (size[0], size[2], size[3]);
        let (c_out, k) = (self.ws.size()[0], self.ws.size()[2]);
        let (oh, ow) = self.out_size(h, w);
        let l = oh * ow;
        let cols = xs.im2col([k, k], [1, 1], [self.padding; 2], [self.stride; 2]); // [n, c*k*k, l]
        cols.transpose(1, 2)
            .reshape([n * l, -1])
            .mm(&self.ws.reshape([c_out, -1]).tr()) // [n*l, c_out]
            .reshape([n, l, c_out])
            .transpose(1, 2)
            .contiguous() // NCHW: as a view this would be channels-last, slow in later layers
            .reshape([n, c_out, oh, ow])
    }
}

impl nn::Module for Conv2d {
    fn forward(&self, xs: &Tensor) -> Tensor {
        if self.uses_im2col(xs) {
            return self.im2col_forward(xs);
        }
        xs.conv2d(
            &self.ws,
            None::<&Tensor>,
            [self.stride; 2],
            [self.padding; 2],
            [1, 1],
            1,
        )
    }
}
