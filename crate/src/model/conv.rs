//! ResNet's convolution (`nn.Conv2d(..., bias=False)`), and on the CPU the fastest of a few ways
//! to compute it, chosen by measurement on the machine that runs (as `cudnn.benchmark` does).
//!
//! libtorch runs CPU convolutions through oneDNN. For a layer whose output has only a few
//! positions (ResNet's last stages on 32 or 64 px images) oneDNN's weight gradient can be slow: on
//! one 2-core machine, for 512 -> 512 channels, 3x3, on a `[32, 512, 1, 1]` input it took 23 ms
//! where the same sums as one matrix product took 1.9 ms. The same layer can also be computed as
//! im2col followed by one matrix product (it agrees with oneDNN's to float rounding, and
//! autograd's backward of a matrix product is plain matrix products). Which one is faster depends
//! on the CPU and on the kernels libtorch picks for it (`ATEN_CPU_CAPABILITY`,
//! `ONEDNN_MAX_CPU_ISA`): on an AVX-512 machine oneDNN won for 2x2 outputs that it lost on
//! another, and with SSE4.1 kernels im2col won by 1.4x. So nothing is fixed: the first time a
//! layer sees an input shape (and gradient requirement), both ways are timed on that shape,
//! forward and, when gradients are recorded, backward, and the faster is kept for the rest of the
//! process ([`conv_choices`] lists what was chosen, and the times) and in the tuning cache on
//! disk, so that later processes on the same machine and kernel set skip the timing
//! ([`crate::tuning`]; `D2L_TUNING_CACHE=0` times in every process).
//!
//! Only shapes whose im2col buffer is at most [`IM2COL_MAX_BYTES`] are candidates (like cuDNN's
//! workspace limit): the buffer is `k*k` times the input, and timing large layers costs more time
//! than it saves. [`set_conv_autotune`]`(false)` or `D2L_CONV_AUTOTUNE=0` turns the
//! timing off and uses a fixed rule (im2col where an output image has at most 4 positions), which
//! makes the choice the same in every process: runs compared bit for bit across processes (a
//! resumed run against an uninterrupted one) need that. [`set_cpu_im2col`]`(false)` uses
//! libtorch's convolution everywhere (PyTorch's kernels exactly).
//!
//! Channels-last batches have another candidate, for training: libtorch's forward and input
//! gradient with the weight gradient as im2col matrix products (`conv.cpp`, on bounded chunks of
//! the im2col rows). oneDNN's channels-last weight gradient is a direct kernel that ran at about
//! half its forward's speed on an AVX2 AMD EPYC (Zen 3) at 224 px (ResNet-18, batch 32, in
//! `ONEDNN_VERBOSE`'s times: 1.9 s of a 3.7 s step in weight gradients, 0.9 s in forwards),
//! where the matrix products ran 1.2-1.6x faster than it on the 3x3 layers and lost on the 7x7
//! one. As only the weight gradient differs, that is what is timed (libtorch's
//! `convolution_backward` for the weight alone against the matrix products), on the first use of
//! each shape, as above; with autotuning off libtorch's is used. NCHW batches do not get this
//! candidate: there oneDNN's weight gradient (on its blocked layout) ran 58 ms on the 64-channel
//! layer at 56x56 where channels-last's took 126, the matrix products (after making the input
//! channels-last) won only layer3 and layer4, and an NCHW step was 1.03x faster with them, less
//! than the timing of the extra shapes costs a first run. `D2L_CONV_GEMM_WEIGHT_GRAD=0` or
//! [`set_cpu_gemm_weight_grad`]`(false)` turns the candidate off.
//!
//! 3x3 layers at stride 1, padding 1 (most of ResNet-18's work) have one more candidate in either
//! layout, training or evaluation: Winograd's minimal filtering F(m x m, 3 x 3) (`winograd.cpp`;
//! m=4 on ResNet's layers but the 2x2 ones, [`winograd_tile`]), which does the sums over input
//! channels as (m+2)^2 matrix products over tiles, 4x fewer multiplications than direct convolution
//! for m=4, plus transforms that cost memory traffic. It is timed beside the layout's other
//! candidate, every path on its forward and backward, and kept where it is faster: on an AVX2 AMD
//! EPYC (Zen 3) at 224 px, batch 32, channels-last, forward and backward of the four 3x3 layer
//! shapes took 95, 66, 65 and 76 ms against the best other path's 141, 130, 131 and 121
//! (examples/bench_conv.rs). The timing costs a first run: there a 2-epoch 224 px run that timed
//! its 26 shapes and both layouts took 57 s against 46 s for one that read the tuning cache, about
//! 6 s more than that difference was without Winograd. Its results are other float32 arithmetic:
//! within Winograd's own error bound, which is wider than a direct sum's (tests/conv_winograd.rs),
//! about 7e-6 of a layer's largest output against 1e-6 for oneDNN's at m=4, as accurate as the
//! direct sum at m=2. `D2L_CONV_WINOGRAD=0` or [`set_cpu_winograd`]`(false)` turns it off
//! (PyTorch's arithmetic). Other devices and kinds always keep libtorch's convolution.
use std::collections::HashMap;
use std::os::raw::{c_char, c_int};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use tch::nn::{self, Init};
use tch::{Device, Kind, Tensor};
use torch_sys::C_tensor;

