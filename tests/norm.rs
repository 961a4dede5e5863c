//! The fused BatchNorm kernel (d2l::model::batch_norm_act) against libtorch's ops: BatchNorm,
//! the addition and the ReLU as PyTorch computes them.
//!
//! Both sides compute in float32 in different summation orders, so each is measured against the
//! same computation in float64 (tests/numerics): the kernel's results (output, running
//! statistics, gradients of the input, weight, bias and identity) may be off by at most what
//! libtorch's float32 ops are off, times the usual multiplier. The gradients pass ReLU's kink;
//! inputs are random normals, so a pre-activation within float32's rounding of 0 (which would
//! move its gradient by its full size) is about a 1e-4 chance among these few thousand values.
//! Each case runs in NCHW and in channels-last (the kernel takes both, with other loops). What
//! the kernel does not take (float64, an identity in another layout than the input, one value a
//! channel, evaluation under autograd) goes to libtorch's ops and gives their values to the bit.
mod numerics;

use std::sync::Mutex;

use d2l::model::{
    batch_norm_act, batch_norm_act_uses_kernel, set_cpu_fast_batch_norm, BN_EPS, BN_MOMENTUM,
};
use d2l::tch::nn::{self, BatchNorm, VarStore};
use d2l::tch::{Device, Kind, Tensor};
use numerics::*;

/// A BatchNorm layer of `c` channels with non-trivial weight, bias and running statistics.
fn layer(vs: &VarStore, c: i64) -> BatchNorm {
    let mut bn = nn::batch_norm2d(vs.root() / "bn", c, Default::default());
    d2l::tch::no_grad(|| {
        let i = Tensor::arange(c, (Kind::Float, Device::Cpu));
        bn.ws
            .as_mut()
            .unwrap()
            .copy_(&((&i * 0.37).sin().abs() + 0.5));
        bn.bs.as_mut().unwrap().copy_(&((&i * 0.61).cos() * 0.3));
        bn.running_mean.copy_(&((&i * 0.23).sin() * 0.2));
        bn.running_var.copy_(&((&i * 0.41).cos().abs() + 0.5));
    });
    bn
}

/// What one call gives: output, running mean and variance after it, and the gradients of
/// x, weight, bias, identity (training with autograd).
struct Outcome {
    /// Whether the call took the kernel (else libtorch's ops).
    kernel: bool,
    y: Tensor,
    stats: Vec<Tensor>,
    grads: Vec<Tensor>,
}

/// The switch and the random generator are process-wide, and the tests of this file run on
/// several threads: one test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// `batch_norm_act` on copies of `x`, `identity` and the layer's tensors in `kind`; with
/// `autograd`, fed back the gradient `g` (else under `no_grad`, as evaluation runs).
#[allow(clippy::too_many_arguments)]
fn run(
    x: &Tensor,
    identity: Option<&Tensor>,
    relu: bool,
    train: bool,
    autograd: bool,
    g: &Tensor,
    kind: Kind,
    fast: bool,
) -> Outcome {
    set_cpu_fast_batch_norm(fast);
    let mut vs = VarStore::new(Device::Cpu);
    let bn = layer(&vs, x.size()[1]);
    vs.set_kind(kind);
    let x = x.to_kind(kind).detach().set_requires_grad(autograd);
    let id = identity.map(|t| t.to_kind(kind).detach().set_requires_grad(autograd));
    let forward = || batch_norm_act(&x, &bn, train, BN_MOMENTUM, BN_EPS, id.as_ref(), relu);
    // Asked as the call runs: with autograd, or under `no_grad`.
    let uses_kernel = || batch_norm_act_uses_kernel(&x, &bn, train, id.as_ref());
    let kernel = if autograd {
        uses_kernel()
    } else {
        d2l::tch::no_grad(uses_kernel)
    };
    let (y, grads) = if autograd {
        let y = forward();
        let mut inputs = vec![&x, bn.ws.as_ref().unwrap(), bn.bs.as_ref().unwrap()];
        inputs.extend(id.as_ref());
        let loss = (&y * g.to_kind(kind)).sum(kind);
        (y, Tensor::run_backward(&[loss], &inputs, false, false))
    } else {
        (d2l::tch::no_grad(forward), Vec::new())
    };
    // A failing kernel turns itself off (and the call takes libtorch's ops): say so.
    let failed = fast && !d2l::model::cpu_fast_batch_norm();
    set_cpu_fast_batch_norm(true);
    assert!(
        !failed,
        "the kernel failed and turned itself off (see its message above)"
    );
    Outcome {
        kernel,
        y: y.detach(),
        stats: copies([&bn.running_mean, &bn.running_var]),
        grads,
    }
}

fn rel_one(a: &Tensor, b: &Tensor) -> f64 {
    rel_dist(&[a.shallow_clone()], &[b.shallow_clone()])
}

