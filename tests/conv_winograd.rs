//! Winograd's 3x3 convolution ([`ConvPath::Winograd`], `winograd.cpp`): output, input gradient
//! and weight gradient held to the float64 convolution within the error bound of Winograd's own
//! arithmetic, for F(2x2, 3x3) and F(4x4, 3x3), on ResNet's kinds of shapes and odd ones (sizes
//! that are not a multiple of the tile, channel counts that are not a multiple of the 16 lanes,
//! 1x1 and 2x2 images); NCHW and channels-last inputs; errors for bad input; and the autotuning
//! times it beside the other candidates and `forward` takes the one kept. One test function: the
//! paths are process-wide switches, and tests in one binary run in parallel.
//!
//! The bound: Winograd's result is `A^T [sum over channels of (G g G^T) * (B^T d B)] A` for each
//! output tile, a chain of sums and products. Computed in float32, each result is within
//! `gamma_N * S` of the exact one, where `S` is the same chain on the absolute values of the
//! data and of every matrix, and `N` the most roundings along the chain (Higham, *Accuracy and
//! Stability of Numerical Algorithms*, 2nd ed., §3.1 and §3.5): at most `T + 1` for each of the
//! two passes of a `T x T` transform (T = m + 2; one rounding a product, one a sum), the same for
//! the output's two passes, `2 * (3 + 1) + 1` for the filter's (the +1: G's 1/6 and 1/24 are not
//! floats), and `K + 1` for the sum of `K` products. `S` is larger than the direct sum's
//! `sum |x w|` (B's and A's entries reach 5 and 8 for m = 4): Winograd's results are less exact
//! than direct convolution's, by a factor this bound states and the test measures (printed).
use d2l::model::{
    clear_conv_choices, conv2d, conv2d_winograd, conv_choices, set_conv_autotune,
    set_cpu_gemm_weight_grad, set_cpu_winograd, winograd_tile, Conv2d, ConvPath,
};
use d2l::tch::nn::{Module, VarStore};
use d2l::tch::{Device, Kind, Tensor};
use d2l::train::to_channels_last;

mod numerics;
use numerics::bound_used;

/// Lavin and Gray's matrices (B^T, G, A^T) for F(m x m, 3 x 3), in float64.
fn matrices(m: i64) -> (Tensor, Tensor, Tensor) {
    let t = |rows: &[&[f64]]| {
        let flat: Vec<f64> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::from_slice(&flat).view([rows.len() as i64, -1])
    };
    if m == 2 {
        (
            t(&[
                &[1., 0., -1., 0.],
                &[0., 1., 1., 0.],
                &[0., -1., 1., 0.],
                &[0., 1., 0., -1.],
            ]),
            t(&[
                &[1., 0., 0.],
                &[0.5, 0.5, 0.5],
                &[0.5, -0.5, 0.5],
                &[0., 0., 1.],
            ]),
            t(&[&[1., 1., 1., 0.], &[0., 1., -1., -1.]]),
        )
    } else {
        (
            t(&[
                &[4., 0., -5., 0., 1., 0.],
                &[0., -4., -4., 1., 1., 0.],
                &[0., 4., -4., -1., 1., 0.],
                &[0., -2., -1., 2., 1., 0.],
                &[0., 2., -1., -2., 1., 0.],
                &[0., 4., 0., -5., 0., 1.],
            ]),
            t(&[
                &[1. / 4., 0., 0.],
                &[-1. / 6., -1. / 6., -1. / 6.],
                &[-1. / 6., 1. / 6., -1. / 6.],
                &[1. / 24., 1. / 12., 1. / 6.],
                &[1. / 24., -1. / 12., 1. / 6.],
                &[0., 0., 1.],
            ]),
            t(&[
                &[1., 1., 1., 1., 1., 0.],
                &[0., 1., -1., 2., -2., 0.],
                &[0., 1., 1., 4., 4., 0.],
                &[0., 1., -1., 8., -8., 1.],
            ]),
        )
    }
}