use crate::switch::EnvSwitch;

extern "C" {
    fn d2l_conv2d_gemm_wgrad(
        x: *const C_tensor,
        w: *const C_tensor,
        s: i64,
        p: i64,
        out: *mut *mut C_tensor,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
    #[allow(clippy::too_many_arguments)]
    fn d2l_conv2d_weight_grad(
        x: *const C_tensor,
        dy: *const C_tensor,
        w: *const C_tensor,
        s: i64,
        p: i64,
        gemm: c_int,
        out: *mut *mut C_tensor,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
    fn d2l_conv2d_winograd(
        x: *const C_tensor,
        w: *const C_tensor,
        m: i64,
        out: *mut *mut C_tensor,
        err: *mut c_char,
        len: usize,
    ) -> c_int;
}

/// Runs one of conv.cpp's functions that writes a new tensor to `out` (0) or an error (1).
fn from_cpp(
    what: &'static str,
    f: impl FnOnce(*mut *mut C_tensor, *mut c_char, usize) -> c_int,
) -> crate::Result<Tensor> {
    let mut out: *mut C_tensor = std::ptr::null_mut();
    let mut err = [0 as c_char; 512];
    if f(&mut out, err.as_mut_ptr(), err.len()) == 0 {
        // SAFETY: a tensor the function allocated for us; `Tensor` frees it.
        return Ok(unsafe { Tensor::from_ptr(out) });
    }
    Err(crate::Error::InvalidArgument {
        function: what,
        msg: crate::switch::c_message(&err),
    })
}

/// The weight gradient of `conv2d(xs, ws, stride, padding)` (no bias, square kernel) for the
/// output gradient `dy`, by libtorch's `convolution_backward` (`gemm` false: what PyTorch runs)
/// or as im2col matrix products (`conv.cpp`). Float CPU tensors.
pub fn conv2d_weight_grad(
    xs: &Tensor,
    dy: &Tensor,
    ws: &Tensor,
    stride: i64,
    padding: i64,
    gemm: bool,
) -> crate::Result<Tensor> {
    // SAFETY: live tensors; the function writes a new tensor or a NUL-terminated message of at
    // most `len` bytes.
    from_cpp("conv2d_weight_grad", |out, err, len| unsafe {
        d2l_conv2d_weight_grad(
            xs.as_ptr(),
            dy.as_ptr(),
            ws.as_ptr(),
            stride,
            padding,
            c_int::from(gemm),
            out,
            err,
            len,
        )
    })
}

/// `conv2d(xs, ws, stride, padding)` by libtorch, with the weight gradient (when autograd
/// records) as im2col matrix products (`conv.cpp`).
fn conv2d_gemm_wgrad(xs: &Tensor, ws: &Tensor, stride: i64, padding: i64) -> crate::Result<Tensor> {
    // SAFETY: as in `conv2d_weight_grad`.
    from_cpp("conv2d_gemm_wgrad", |out, err, len| unsafe {
        d2l_conv2d_gemm_wgrad(xs.as_ptr(), ws.as_ptr(), stride, padding, out, err, len)
    })
}

/// `conv2d(xs, ws, stride 1, padding 1)` for a 3x3 weight by Winograd's F(m x m, 3 x 3), `m` 2 or
/// 4 (`winograd.cpp`), its backward (when autograd records) the same way. Float CPU tensors.
pub fn conv2d_winograd(xs: &Tensor, ws: &Tensor, m: i64) -> crate::Result<Tensor> {
    // SAFETY: as in `conv2d_weight_grad`.
    from_cpp("conv2d_winograd", |out, err, len| unsafe {
        d2l_conv2d_winograd(xs.as_ptr(), ws.as_ptr(), m, out, err, len)
    })
}

/// With autotuning off, the most output positions an image (`out_h * out_w`) for which the CPU
/// path is im2col and a matrix product (measured on one 2-core machine, ms for forward and
/// backward, batch 32, oneDNN against im2col: 512 ch 1x1 36.5 / 9.2, 512 ch 2x2 40.7 / 20.9,
/// 256 ch 2x2 6.9 / 5.4, 256 ch 4x4 14.8 / 16.8, 128 ch 4x4 3.8 / 5.7).
const IM2COL_MAX_POSITIONS: i64 = 4;

/// The largest im2col buffer (`n * c_in*k*k * out_h*out_w` floats) for which im2col is a
/// candidate at all: 8 MiB. ResNet-18 at batch 32: at 64 px every layer but the first three
/// 3x3 and 7x7 ones (19, 19 and 9.4 MiB), at 224 px the 1x1 downsampling layers. Timing bigger
/// layers cost more than it found: on an AVX-512 EPYC oneDNN beat im2col 2.6-4x on those three
/// at 64 px, and at 224 px a 2-epoch run of 120 images that timed the 7x7 layers ran at 9.9
/// img/s against 11.9 with libtorch's convolution everywhere.
pub const IM2COL_MAX_BYTES: i64 = 8 << 20;

static IM2COL: AtomicBool = AtomicBool::new(true);

static AUTOTUNE: EnvSwitch = EnvSwitch::new("D2L_CONV_AUTOTUNE");

static GEMM_WEIGHT_GRAD: EnvSwitch = EnvSwitch::new("D2L_CONV_GEMM_WEIGHT_GRAD");

static WINOGRAD: EnvSwitch = EnvSwitch::new("D2L_CONV_WINOGRAD");

/// Whether the autotuning may time and take Winograd's algorithm for 3x3 convolutions at stride
/// 1, padding 1 (the default, `true`; `D2L_CONV_WINOGRAD=0` makes it `false` at start; see the
/// module's text). Process-wide; [`set_cpu_im2col`]`(false)` turns it off too.
pub fn set_cpu_winograd(enabled: bool) {
    WINOGRAD.set(enabled);
}

/// See [`set_cpu_winograd`].
pub fn cpu_winograd() -> bool {
    WINOGRAD.get() && cpu_im2col()
}

/// The tile size m of Winograd's F(m x m, 3 x 3) for an `h` x `w` output: the one of 2 and 4
/// with the fewest multiplications, `(m+2)^2` a tile (4 on ResNet's layers but its 2x2 ones,
/// where 4x4 tiles would be three quarters padding).
pub fn winograd_tile(h: i64, w: i64) -> i64 {
    let products = |m: i64| (m + 2) * (m + 2) * ((h + m - 1) / m) * ((w + m - 1) / m);
    if products(4) < products(2) {
        4
    } else {
        2
    }
}

/// Whether channels-last CPU training may compute a convolution's weight gradient as im2col
/// matrix products where that was timed faster (the default, `true`; see the module's text).
/// Process-wide; [`set_cpu_im2col`]`(false)` turns it off too.
pub fn set_cpu_gemm_weight_grad(enabled: bool) {
    GEMM_WEIGHT_GRAD.set(enabled);
}

/// See [`set_cpu_gemm_weight_grad`].
pub fn cpu_gemm_weight_grad() -> bool {
    GEMM_WEIGHT_GRAD.get() && cpu_im2col()
}

/// Whether ResNet's CPU convolutions may use im2col and a matrix product (the default, `true`)
/// or libtorch's convolution everywhere (`false`, to compare with PyTorch kernel for kernel).
/// Process-wide, like `tch::set_num_threads`.
pub fn set_cpu_im2col(enabled: bool) {
    IM2COL.store(enabled, Ordering::Relaxed);
}

/// See [`set_cpu_im2col`].
pub fn cpu_im2col() -> bool {
    IM2COL.load(Ordering::Relaxed) && !LIBTORCH_ONLY.get()
}

/// Whether the CPU convolution path is chosen by timing both on each new shape (the default;
/// `D2L_CONV_AUTOTUNE=0` in the environment makes it `false` at start) or by the fixed rule.
/// Process-wide. Choices already made are kept; [`clear_conv_choices`] forgets them.
pub fn set_conv_autotune(enabled: bool) {
    AUTOTUNE.set(enabled);
}

/// See [`set_conv_autotune`].
pub fn conv_autotune() -> bool {
    AUTOTUNE.get()
}

/// How a CPU convolution is computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum ConvPath {
    /// libtorch's `conv2d` (oneDNN on the CPU): what PyTorch runs.
    Libtorch,
    /// im2col, then one matrix product.
    Im2col,
    /// libtorch's `conv2d` and input gradient, the weight gradient as im2col matrix products
    /// (channels-last batches).
    GemmWeightGrad,
    /// Winograd's F(m x m, 3 x 3) ([`winograd_tile`] picks m), forward and backward (3x3
    /// layers at stride 1, padding 1).
    Winograd,
}

/// One measured choice: the shape (its batch size rounded up to a power of two: batches of 17 to
/// 32 images share the choice measured on the first of them) and layout, whether gradients were
/// recorded, the milliseconds of libtorch's path and of the other candidate (the least of a few
/// runs) and the one kept. For NCHW batches the candidate is [`ConvPath::Im2col`], timed on the
/// forward and (when gradients are recorded) the backward; for channels-last ones it is
/// [`ConvPath::GemmWeightGrad`], timed on the weight gradient alone, the only part that differs.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct ConvChoice {
    /// `[n, c_in, h, w]`, `n` rounded up to a power of two.
    pub input: [i64; 4],
    /// `[c_out, c_in, k, k]`.
    pub weight: [i64; 4],
    pub stride: i64,
    pub padding: i64,
    /// Whether the input was channels-last.
    pub channels_last: bool,
    /// Whether the input and the weight needed gradients (the backward was timed for those).
    pub input_grad: bool,
    pub weight_grad: bool,
    pub libtorch_ms: f64,
    /// The path timed against libtorch's.
    pub candidate: ConvPath,
    pub candidate_ms: f64,
    /// Winograd's time, where it was timed beside `candidate` (then every path's time is of the
    /// forward and, when gradients are recorded, the backward).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub winograd_ms: Option<f64>,
    pub chosen: ConvPath,
    /// Read from the tuning cache (measured by an earlier process on this machine, see
    /// [`crate::tuning`]) rather than measured by this one.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cached: bool,
}