#[test]
fn the_kernel_is_as_close_to_float64_as_libtorchs_ops() {
    let _serial = one_at_a_time();
    // [n, c, h, w]: ResNet's 64 px shapes at batch 4, odd sizes, a 1x1 plane, planes that are
    // not a multiple of the vector width.
    let shapes = [
        [4, 64, 16, 16],
        [4, 128, 8, 8],
        [4, 512, 2, 2],
        [3, 5, 7, 9],
        [8, 3, 1, 1],
        [2, 17, 33, 5],
    ];
    let cases = shapes
        .iter()
        .enumerate()
        .flat_map(|(i, shape)| [(i, shape, false), (i, shape, true)]);
    for (i, shape, channels_last) in cases {
        let layout = |t: Tensor| {
            if channels_last {
                d2l::train::to_channels_last(&t).unwrap()
            } else {
                t
            }
        };
        for (identity, relu) in [(false, true), (true, true), (false, false), (true, false)] {
            d2l::tch::manual_seed(100 + i as i64);
            let cpu = (Kind::Float, Device::Cpu);
            // An offset and a scale per channel, as a convolution's output has.
            let scale = Tensor::rand([1, shape[1], 1, 1], cpu) * 3.0 + 0.1;
            let x = Tensor::randn(*shape, cpu) * scale + Tensor::randn([1, shape[1], 1, 1], cpu);
            let x = layout(x);
            let id = identity.then(|| layout(Tensor::randn(*shape, cpu)));
            let g = layout(Tensor::randn(*shape, cpu));
            // Training with autograd, training without (statistics only), evaluation.
            for (train, autograd) in [(true, true), (true, false), (false, false)] {
                let what = format!(
                    "{shape:?}{}, identity {identity}, relu {relu}, {}",
                    if channels_last { " channels-last" } else { "" },
                    match (train, autograd) {
                        (true, true) => "training",
                        (true, false) => "training without autograd",
                        _ => "evaluation",
                    }
                );
                let run = |kind, fast| run(&x, id.as_ref(), relu, train, autograd, &g, kind, fast);
                let exact = run(Kind::Double, true);
                let ours = run(Kind::Float, true);
                let theirs = run(Kind::Float, false);
                assert!(
                    ours.kernel && !theirs.kernel && !exact.kernel,
                    "{what}: the paths"
                );
                assert_fp32_as_close(
                    &format!("output, {what}"),
                    rel_one(&ours.y, &exact.y),
                    rel_one(&theirs.y, &exact.y),
                );
                for (k, name) in ["running_mean", "running_var"].iter().enumerate() {
                    assert_fp32_as_close(
                        &format!("{name}, {what}"),
                        rel_one(&ours.stats[k], &exact.stats[k]),
                        rel_one(&theirs.stats[k], &exact.stats[k]),
                    );
                }
                for (k, name) in ["x", "weight", "bias", "identity"].iter().enumerate() {
                    if k < exact.grads.len() {
                        assert_fp32_as_close(
                            &format!("gradient of {name}, {what}"),
                            rel_one(&ours.grads[k], &exact.grads[k]),
                            rel_one(&theirs.grads[k], &exact.grads[k]),
                        );
                    }
                }
            }
        }
    }
}

fn bits(t: &Tensor) -> Vec<u64> {
    let v = Vec::<f64>::try_from(t.to_kind(Kind::Double).flatten(0, -1)).unwrap();
    v.into_iter().map(f64::to_bits).collect()
}

#[test]
fn what_the_kernel_does_not_take_is_libtorchs_to_the_bit() {
    let _serial = one_at_a_time();
    let cpu = (Kind::Float, Device::Cpu);
    d2l::tch::manual_seed(5);
    let x = Tensor::randn([4, 8, 5, 5], cpu);
    let g = Tensor::randn([4, 8, 5, 5], cpu);
    let same = |what: &str, x: &Tensor, id: &Tensor, g: &Tensor, train: bool| {
        let a = run(x, Some(id), true, train, true, g, x.kind(), true);
        let b = run(x, Some(id), true, train, true, g, x.kind(), false);
        assert!(!a.kernel, "{what}: libtorch's ops");
        assert_eq!(bits(&a.y), bits(&b.y), "{what}: output");
        for (s, t) in a
            .stats
            .iter()
            .zip(&b.stats)
            .chain(a.grads.iter().zip(&b.grads))
        {
            assert_eq!(bits(s), bits(t), "{what}: statistics and gradients");
        }
    };
    let x64 = x.to_kind(Kind::Double);
    same("float64", &x64, &x64, &g.to_kind(Kind::Double), true);
    let cl = |t: &Tensor| d2l::train::to_channels_last(t).unwrap();
    same("an identity in another layout", &x, &cl(&x), &g, true);
    same("an identity in another layout", &cl(&x), &x, &cl(&g), true);
    // Evaluation with autograd recording.
    same("evaluation under autograd", &x, &x, &g, false);
    // One value a channel (libtorch's C++ op takes it: variance 0, running variance NaN; it is
    // Python's `F.batch_norm` that refuses it).
    let one = |t: &Tensor| {
        t.narrow(0, 0, 1)
            .narrow(2, 0, 1)
            .narrow(3, 0, 1)
            .contiguous()
    };
    same("one value a channel", &one(&x), &one(&x), &one(&g), true);
}