/// The (m+2) x (m+2) input tiles of `d` ([n, c, h, w], padding 1): [n, c, th, tw, T, T].
fn input_tiles(d: &Tensor, m: i64) -> Tensor {
    let s = d.size();
    let (h, w) = (s[2], s[3]);
    let (th, tw) = ((h + m - 1) / m, (w + m - 1) / m);
    d.constant_pad_nd([1, tw * m + 1 - w, 1, th * m + 1 - h])
        .unfold(2, m + 2, m)
        .unfold(3, m + 2, m)
}

/// Winograd's chain on absolute values (float64): `S` for the output of `conv(d, g)`.
fn forward_abs(d: &Tensor, g: &Tensor, m: i64) -> Tensor {
    let (bt, gm, at) = matrices(m);
    let (bt, gm, at) = (bt.abs(), gm.abs(), at.abs());
    let v = bt.matmul(&input_tiles(&d.abs(), m)).matmul(&bt.tr()); // [n, c, th, tw, T, T]
    let u = gm.matmul(&g.abs()).matmul(&gm.tr()); // [k, c, T, T]
    let prod = Tensor::einsum("nctwij,kcij->nktwij", &[v, u], None::<i64>);
    let y = at.matmul(&prod).matmul(&at.tr()); // [n, k, th, tw, m, m]
    let s = y.size();
    let (h, w) = (d.size()[2], d.size()[3]);
    y.permute([0, 1, 2, 4, 3, 5])
        .reshape([s[0], s[1], s[2] * m, s[3] * m])
        .narrow(2, 0, h)
        .narrow(3, 0, w)
}

/// `S` for the weight gradient of `conv(d, g)` for the output gradient `dy`.
fn weight_grad_abs(d: &Tensor, dy: &Tensor, m: i64) -> Tensor {
    let (bt, gm, at) = matrices(m);
    let (bt, gm, at) = (bt.abs(), gm.abs(), at.abs());
    let v = bt.matmul(&input_tiles(&d.abs(), m)).matmul(&bt.tr());
    let s = dy.size();
    let (th, tw) = ((s[2] + m - 1) / m, (s[3] + m - 1) / m);
    let dy_tiles = dy
        .abs()
        .constant_pad_nd([0, tw * m - s[3], 0, th * m - s[2]])
        .unfold(2, m, m)
        .unfold(3, m, m); // [n, k, th, tw, m, m]
    let dm = at.tr().matmul(&dy_tiles).matmul(&at);
    let du = Tensor::einsum("nctwij,nktwij->kcij", &[v, dm], None::<i64>);
    gm.tr().matmul(&du).matmul(&gm)
}

/// The most roundings along the chain, for sums of `terms` products (module text).
fn roundings(m: i64, terms: i64) -> i64 {
    let t = m + 2;
    4 * (t + 1) + 9 + terms + 1
}

fn cl(t: &Tensor) -> Tensor {
    to_channels_last(t).unwrap()
}

