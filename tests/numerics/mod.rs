//! How the tests compare floating-point results whose rounding depends on the CPU.
//!
//! libtorch picks its kernels by what the CPU can do (ATen's vector width, oneDNN's ISA; see
//! `scripts/test_kernels.py`), and other kernels sum in another order. So a float32 result is
//! never held to another float32 result by a bound tuned on one machine: both are measured
//! against the same computation in float64, whose own rounding (2^-53) is negligible here.
//!
//! - **Continuous results** (forward outputs, losses, BatchNorm's statistics, the gradient of
//!   the last layer, a convolution): a float32 path under test may be off the float64 result by
//!   at most [`MULTIPLIER`] times what a trusted float32 path (libtorch's default layout, one
//!   device, PyTorch itself) is off, plus [`FLOOR`]: PyTorch's own rule for "the same
//!   computation in float32" (`torch._dynamo.utils.same` with an fp64 reference, multiplier 3
//!   for small tensors). It scales with the conditioning of the very computation tested.
//! - **Gradients through ReLU and max-pool** (a whole training step) are not continuous: where a
//!   pre-activation lies within rounding of 0, one float32 path puts it on the other side of the
//!   kink and that element's gradient changes by its full size, for every layer before it.
//!   Measured on ResNet-18 (64 px, 8 images, about 1.5 million activations): one of them in
//!   layer3.0 at +3.8e-6 in channels-last float32 where float64 has 0 moves the whole step by
//!   2.1e-4, on AVX-512 channels-last and on AVX2 in either layout, against 2.5e-6 without it.
//!   So two paths' steps are compared in float64, where such a flip needs an activation within
//!   about 1e-16 of 0 (expected about 1e-9 times a test): they may differ by what the float32
//!   error says the computation amplifies rounding by (`trusted / U32`), times float64's
//!   rounding `U64` ([`f64_bound`]).
//!
//! Both bounds stay near rounding: a wrong stride, a missing update or a swapped learning rate
//! moves a result by a large fraction of itself, far past either.
#![allow(dead_code)] // each test file uses a part

use d2l::tch::{Kind, Tensor};

/// float32's unit roundoff, 2^-24: the relative error of one rounding.
pub const U32: f64 = (f32::EPSILON / 2.0) as f64;
/// float64's unit roundoff, 2^-53.
pub const U64: f64 = f64::EPSILON / 2.0;
/// How much worse than the trusted path a tested path may be (PyTorch's multiplier for small
/// tensors and noisy kernels, where one path can land closer to the exact result by chance).
pub const MULTIPLIER: f64 = 3.0;
/// A relative error of a few dozen roundings: below it, no float32 path can be told from another
/// (the trusted path may happen to land almost exactly on the float64 result).
pub const FLOOR: f64 = 32.0 * U32;
/// The most a trusted float32 path may be off for a comparison to mean something: three correct
/// digits. Past it the computation amplifies rounding so much that any float32 result is noise.
pub const MEANINGFUL: f64 = 1e-3;

/// `gamma_K = K u / (1 - K u)`: a float sum of `K` products with unit roundoff `u` is within
/// `gamma_K * sum |x_i w_i|` of the exact sum, whatever its order (Higham, *Accuracy and
/// Stability of Numerical Algorithms*, 2nd ed., §3.1).
pub fn gamma(k: i64, u: f64) -> f64 {
    let ku = k as f64 * u;
    assert!(ku < 0.5);
    ku / (1.0 - ku)
}

/// How much of its error bound `got` uses against `exact` (float64), element by element: the
/// largest `|got - exact| / ((gamma_K(u32) + gamma_K(u64)) * sum_abs)` (the float64 reference has
/// its own, far smaller, rounding), with `sum_abs` the sums of the products' absolute values. At
/// most 1 for a correct float32 sum of `k` products.
pub fn bound_used(got: &Tensor, exact: &Tensor, sum_abs: &Tensor, k: i64) -> f64 {
    let bound = sum_abs * (gamma(k, U32) + gamma(k, U64));
    let err = (got.to_kind(Kind::Double) - exact).abs();
    // Where the bound is 0 every product is 0, and so must the result be.
    (err / bound.clamp_min(f64::MIN_POSITIVE))
        .max()
        .double_value(&[])
}

/// The Frobenius norm of all the tensors together, summed in float64.
pub fn norm(ts: &[Tensor]) -> f64 {
    ts.iter()
        .map(|t| {
            t.to_kind(Kind::Double)
                .square()
                .sum(Kind::Double)
                .double_value(&[])
        })
        .sum::<f64>()
        .sqrt()
}

/// `||a - b|| / ||b||` over all the tensors together.
pub fn rel_dist(a: &[Tensor], b: &[Tensor]) -> f64 {
    assert_eq!(a.len(), b.len());
    let diff: Vec<Tensor> = a
        .iter()
        .zip(b)
        .map(|(a, b)| {
            assert_eq!(a.size(), b.size());
            a.to_kind(Kind::Double) - b.to_kind(Kind::Double)
        })
        .collect();
    let scale = norm(b);
    assert!(
        scale > 0.0,
        "the reference is all zeros: nothing to compare"
    );
    norm(&diff) / scale
}

/// The relative distance of two numbers, `|a - b| / |b|`.
pub fn rel(a: f64, b: f64) -> f64 {
    assert!(b != 0.0, "the reference is 0");
    (a - b).abs() / b.abs()
}

/// What each tensor moved by: `after - before`, in float64.
pub fn steps(after: &[Tensor], before: &[Tensor]) -> Vec<Tensor> {
    assert_eq!(after.len(), before.len());
    after
        .iter()
        .zip(before)
        .map(|(a, b)| a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
        .collect()
}

/// Deep copies, so that later updates of the originals leave them as they are.
pub fn copies<'a>(ts: impl IntoIterator<Item = &'a Tensor>) -> Vec<Tensor> {
    ts.into_iter().map(|t| t.detach().copy()).collect()
}

/// PyTorch's rule: the tested float32 result's error against float64 is at most
/// `MULTIPLIER * trusted + FLOOR`, and the trusted error is small enough to mean something.
/// `tested` and `trusted` are relative errors against the same float64 result.
pub fn assert_fp32_as_close(what: &str, tested: f64, trusted: f64) {
    println!("{what}: float32 off float64 by {tested:.2e} (trusted path: {trusted:.2e})");
    assert!(
        trusted <= MEANINGFUL,
        "{what}: even the trusted float32 path is off float64 by {trusted:.2e}: the test's \
         computation amplifies rounding too much to compare anything (make it better conditioned)"
    );
    let bound = MULTIPLIER * trusted + FLOOR;
    assert!(
        tested <= bound,
        "{what}: float32 off float64 by {tested:.2e}, more than {MULTIPLIER} x the trusted path's \
         {trusted:.2e} + {FLOOR:.1e} = {bound:.2e}"
    );
}

/// The bound for two float64 paths of a computation whose float32 result is off by `trusted`
/// (relative): the same amplification of rounding, `trusted / U32`, applied to `U64`.
pub fn f64_bound(trusted: f64) -> f64 {
    MULTIPLIER * (trusted / U32) * U64 + FLOOR / U32 * U64
}

/// Asserts that two float64 paths agree to [`f64_bound`].
pub fn assert_f64_as_close(what: &str, diff: f64, trusted_f32: f64) {
    let bound = f64_bound(trusted_f32);
    println!("{what}: float64 paths differ by {diff:.2e} (bound {bound:.2e})");
    assert!(
        diff <= bound,
        "{what}: float64 paths differ by {diff:.2e}, more than rounding allows ({bound:.2e})"
    );
}