impl ConvChoice {
    fn key(&self) -> Key {
        Key {
            input: self.input,
            weight: self.weight,
            stride: self.stride,
            padding: self.padding,
            channels_last: self.channels_last,
            input_grad: self.input_grad,
            weight_grad: self.weight_grad,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Key {
    input: [i64; 4],
    weight: [i64; 4],
    stride: i64,
    padding: i64,
    channels_last: bool,
    input_grad: bool,
    weight_grad: bool,
}

/// Below this ratio of the two paths' times, each is timed a second time before choosing.
const MEASURE_AGAIN_BELOW: f64 = 1.25;

/// Past this ratio in the warm-up runs the slower path has lost: no timed runs.
const LOST_IN_WARM_UP: f64 = 2.5;

/// Batch sizes that share a choice: a power of two and the sizes just below it (an epoch's last,
/// partial batch, an evaluation's), so that they are not timed again.
fn batch_bucket(n: i64) -> i64 {
    (n.max(1) as u64).next_power_of_two() as i64
}

/// The choices of this process, starting with those the tuning cache holds for this machine
/// (read on first use, see [`crate::tuning`]).
fn choices() -> &'static Mutex<HashMap<Key, ConvChoice>> {
    static CHOICES: OnceLock<Mutex<HashMap<Key, ConvChoice>>> = OnceLock::new();
    CHOICES.get_or_init(|| {
        let cached = crate::tuning::load().conv.into_iter().map(|mut c| {
            c.cached = true;
            (c.key(), c)
        });
        Mutex::new(cached.collect())
    })
}

/// The choices this process has measured or read from the tuning cache (`cached`) so far, in no
/// particular order.
pub fn conv_choices() -> Vec<ConvChoice> {
    let map = choices().lock().unwrap_or_else(|e| e.into_inner());
    map.values().cloned().collect()
}

/// Forgets every choice, measured or cached: the next call of each shape measures again (and
/// the new measurement replaces the cached one).
pub fn clear_conv_choices() {
    choices().lock().unwrap_or_else(|e| e.into_inner()).clear();
}

/// Whether autograd records operations on this thread now (`torch.is_grad_enabled()`).
pub(crate) fn grad_enabled() -> bool {
    // SAFETY: plain calls into libtorch's thread-local grad mode; the second restores the first's
    // previous value.
    unsafe {
        let prev = torch_sys::at_grad_set_enabled(0);
        torch_sys::at_grad_set_enabled(prev);
        prev != 0
    }
}

thread_local! {
    /// Set while this thread traces a model for TorchScript: the im2col path's reshapes would
    /// fix the traced batch size, libtorch's convolution does not.
    static LIBTORCH_ONLY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether this thread runs libtorch's own kernels only ([`with_libtorch_conv`]).
pub(crate) fn libtorch_only() -> bool {
    LIBTORCH_ONLY.get()
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

/// Whether `xs` is a 4-D float CPU tensor.
fn is_cpu_f32_batch(xs: &Tensor) -> bool {
    xs.dim() == 4 && xs.device() == Device::Cpu && xs.kind() == Kind::Float
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

    /// The output positions an image when `xs` may take the im2col path at all: a contiguous
    /// f32 CPU batch, [`cpu_im2col`] on, a buffer of at most [`IM2COL_MAX_BYTES`].
    fn im2col_positions(&self, xs: &Tensor) -> Option<i64> {
        let size = xs.size();
        if !is_cpu_f32_batch(xs) || !xs.is_contiguous() || !cpu_im2col() {
            return None;
        }
        let (oh, ow) = self.out_size(size[2], size[3]);
        let k = self.ws.size()[2];
        let bytes = size[0] * size[1] * k * k * oh * ow * 4;
        (oh > 0 && ow > 0 && bytes <= IM2COL_MAX_BYTES).then_some(oh * ow)
    }

    /// Whether `xs` may take [`ConvPath::GemmWeightGrad`]: a channels-last f32 CPU batch, the
    /// weight's gradient recorded, a float weight, [`cpu_gemm_weight_grad`] on.
    fn gemm_weight_grad_applies(&self, xs: &Tensor) -> bool {
        is_cpu_f32_batch(xs)
            && super::layout(xs) == Some(true)
            && self.ws.kind() == Kind::Float
            && self.ws.requires_grad()
            && grad_enabled()
            && cpu_gemm_weight_grad()
    }

    /// Whether `xs` may take [`ConvPath::Winograd`]: a float CPU batch, a float 3x3 weight at
    /// stride 1, padding 1, autotuning and [`cpu_winograd`] on (it is only taken where timed
    /// faster).
    fn winograd_applies(&self, xs: &Tensor) -> bool {
        let k = self.ws.size();
        is_cpu_f32_batch(xs)
            && self.ws.kind() == Kind::Float
            && (k[2], k[3], self.stride, self.padding) == (3, 3, 1, 1)
            && conv_autotune()
            && cpu_winograd()
    }

    /// The path `forward` takes for `xs`. With autotuning on (see the module's text), a shape
    /// seen for the first time is measured first (every candidate runs on `xs`, which is not
    /// changed).
    pub fn path_for(&self, xs: &Tensor) -> ConvPath {
        let mut candidates = match self.im2col_positions(xs) {
            Some(positions) if !conv_autotune() => {
                return if positions <= IM2COL_MAX_POSITIONS {
                    ConvPath::Im2col
                } else {
                    ConvPath::Libtorch
                };
            }
            Some(_) => vec![ConvPath::Im2col],
            None if conv_autotune() && self.gemm_weight_grad_applies(xs) => {
                vec![ConvPath::GemmWeightGrad]
            }
            None => Vec::new(),
        };
        if self.winograd_applies(xs) {
            candidates.push(ConvPath::Winograd);
        }
        if candidates.is_empty() {
            return ConvPath::Libtorch;
        }
        let grad = grad_enabled();
        let dims = |t: &Tensor| -> [i64; 4] {
            let s = t.size();
            [s[0], s[1], s[2], s[3]]
        };
        let mut input = dims(xs);
        input[0] = batch_bucket(input[0]);
        let key = Key {
            input,
            weight: dims(&self.ws),
            stride: self.stride,
            padding: self.padding,
            channels_last: super::layout(xs) == Some(true),
            input_grad: grad && xs.requires_grad(),
            weight_grad: grad && self.ws.requires_grad(),
        };
        // Held while measuring, so that two threads never time at once.
        let mut map = choices().lock().unwrap_or_else(|e| e.into_inner());
        if let Some(choice) = map.get(&key) {
            return choice.chosen;
        }
        let choice = self.measure(xs, key, &candidates);
        let chosen = choice.chosen;
        crate::tuning::update(|t| {
            t.conv.retain(|c| c.key() != key);
            t.conv.push(choice.clone());
        });
        map.insert(key, choice);
        chosen
    }

    /// The convolution by `path`, whatever [`Conv2d::path_for`] would take (a path that does not
    /// apply to `xs`, such as [`ConvPath::GemmWeightGrad`] for another device, falls back to
    /// libtorch's): for comparing the paths.
    pub fn forward_by(&self, path: ConvPath, xs: &Tensor) -> Tensor {
        self.compute(path, xs, &self.ws)
    }

    /// Whether `forward` on `xs` takes the im2col path (see [`Conv2d::path_for`]).
    pub fn uses_im2col(&self, xs: &Tensor) -> bool {
        self.path_for(xs) == ConvPath::Im2col
    }

    /// Times libtorch's path and the `candidates` on `xs`'s shape: a warm-up run each (a path
    /// that took over 2.5 times the fastest has lost), then a timed run each, and a second (in
    /// the other order) for those within 1.25 times the fastest. A run is the forward plus (when
    /// `key` says gradients are recorded) the backward to what needs a gradient, except when the
    /// only candidate is [`ConvPath::GemmWeightGrad`]: then it is the weight gradient alone (of
    /// an output gradient of ones), the only part that differs. The least time of each counts.
    /// Uses `xs` and the weight as they are (detached: nothing of theirs changes, no random
    /// numbers are drawn).
    fn measure(&self, xs: &Tensor, key: Key, candidates: &[ConvPath]) -> ConvChoice {
        let x = xs.detach().set_requires_grad(key.input_grad);
        let w = self.ws.detach().set_requires_grad(key.weight_grad);
        let mut wrt = Vec::new();
        if key.input_grad {
            wrt.push(&x);
        }
        if key.weight_grad {
            wrt.push(&w);
        }
        let dy = (candidates == [ConvPath::GemmWeightGrad]).then(|| {
            let (oh, ow) = self.out_size(xs.size()[2], xs.size()[3]);
            let ones = Tensor::ones(
                [xs.size()[0], w.size()[0], oh, ow],
                (Kind::Float, Device::Cpu),
            );
            // Channels-last, as the gradient that reaches the layer.
            ones.permute([0, 2, 3, 1])
                .contiguous()
                .permute([0, 3, 1, 2])
        });
        let run = |path: ConvPath| -> f64 {
            let start = Instant::now();
            if let Some(dy) = &dy {
                let gemm = path == ConvPath::GemmWeightGrad;
                // A failure turns the candidate off; the time then does not matter.
                if let Err(e) = conv2d_weight_grad(&x, dy, &w, self.stride, self.padding, gemm) {
                    GEMM_WEIGHT_GRAD
                        .turn_off_with("the matrix-product weight gradient", &e.to_string());
                    return if gemm { f64::INFINITY } else { 0.0 };
                }
                return start.elapsed().as_secs_f64() * 1e3;
            }
            let y = self.compute(path, &x, &w);
            if !wrt.is_empty() {
                let grads = Tensor::run_backward(&[y.sum(Kind::Float)], &wrt, false, false);
                drop(grads);
            }
            drop(y);
            start.elapsed().as_secs_f64() * 1e3
        };
        // paths[0]: libtorch's; best[i]: the least time of paths[i].
        let paths: Vec<ConvPath> = std::iter::once(ConvPath::Libtorch)
            .chain(candidates.iter().copied())
            .collect();
        let mut best = vec![f64::INFINITY; paths.len()];
        let fastest = |best: &[f64], among: &[usize]| {
            among.iter().map(|&i| best[i]).fold(f64::INFINITY, f64::min)
        };
        let mut contenders: Vec<usize> = (0..paths.len()).collect();
        for &i in &contenders {
            best[i] = run(paths[i]); // warm-up
        }
        let least = fastest(&best, &contenders);
        contenders.retain(|&i| best[i] < LOST_IN_WARM_UP * least);
        if contenders.len() > 1 {
            for &i in &contenders {
                best[i] = run(paths[i]);
            }
            // A clear loser (by more than MEASURE_AGAIN_BELOW) needs no second sample.
            let least = fastest(&best, &contenders);
            let close: Vec<usize> = contenders
                .iter()
                .copied()
                .filter(|&i| best[i] < MEASURE_AGAIN_BELOW * least)
                .collect();
            if close.len() > 1 {
                for &i in close.iter().rev() {
                    best[i] = best[i].min(run(paths[i]));
                }
            }
        }
        // The least time wins (a path that lost in the warm-up keeps its warm-up time).
        let winner = (0..paths.len())
            .min_by(|&a, &b| best[a].total_cmp(&best[b]))
            .unwrap_or(0);
        ConvChoice {
            input: key.input,
            weight: key.weight,
            stride: key.stride,
            padding: key.padding,
            channels_last: key.channels_last,
            input_grad: key.input_grad,
            weight_grad: key.weight_grad,
            libtorch_ms: best[0],
            candidate: paths[1],
            candidate_ms: best[1],
            winograd_ms: best.get(2).copied(),
            chosen: paths[winner],
            cached: false,
        }
    }

    fn compute(&self, path: ConvPath, xs: &Tensor, ws: &Tensor) -> Tensor {
        let libtorch = || {
            xs.conv2d(
                ws,
                None::<&Tensor>,
                [self.stride; 2],
                [self.padding; 2],
                [1, 1],
                1,
            )
        };
        match path {
            ConvPath::Im2col => self.im2col_forward(xs, ws),
            ConvPath::GemmWeightGrad
                if GEMM_WEIGHT_GRAD.get() && is_cpu_f32_batch(xs) && ws.kind() == Kind::Float =>
            {
                conv2d_gemm_wgrad(xs, ws, self.stride, self.padding).unwrap_or_else(|e| {
                    GEMM_WEIGHT_GRAD
                        .turn_off_with("the matrix-product weight gradient", &e.to_string());
                    libtorch()
                })
            }
            ConvPath::Winograd
                if WINOGRAD.get()
                    && is_cpu_f32_batch(xs)
                    && ws.kind() == Kind::Float
                    && (ws.size()[2], ws.size()[3], self.stride, self.padding) == (3, 3, 1, 1) =>
            {
                let (oh, ow) = self.out_size(xs.size()[2], xs.size()[3]);
                conv2d_winograd(xs, ws, winograd_tile(oh, ow)).unwrap_or_else(|e| {
                    WINOGRAD.turn_off_with("Winograd's convolution", &e.to_string());
                    libtorch()
                })
            }
            ConvPath::Winograd | ConvPath::GemmWeightGrad | ConvPath::Libtorch => libtorch(),
        }
    }

    /// The convolution as im2col and one matrix product.
    ///
    /// # Shapes
    /// `[n, c, h, w]` -> cols `[n, c*k*k, l]` -> `[n*l, c*k*k] x [c*k*k, c_out]` -> `[n, c_out, oh, ow]`
    fn im2col_forward(&self, xs: &Tensor, ws: &Tensor) -> Tensor {
        let size = xs.size();
        let (n, h, w) = (size[0], size[2], size[3]);
        let (c_out, k) = (ws.size()[0], ws.size()[2]);
        let (oh, ow) = self.out_size(h, w);
        let l = oh * ow;
        let cols = xs.im2col([k, k], [1, 1], [self.padding; 2], [self.stride; 2]); // [n, c*k*k, l]
        cols.transpose(1, 2)
            .reshape([n * l, -1])
            .mm(&ws.reshape([c_out, -1]).tr()) // [n*l, c_out]
            .reshape([n, l, c_out])
            .transpose(1, 2)
            .contiguous() // NCHW: as a view this would be channels-last, slow in later layers
            .reshape([n, c_out, oh, ow])
    }
}

impl nn::Module for Conv2d {
    fn forward(&self, xs: &Tensor) -> Tensor {
        self.compute(self.path_for(xs), xs, &self.ws)
    }
}
