//! ResNet's convolution: the CPU im2col path gives libtorch's convolution, values and gradients;
//! with autotuning off it is taken exactly where documented, with autotuning on each new shape is
//! timed once, the faster path is kept and used. One test function: the path is a process-wide
//! switch, and tests in one binary run in parallel.
//!
//! Both paths are float32 sums in different orders (and libtorch's order depends on the CPU's
//! kernels), so neither is held to the other: each is held to the float64 convolution within the
//! error bound of a float32 sum of products, whatever its order (Higham, *Accuracy and Stability
//! of Numerical Algorithms*, 2nd ed., §3.1): `|fl(s) - s| <= gamma_K * sum |x_i w_i|`, with
//! `gamma_K = K u / (1 - K u)` for `K` products and `u = 2^-24`.
use d2l::model::{
    clear_conv_choices, conv2d, conv_choices, set_conv_autotune, set_cpu_im2col, set_cpu_winograd,
    Conv2d, ConvPath, IM2COL_MAX_BYTES,
};
use d2l::tch::nn::{Module, VarStore};
use d2l::tch::{Device, Kind, Tensor};

mod numerics;
use numerics::bound_used;

/// Output, input gradient and weight gradient for a fixed upstream gradient.
fn run(c: &Conv2d, x: &Tensor, g: &Tensor) -> (Tensor, Tensor, Tensor) {
    let x = x.detach().set_requires_grad(true);
    let mut w = c.ws.shallow_clone();
    w.zero_grad();
    let y = c.forward(&x);
    (&y * g).sum(Kind::Float).backward();
    (y.detach(), x.grad().copy(), w.grad().copy())
}

/// The same convolution in float64.
fn in_f64(c: &Conv2d) -> Conv2d {
    Conv2d {
        ws: c.ws.to_kind(Kind::Double).detach().set_requires_grad(true),
        stride: c.stride,
        padding: c.padding,
    }
}

#[test]
fn im2col_path_matches_libtorch_convolution_where_it_is_taken() {
    d2l::tch::manual_seed(0);
    // Winograd's candidate has its own test (tests/conv_winograd.rs).
    set_cpu_winograd(false);
    // The fixed rule first (im2col for at most 4 output positions).
    set_conv_autotune(false);
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
            native.0.equal(&libtorch),
            "{case}: switched off is libtorch's own call"
        );
        assert_eq!(ours.0.size(), libtorch.size(), "{case}");
        assert!(ours.0.is_contiguous(), "{case}: NCHW output");

        // The float64 results, and the sums of absolute products that bound float32's error:
        // the same convolution of |x| and |w| with upstream |g|.
        let (x64, g64) = (x.to_kind(Kind::Double), g.to_kind(Kind::Double));
        let exact = run(&in_f64(&c), &x64, &g64);
        let abs_c = Conv2d {
            ws: c
                .ws
                .abs()
                .to_kind(Kind::Double)
                .detach()
                .set_requires_grad(true),
            stride,
            padding,
        };
        let sum_abs = run(&abs_c, &x64.abs(), &g64.abs());
        // Products a result sums: an output c_in k k, an input pixel's gradient at most
        // c_out k k, a weight's gradient n out_h out_w.
        let out = native.0.size();
        let terms = [c_in * k * k, c_out * k * k, out[0] * out[2] * out[3]];
        for (path, got) in [("libtorch", &native), ("im2col", &ours)] {
            for (i, what) in ["output", "input gradient", "weight gradient"]
                .iter()
                .enumerate()
            {
                let (got, want, abs) = match i {
                    0 => (&got.0, &exact.0, &sum_abs.0),
                    1 => (&got.1, &exact.1, &sum_abs.1),
                    _ => (&got.2, &exact.2, &sum_abs.2),
                };
                let used = bound_used(got, want, abs, terms[i]);
                println!("{case}: {path} {what}: {used:.4} of the bound");
                assert!(
                    used <= 1.0,
                    "{case}: {path} {what} is off float64 by {used:.2} x the float32 error bound"
                );
            }
        }
    }

    // Channels-last inputs never take im2col (libtorch's convolution keeps their layout).
    let vs = VarStore::new(Device::Cpu);
    let c = conv2d(vs.root(), 8, 8, 3, 1, 1);
    let x = Tensor::randn([4, 8, 2, 2], (Kind::Float, Device::Cpu));
    let nhwc = d2l::train::to_channels_last(&x).unwrap();
    assert!(c.uses_im2col(&x) && !nhwc.is_contiguous() && !c.uses_im2col(&nhwc));

    autotuned_choice_is_measured_once_and_used(&c);
}

