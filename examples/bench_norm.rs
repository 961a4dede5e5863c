//! The fused BatchNorm kernel against libtorch's ops, one layer at a time: forward and backward
//! milliseconds of `relu(bn(x) + identity)` in training (batch 32, ResNet-18's shapes at 64 px
//! and 224 px crops), alternating the kernel on and off (`set_cpu_fast_batch_norm`). The
//! backward includes the `(y * g).sum()` that feeds it a gradient, the same on both sides.
//!
//! ```text
//! cargo run --release --example bench_norm [--channels-last]
//! ```
//! `--channels-last`: the batches (input and gradient) in channels-last strides, as a model
//! converted by the layout trial runs them.
use std::time::Instant;

use d2l::model::{batch_norm_act, set_cpu_fast_batch_norm, BN_EPS, BN_MOMENTUM};
use d2l::tch::nn::{self, VarStore};
use d2l::tch::{Device, Kind, Tensor};

fn main() {
    let channels_last = std::env::args().skip(1).any(|a| a == "--channels-last");
    let layout = |t: Tensor| {
        if channels_last {
            d2l::train::to_channels_last(&t).expect("a 4-d tensor")
        } else {
            t
        }
    };
    let vs = VarStore::new(Device::Cpu);
    let cpu = (Kind::Float, Device::Cpu);
    let shapes = [
        ("64 px stem", [32, 64, 32, 32]),
        ("64 px layer1", [32, 64, 16, 16]),
        ("64 px layer2", [32, 128, 8, 8]),
        ("64 px layer3", [32, 256, 4, 4]),
        ("64 px layer4", [32, 512, 2, 2]),
        ("224 px stem", [32, 64, 112, 112]),
        ("224 px layer1", [32, 64, 56, 56]),
        ("224 px layer4", [32, 512, 7, 7]),
    ];
    for (name, shape) in shapes {
        let bn = nn::batch_norm2d(vs.root() / name, shape[1], Default::default());
        let x = layout(Tensor::randn(shape, cpu)).set_requires_grad(true);
        let g = layout(Tensor::randn(shape, cpu));
        let reps = if shape[2] > 50 { 4 } else { 40 };
        // Kernel on, off, on, off: each figure the mean of `reps` calls after 2 warm-up calls.
        for fast in [true, false, true, false] {
            set_cpu_fast_batch_norm(fast);
            let (mut forward, mut backward) = (0.0, 0.0);
            for rep in 0..reps + 2 {
                let t = Instant::now();
                let y = batch_norm_act(&x, &bn, true, BN_MOMENTUM, BN_EPS, None, true);
                let f = t.elapsed().as_secs_f64();
                let t = Instant::now();
                let _ = Tensor::run_backward(&[(&y * &g).sum(Kind::Float)], &[&x], false, false);
                if rep >= 2 {
                    forward += f;
                    backward += t.elapsed().as_secs_f64();
                }
            }
            println!(
                "{name:14} {shape:?} {:9} forward {:8.3} ms  backward {:8.3} ms",
                if fast { "kernel" } else { "libtorch" },
                forward / reps as f64 * 1e3,
                backward / reps as f64 * 1e3
            );
        }
    }
}
