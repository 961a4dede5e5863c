//! The matrix-product weight gradient of channels-last convolutions
//! ([`ConvPath::GemmWeightGrad`]): held to the float64 weight gradient within the error bound of
//! a float32 sum of products (as in tests/conv.rs) for ResNet's kinds of layers (3x3 at strides 1
//! and 2, 1x1 at stride 2, 7x7 at stride 2 with padding 3) and odd ones (non-square inputs,
//! windows over every edge, im2col chunks that end inside an image); the forward and the input
//! gradient stay libtorch's own; the autotuning times it against libtorch's on channels-last
//! training shapes only and `forward` takes the chosen path. One test function: the paths are
//! process-wide switches, and tests in one binary run in parallel.
use d2l::model::{
    clear_conv_choices, conv2d, conv2d_weight_grad, conv_choices, set_conv_autotune,
    set_cpu_gemm_weight_grad, set_cpu_im2col, set_cpu_winograd, Conv2d, ConvPath,
};
use d2l::tch::nn::VarStore;
use d2l::tch::{Device, Kind, Tensor};
use d2l::train::to_channels_last;

mod numerics;
use numerics::bound_used;

fn cl(t: &Tensor) -> Tensor {
    to_channels_last(t).unwrap()
}

/// Output, input gradient and weight gradient by `path` for the upstream gradient `g`.
fn run(c: &Conv2d, path: ConvPath, x: &Tensor, g: &Tensor) -> (Tensor, Tensor, Tensor) {
    let x = x.detach().set_requires_grad(true);
    let mut w = c.ws.shallow_clone();
    w.zero_grad();
    let y = c.forward_by(path, &x);
    (&y * g).sum(Kind::Float).backward();
    (y.detach(), x.grad().copy(), w.grad().copy())
}

