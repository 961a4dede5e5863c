//! The CPU convolution paths against each other on ResNet-18's 3x3 stride-1 layers: forward and
//! backward milliseconds (input and weight gradients, batch 32, 64 px and 224 px crops) of
//! libtorch's convolution, the layout's other candidate (channels-last: the matrix-product weight
//! gradient; NCHW: im2col and one matrix product), and Winograd's F(2x2, 3x3) and F(4x4, 3x3),
//! the least of 4 runs each. The backward includes the `(y * g).sum()` that feeds it a gradient,
//! the same for every path. Also prints each path's largest error against the float64
//! convolution, relative to the largest float64 value (output, input and weight gradients).
//!
//! ```text
//! cargo run --release --example bench_conv [--channels-last]
//! ```
use std::time::Instant;

use d2l::model::{conv2d_winograd, Conv2d, ConvPath};
use d2l::tch::{Device, Kind, Tensor};
use d2l::train::to_channels_last;

/// Output, input gradient and weight gradient of one path.
fn run(path: &str, x: &Tensor, w: &Tensor, g: &Tensor, cl: bool) -> d2l::Result<[Tensor; 3]> {
    let x = x.detach().set_requires_grad(true);
    let w = w.detach().set_requires_grad(true);
    let conv = Conv2d {
        ws: w.shallow_clone(),
        stride: 1,
        padding: 1,
    };
    let y = match path {
        "libtorch" => conv.forward_by(ConvPath::Libtorch, &x),
        "other" if cl => conv.forward_by(ConvPath::GemmWeightGrad, &x),
        "other" => conv.forward_by(ConvPath::Im2col, &x),
        "winograd-2" => conv2d_winograd(&x, &w, 2)?,
        _ => conv2d_winograd(&x, &w, 4)?,
    };
    (&y * g).sum(y.kind()).backward();
    Ok([y.detach(), x.grad(), w.grad()])
}

fn main() -> d2l::Result<()> {
    let channels_last = std::env::args().any(|a| a == "--channels-last");
    d2l::train::keep_freed_memory();
    d2l::tch::manual_seed(0);
    let layout = |t: Tensor| -> d2l::Result<Tensor> {
        if channels_last {
            to_channels_last(&t)
        } else {
            Ok(t.contiguous())
        }
    };
    let paths = ["libtorch", "other", "winograd-2", "winograd-4"];
    println!(
        "{}, batch 32, forward + backward ms (least of 4) and largest error / largest value \
         (output, input gradient, weight gradient) against float64",
        if channels_last {
            "channels-last"
        } else {
            "NCHW"
        }
    );
    for crop in [64, 224] {
        for (c, side) in [
            (64, crop / 4),
            (128, crop / 8),
            (256, crop / 16),
            (512, crop / 32),
        ] {
            let x = layout(Tensor::randn([32, c, side, side], (Kind::Float, Device::Cpu)).relu())?;
            let w = Tensor::randn([c, c, 3, 3], (Kind::Float, Device::Cpu))
                * (2.0 / (9.0 * c as f64)).sqrt();
            let g = layout(Tensor::randn(
                [32, c, side, side],
                (Kind::Float, Device::Cpu),
            ))?;
            let (x64, w64, g64) = (
                x.to_kind(Kind::Double),
                w.to_kind(Kind::Double),
                g.to_kind(Kind::Double),
            );
            let exact = run("libtorch", &x64, &w64, &g64, channels_last)?;
            let mut line = format!("{crop:3} px, {c:3} ch at {side:2}x{side:<2}:");
            for path in paths {
                let mut best = f64::INFINITY;
                let mut errors = [0.0; 3];
                for _ in 0..4 {
                    let start = Instant::now();
                    let got = run(path, &x, &w, &g, channels_last)?;
                    best = best.min(start.elapsed().as_secs_f64() * 1e3);
                    for (e, (a, b)) in errors.iter_mut().zip(got.iter().zip(&exact)) {
                        let diff = (a.to_kind(Kind::Double) - b).abs().max().double_value(&[]);
                        *e = diff / b.abs().max().double_value(&[]);
                    }
                }
                line += &format!(
                    "  {path} {best:6.1} ({:.0e} {:.0e} {:.0e})",
                    errors[0], errors[1], errors[2]
                );
            }
            println!("{line}");
        }
    }
    Ok(())
}