#[test]
fn winograd_is_within_its_bound_and_taken_where_timed_faster() {
    d2l::tch::manual_seed(0);
    // (batch, c_in, c_out, h, w)
    let cases = [
        (2, 16, 16, 8, 8),
        (3, 5, 7, 9, 11), // tail lanes, partial tiles
        (2, 20, 24, 2, 2),
        (2, 3, 4, 1, 1),
        (2, 8, 8, 13, 6),
        (1, 32, 48, 16, 16),
    ];
    let mut worst = [0.0f64; 2];
    for (n, c_in, c_out, h, w) in cases {
        let w0 = Tensor::randn([c_out, c_in, 3, 3], (Kind::Float, Device::Cpu)) / 4.0;
        let x = Tensor::randn([n, c_in, h, w], (Kind::Float, Device::Cpu));
        let g = Tensor::randn([n, c_out, h, w], (Kind::Float, Device::Cpu));
        let (x64, w64, g64) = (
            x.to_kind(Kind::Double).set_requires_grad(true),
            w0.to_kind(Kind::Double).set_requires_grad(true),
            g.to_kind(Kind::Double),
        );
        let y64 = x64.conv2d(&w64, None::<&Tensor>, [1, 1], [1, 1], [1, 1], 1);
        let grads = Tensor::run_backward(
            &[(&y64 * &g64).sum(Kind::Double)],
            &[&x64, &w64],
            false,
            false,
        );
        let (y64, dx64, dw64) = (y64.detach(), &grads[0], &grads[1]);
        let flipped = w0.to_kind(Kind::Double).flip([2, 3]).transpose(0, 1);
        for (i, m) in [2i64, 4].into_iter().enumerate() {
            let case = format!("F({m}x{m}, 3x3) on {n}x{c_in}x{h}x{w} -> {c_out}");
            let mut outputs = Vec::new();
            for layout in [false, true] {
                let xin = if layout { cl(&x) } else { x.shallow_clone() };
                let xg = xin.detach().set_requires_grad(true);
                let wg = w0.detach().set_requires_grad(true);
                let y = conv2d_winograd(&xg, &wg, m).unwrap();
                // The output keeps the input's memory format (1x1 images have both).
                if h * w > 1 {
                    assert_eq!(y.is_contiguous(), !layout, "{case}: output layout");
                }
                (&y * &g).sum(Kind::Float).backward();
                outputs.push((y.detach(), xg.grad().copy(), wg.grad().copy()));
            }
            let (y, dx, dw) = &outputs[0];
            // NCHW inputs are made channels-last first: the same arithmetic, the same bits.
            assert!(
                y.equal(&outputs[1].0),
                "{case}: NCHW and channels-last outputs differ"
            );
            assert!(dx.equal(&outputs[1].1), "{case}: input gradients differ");
            assert!(dw.equal(&outputs[1].2), "{case}: weight gradients differ");

            let used = [
                (
                    "output",
                    bound_used(
                        y,
                        &y64,
                        &forward_abs(&x64.detach(), &w64.detach(), m),
                        roundings(m, 9 * c_in),
                    ),
                ),
                (
                    "input gradient",
                    bound_used(
                        dx,
                        dx64,
                        &forward_abs(&g64, &flipped, m),
                        roundings(m, 9 * c_out),
                    ),
                ),
                (
                    "weight gradient",
                    bound_used(
                        dw,
                        dw64,
                        &weight_grad_abs(&x64.detach(), &g64, m),
                        roundings(m, n * h * w),
                    ),
                ),
            ];
            for (what, used) in used {
                println!("{case}: {what}: {used:.4} of the bound");
                assert!(
                    used <= 1.0,
                    "{case}: {what}: {used:.2} x Winograd's float32 error bound"
                );
                worst[i] = worst[i].max(used);
            }
            // Without autograd: the same forward.
            let y_nograd = d2l::tch::no_grad(|| conv2d_winograd(&x, &w0, m).unwrap());
            assert!(y_nograd.equal(y), "{case}: forward without autograd");
        }
    }
    println!(
        "worst use of the bound: F(2x2) {:.4}, F(4x4) {:.4}",
        worst[0], worst[1]
    );

    // The tile rule: fewest multiplications.
    assert_eq!(winograd_tile(2, 2), 2);
    assert_eq!(winograd_tile(4, 4), 4);
    assert_eq!(winograd_tile(7, 7), 4);
    assert_eq!(winograd_tile(56, 56), 4);

    // Bad input: an error that says what, not a crash.
    let x = Tensor::randn([2, 4, 5, 5], (Kind::Float, Device::Cpu));
    let w = Tensor::randn([4, 4, 3, 3], (Kind::Float, Device::Cpu));
    let bad = [
        (
            x.to_kind(Kind::Double),
            w.shallow_clone(),
            4,
            "input must be a 4-d float CPU tensor",
        ),
        (
            x.shallow_clone(),
            w.narrow(1, 0, 3),
            4,
            "weight must be float [c_out, 4, 3, 3]",
        ),
        (
            x.shallow_clone(),
            Tensor::randn([4, 4, 5, 5], (Kind::Float, Device::Cpu)),
            4,
            "3, 3]",
        ),
        (
            x.shallow_clone(),
            w.shallow_clone(),
            3,
            "tile size m must be 2 or 4, got 3",
        ),
    ];
    for (x, w, m, says) in bad {
        let err = conv2d_winograd(&x, &w, m).unwrap_err().to_string();
        assert!(
            err.contains("conv2d_winograd") && err.contains(says),
            "{err}"
        );
    }

    autotuning_times_it_beside_the_other_candidates();
}