#[test]
fn gemm_weight_gradient_is_correct_and_taken_where_timed_faster() {
    d2l::tch::manual_seed(0);
    // Winograd's candidate has its own test (tests/conv_winograd.rs).
    set_cpu_winograd(false);
    // (batch, c_in, c_out, h, w, kernel, stride, padding)
    let cases = [
        (4, 16, 16, 12, 12, 3, 1, 1),
        (3, 8, 16, 13, 9, 3, 2, 1),
        (3, 8, 16, 13, 9, 1, 2, 0),
        (2, 3, 8, 23, 17, 7, 2, 3),
        (5, 32, 32, 2, 2, 3, 1, 1), // every window over the edges
        (2, 8, 4, 64, 64, 3, 1, 1), // 8192 rows of 72 floats: chunks end inside an image
    ];
    for (n, c_in, c_out, h, w, k, s, p) in cases {
        let case = format!("{n}x{c_in}x{h}x{w} -> {c_out}, k{k} s{s} p{p}");
        let vs = VarStore::new(Device::Cpu);
        let conv = conv2d(vs.root(), c_in, c_out, k, s, p);
        let x = cl(&Tensor::randn([n, c_in, h, w], (Kind::Float, Device::Cpu)));
        let (oh, ow) = ((h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1);
        let g = cl(&Tensor::randn(
            [n, c_out, oh, ow],
            (Kind::Float, Device::Cpu),
        ));

        let gemm = conv2d_weight_grad(&x, &g, &conv.ws, s, p, true).unwrap();
        assert_eq!(gemm.size(), conv.ws.size(), "{case}");
        // Against float64 (libtorch's own weight gradient, in double).
        let w64 = conv.ws.to_kind(Kind::Double);
        let (x64, g64) = (x.to_kind(Kind::Double), g.to_kind(Kind::Double));
        let exact = conv2d_weight_grad(&x64, &g64, &w64, s, p, false).unwrap();
        let sum_abs = conv2d_weight_grad(&x64.abs(), &g64.abs(), &w64, s, p, false).unwrap();
        let used = bound_used(&gemm, &exact, &sum_abs, n * oh * ow);
        println!("{case}: matrix products' weight gradient: {used:.4} of the bound");
        assert!(used <= 1.0, "{case}: {used:.2} x the float32 error bound");
        // NCHW inputs give the same (they are made channels-last first).
        let nchw = conv2d_weight_grad(&x.contiguous(), &g.contiguous(), &conv.ws, s, p, true);
        assert!(nchw.unwrap().equal(&gemm), "{case}: NCHW inputs");

        // In training: libtorch's output and input gradient, this weight gradient.
        let ours = run(&conv, ConvPath::GemmWeightGrad, &x, &g);
        let native = run(&conv, ConvPath::Libtorch, &x, &g);
        assert!(ours.0.equal(&native.0), "{case}: output");
        assert!(ours.1.equal(&native.1), "{case}: input gradient");
        assert!(ours.2.equal(&gemm), "{case}: weight gradient");
    }
    // A double input is an error that says what, not a crash.
    let vs = VarStore::new(Device::Cpu);
    let conv = conv2d(vs.root(), 4, 4, 3, 1, 1);
    let x = Tensor::randn([2, 4, 5, 5], (Kind::Double, Device::Cpu));
    let err = conv2d_weight_grad(&x, &x, &conv.ws.to_kind(Kind::Double), 1, 1, true).unwrap_err();
    assert!(err.to_string().contains("conv2d_weight_grad"), "{err}");

    autotuning_times_it_on_channels_last_training_shapes_only();
}

/// With autotuning on, a channels-last training shape is timed once (libtorch's weight gradient
/// against the matrix products) and the faster kept; evaluation, NCHW inputs, autotuning off and
/// the switches off keep libtorch's (or the NCHW candidate) without timing this one.
fn autotuning_times_it_on_channels_last_training_shapes_only() {
    d2l::tuning::set_tuning_cache(false);
    set_conv_autotune(true);
    clear_conv_choices();
    let vs = VarStore::new(Device::Cpu);
    let conv = conv2d(vs.root(), 16, 16, 3, 1, 1);
    let x = cl(&Tensor::randn([4, 16, 12, 12], (Kind::Float, Device::Cpu)));
    let before = x.copy();
    let path = conv.path_for(&x);
    assert!(x.equal(&before), "measuring changed the input");
    let choices = conv_choices();
    assert_eq!(choices.len(), 1, "{choices:?}");
    let choice = &choices[0];
    assert!(
        choice.channels_last && choice.weight_grad && !choice.input_grad,
        "{choice:?}"
    );
    assert_eq!(choice.candidate, ConvPath::GemmWeightGrad);
    for ms in [choice.libtorch_ms, choice.candidate_ms] {
        assert!(ms.is_finite() && ms > 0.0, "{choice:?}");
    }
    let faster = if choice.candidate_ms < choice.libtorch_ms {
        ConvPath::GemmWeightGrad
    } else {
        ConvPath::Libtorch
    };
    assert_eq!((choice.chosen, path), (faster, faster), "{choice:?}");
    // `forward` takes it: its weight gradient is that path's, bit for bit.
    let g = cl(&Tensor::randn([4, 16, 12, 12], (Kind::Float, Device::Cpu)));
    let chosen = run(&conv, faster, &x, &g).2;
    let mut w = conv.ws.shallow_clone();
    w.zero_grad();
    (d2l::tch::nn::Module::forward(&conv, &x) * &g)
        .sum(Kind::Float)
        .backward();
    assert!(w.grad().equal(&chosen), "forward did not take {faster:?}");
    assert_eq!(conv_choices().len(), 1, "timed once");

    // Not timed, libtorch's: evaluation, autotuning off, either switch off.
    assert_eq!(d2l::tch::no_grad(|| conv.path_for(&x)), ConvPath::Libtorch);
    set_conv_autotune(false);
    assert_eq!(conv.path_for(&x), ConvPath::Libtorch);
    set_conv_autotune(true);
    set_cpu_gemm_weight_grad(false);
    assert_eq!(conv.path_for(&x), ConvPath::Libtorch);
    set_cpu_gemm_weight_grad(true);
    set_cpu_im2col(false);
    assert_eq!(conv.path_for(&x), ConvPath::Libtorch);
    set_cpu_im2col(true);
    assert_eq!(conv_choices().len(), 1);
    // The same shape in NCHW is another choice, with im2col as its candidate.
    let _ = conv.path_for(&x.contiguous());
    let choices = conv_choices();
    assert_eq!(choices.len(), 2);
    assert!(choices
        .iter()
        .any(|c| !c.channels_last && c.candidate == ConvPath::Im2col));
    clear_conv_choices();
}