/// With autotuning on: a new shape is timed once (forward and backward when gradients are
/// recorded; forward alone under `no_grad`), the faster path is recorded and `forward` gives that
/// path's output bit for bit; the input is left as it was and no random number is drawn; a shape
/// whose im2col buffer is over the limit is not timed at all.
fn autotuned_choice_is_measured_once_and_used(c: &Conv2d) {
    // Measured here, and not kept (tests/tuning.rs tests the cache).
    d2l::tuning::set_tuning_cache(false);
    let x = Tensor::randn([4, 8, 2, 2], (Kind::Float, Device::Cpu));
    // The two paths' outputs: the fixed rule takes im2col here, libtorch's when switched off.
    set_conv_autotune(false);
    assert!(c.uses_im2col(&x));
    let by_im2col = c.forward(&x);
    set_cpu_im2col(false);
    let by_libtorch = c.forward(&x);
    set_cpu_im2col(true);

    set_conv_autotune(true);
    clear_conv_choices();
    let before = x.copy();
    d2l::tch::manual_seed(11);
    let y = c.forward(&x);
    let drawn = Tensor::randn([8], (Kind::Float, Device::Cpu));
    d2l::tch::manual_seed(11);
    let expected = Tensor::randn([8], (Kind::Float, Device::Cpu));
    assert!(drawn.equal(&expected), "measuring drew random numbers");
    assert!(x.equal(&before), "measuring changed the input");

    let choices = conv_choices();
    assert_eq!(choices.len(), 1, "{choices:?}");
    let choice = &choices[0];
    assert_eq!(choice.input, [4, 8, 2, 2]);
    assert_eq!(choice.weight, [8, 8, 3, 3]);
    assert!(choice.weight_grad && !choice.input_grad, "{choice:?}");
    assert!(!choice.channels_last && choice.candidate == ConvPath::Im2col);
    for ms in [choice.libtorch_ms, choice.candidate_ms] {
        assert!(ms.is_finite() && ms > 0.0, "{choice:?}");
    }
    let faster = if choice.candidate_ms < choice.libtorch_ms {
        ConvPath::Im2col
    } else {
        ConvPath::Libtorch
    };
    assert_eq!(choice.chosen, faster, "{choice:?}");
    let want = if faster == ConvPath::Im2col {
        &by_im2col
    } else {
        &by_libtorch
    };
    assert!(
        y.equal(want),
        "forward did not take the chosen path ({faster:?})"
    );
    assert_eq!(c.path_for(&x), faster);

    // Seen again: not timed again. Under no_grad: a new choice, forward only.
    let _ = c.forward(&x);
    assert_eq!(conv_choices().len(), 1);
    let _ = d2l::tch::no_grad(|| c.forward(&x));
    let choices = conv_choices();
    assert_eq!(choices.len(), 2);
    assert!(choices.iter().any(|ch| !ch.weight_grad && !ch.input_grad));
    // An input that needs a gradient is another choice (its backward is timed too).
    let xg = x.detach().set_requires_grad(true);
    let _ = c.forward(&xg);
    assert!(conv_choices()
        .iter()
        .any(|ch| ch.input_grad && ch.weight_grad));
    assert_eq!(conv_choices().len(), 3);

    // Over the im2col buffer limit: libtorch's, untimed.
    let side = 64;
    let big = Tensor::zeros([16, 8, side, side], (Kind::Float, Device::Cpu));
    assert!(16 * 8 * 9 * side * side * 4 > IM2COL_MAX_BYTES);
    assert_eq!(c.path_for(&big), ConvPath::Libtorch);
    assert_eq!(conv_choices().len(), 3);
    clear_conv_choices();
    assert!(conv_choices().is_empty());
}