/// With autotuning on, a 3x3 stride-1 shape is timed once with Winograd beside the layout's
/// other candidate (channels-last training: the matrix-product weight gradient; NCHW: im2col
/// where its buffer is small enough), every path on the forward and backward; the least time is
/// kept and `forward` takes it. Other strides, autotuning off and the switch off leave it out.
fn autotuning_times_it_beside_the_other_candidates() {
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
    assert!(choice.channels_last && choice.weight_grad, "{choice:?}");
    assert_eq!(choice.candidate, ConvPath::GemmWeightGrad);
    let winograd_ms = choice.winograd_ms.expect("Winograd was timed");
    let times = [
        (ConvPath::Libtorch, choice.libtorch_ms),
        (ConvPath::GemmWeightGrad, choice.candidate_ms),
        (ConvPath::Winograd, winograd_ms),
    ];
    for (_, ms) in times {
        assert!(ms.is_finite() && ms > 0.0, "{choice:?}");
    }
    let fastest = times.iter().min_by(|a, b| a.1.total_cmp(&b.1)).unwrap().0;
    assert_eq!((choice.chosen, path), (fastest, fastest), "{choice:?}");
    // `forward` takes it: its output is that path's, bit for bit.
    let by_path = conv.forward_by(fastest, &x);
    assert!(
        conv.forward(&x).equal(&by_path),
        "forward did not take {fastest:?}"
    );
    assert_eq!(conv_choices().len(), 1, "timed once");

    // Evaluation of the same shape: another choice, Winograd against libtorch's.
    let _ = d2l::tch::no_grad(|| conv.path_for(&x));
    let eval = conv_choices()
        .into_iter()
        .find(|c| !c.weight_grad)
        .expect("an evaluation choice");
    assert_eq!(
        (eval.candidate, eval.winograd_ms),
        (ConvPath::Winograd, None),
        "{eval:?}"
    );
    // NCHW: im2col and Winograd.
    let _ = conv.path_for(&x.contiguous());
    let nchw = conv_choices()
        .into_iter()
        .find(|c| !c.channels_last)
        .expect("an NCHW choice");
    assert_eq!(nchw.candidate, ConvPath::Im2col);
    assert!(nchw.winograd_ms.is_some(), "{nchw:?}");
    // With the other channels-last candidate off, Winograd is the only one.
    clear_conv_choices();
    set_cpu_gemm_weight_grad(false);
    let _ = conv.path_for(&x);
    let only = conv_choices();
    assert_eq!(only.len(), 1);
    assert_eq!(
        (only[0].candidate, only[0].winograd_ms),
        (ConvPath::Winograd, None)
    );
    set_cpu_gemm_weight_grad(true);

    // Not a candidate: stride 2, autotuning off, the switch off.
    let strided = Conv2d {
        ws: conv.ws.shallow_clone(),
        stride: 2,
        padding: 1,
    };
    let _ = strided.path_for(&x);
    assert!(conv_choices()
        .iter()
        .all(|c| c.stride == 1 || c.winograd_ms.is_none()));
    assert!(conv_choices()
        .iter()
        .all(|c| c.stride == 1 || c.candidate != ConvPath::Winograd));
    clear_conv_choices();
    set_conv_autotune(false);
    assert_ne!(conv.path_for(&x), ConvPath::Winograd);
    set_conv_autotune(true);
    set_cpu_winograd(false);
    let _ = conv.path_for(&x);
    assert!(conv_choices().iter().all(|c| c.winograd_ms.is_none()));
    assert!(conv_choices()
        .iter()
        .all(|c| c.chosen != ConvPath::Winograd));
    set_cpu_winograd(true);
    clear_conv_choices();
}
