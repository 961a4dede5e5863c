//! ResNet's convolution: the CPU im2col path for small outputs gives libtorch's convolution,
//! values and gradients, and is taken exactly where documented. One test function: the path is a
//! process-wide switch, and tests in one binary run in parallel.
use d2l::model::{conv2d, set_cpu_im2col, Conv2d};
use d2l::tch::nn::{Module, VarStore};
use d2l::tch::{Device, Kind, Tensor};

/// Output, input gradient and weight gradient for a fixed upstream gradient.
fn run(c: &Conv2d, x: &Tensor, g: &Tensor) -> (Tensor, Tensor, Tensor) {
    let x = x.detach().set_requires_grad(true);
    let mut w = c.ws.shallow_clone();
    w.zero_grad();
    let y = c.forward(&x);
    (&y * g).sum(Kind::Float).backward();
    (y.detach(), x.grad().copy(), w.grad().copy())
}

fn rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    let scale = b.abs().max().double_value(&[]).max(1e-12);
    (a - b).abs().max().double_value(&[]) / scale
}

#[test]
fn im2col_path_matches_libtorch_convolution_where_it_is_taken() {
    d2l::tch::manual_seed(0);
    // (c_in, c_out, input side, kernel, stride, padding, im2col expected): ResNet-18's layers
    // at 32 and 64 px, and the first sizes past the threshold.
    let cases = [
        (64, 64, 1, 3, 1, 1, true),
        (32, 64, 2, 3, 2, 1, true),
        (32, 64, 2, 1, 2, 0, true),
        (32, 32, 2, 3, 1, 1, true),
        (32, 64, 4, 3, 2, 1, true),
        (16, 16, 4, 3, 1, 1, false),
        (3, 16, 8, 7, 2, 3, false),
        (8, 8, 3, 3, 1, 1, false), // 3x3 = 9 positions
    ];
    for (c_in, c_out, side, k, stride, padding, expect) in cases {
        let vs = VarStore::new(Device::Cpu);
        let c = conv2d(vs.root(), c_in, c_out, k, stride, padding);
        let x = Tensor::randn([5, c_in, side, side], (Kind::Float, Device::Cpu));
        let case = format!("{c_in}->{c_out} {side}x{side} k{k} s{stride} p{padding}");
        assert_eq!(c.uses_im2col(&x), expect, "{case}");

        set_cpu_im2col(false);
        assert!(!c.uses_im2col(&x), "{case}: switched off");
        let g = Tensor::randn(c.forward(&x).size(), (Kind::Float, Device::Cpu));
        let native = run(&c, &x, &g);
        set_cpu_im2col(true);
        let ours = run(&c, &x, &g);

        let libtorch = x.conv2d(&c.ws, None::<&Tensor>, [stride; 2], [padding; 2], [1, 1], 1);
        assert_eq!(native.0.size(), libtorch.size(), "{case}");
        assert!(
            rel_diff(&native.0, &libtorch) == 0.0,
            "{case}: switched off is libtorch's"
        );
        assert_eq!(ours.0.size(), libtorch.size(), "{case}");
        assert!(ours.0.is_contiguous(), "{case}: NCHW output");
        for (what, a, b) in [
            ("output", &ours.0, &native.0),
            ("input gradient", &ours.1, &native.1),
            ("weight gradient", &ours.2, &native.2),
        ] {
            let d = rel_diff(a, b);
            assert!(
                d < 1e-5,
                "{case}: {what} differs by {d:.2e} of its largest value"
            );
        }
    }

    // Channels-last inputs keep libtorch's convolution (it keeps their layout).
    let vs = VarStore::new(Device::Cpu);
    let c = conv2d(vs.root(), 8, 8, 3, 1, 1);
    let x = Tensor::randn([4, 8, 2, 2], (Kind::Float, Device::Cpu));
    let nhwc = d2l::train::to_channels_last(&x).unwrap();
    assert!(c.uses_im2col(&x) && !nhwc.is_contiguous() && !c.uses_im2col(&nhwc));
}
