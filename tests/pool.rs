//! The CPU max pooling kernel (d2l::model::max_pool2d) against libtorch's `max_pool2d`: the
//! same values and the same gradients, bit for bit.
//!
//! Max pooling only compares and copies, so there is no rounding to allow for: any difference
//! is a different choice of maximum. The inputs hold many ties (a few levels only, and ReLU's
//! zeros), NaN, infinities and a plane of -inf only, where the choice rule shows; the gradient
//! fed back is distinct at every output, so a different index (which value of a tie, which NaN)
//! puts a different number somewhere in the input's gradient.
use d2l::model::max_pool2d;
use d2l::tch::{Device, Kind, Tensor};

/// `[n, c, h, w]` values from a few levels (ties), with NaN, +-inf, and plane 0 all -inf.
fn awkward(n: i64, c: i64, h: i64, w: i64, seed: i64) -> Tensor {
    d2l::tch::manual_seed(seed);
    let x = Tensor::randint(5, [n, c, h, w], (Kind::Float, Device::Cpu)) - 2.0;
    let u = Tensor::rand([n, c, h, w], (Kind::Float, Device::Cpu));
    let x = x
        .where_self(&u.ge(0.05), &Tensor::from(f32::NAN))
        .where_self(&u.le(0.97), &Tensor::from(f32::INFINITY))
        .where_self(&u.le(0.99), &Tensor::from(f32::NEG_INFINITY));
    let _ = x.get(0).get(0).fill_(f64::NEG_INFINITY);
    x.contiguous()
}

fn bits(t: &Tensor) -> Vec<u32> {
    let v = Vec::<f32>::try_from(t.flatten(0, -1)).unwrap();
    v.into_iter().map(f32::to_bits).collect()
}

fn libtorch(x: &Tensor, k: i64, s: i64, p: i64) -> Tensor {
    x.max_pool2d([k, k], [s, s], [p, p], [1, 1], false)
}

/// Forward values and, fed back a distinct gradient at every output, the input's gradient.
fn run(pool: impl Fn(&Tensor) -> Tensor, x: &Tensor) -> (Vec<u32>, Vec<u32>) {
    let x = x.detach().set_requires_grad(true);
    let y = pool(&x);
    let g = Tensor::arange(y.numel() as i64, (Kind::Float, Device::Cpu)).view_as(&y) + 1.0;
    let grads = Tensor::run_backward(&[(&y * &g).sum(Kind::Float)], &[&x], false, false);
    (bits(&y), bits(&grads[0]))
}

#[test]
fn the_fast_kernel_gives_libtorchs_values_and_gradients() {
    // (k, stride, padding) with padding <= k / 2 (libtorch's own limit): ResNet's 3, 2, 1 first.
    let windows = [
        (3, 2, 1),
        (2, 2, 0),
        (3, 1, 1),
        (3, 2, 0),
        (5, 3, 2),
        (1, 1, 0),
        (4, 2, 2),
    ];
    let sizes = [(32, 32), (1, 1), (2, 3), (7, 9), (33, 17), (16, 40)];
    let mut compared = 0;
    for (i, &(k, s, p)) in windows.iter().enumerate() {
        for (j, &(h, w)) in sizes.iter().enumerate() {
            if h + 2 * p < k || w + 2 * p < k {
                continue;
            }
            let x = awkward(2, 3, h, w, (i * 10 + j) as i64);
            let what = format!("k {k} stride {s} padding {p}, {h}x{w}");
            let fast = run(|x| max_pool2d(x, k, s, p), &x);
            let reference = run(|x| libtorch(x, k, s, p), &x);
            assert_eq!(fast.0, reference.0, "values, {what}");
            assert_eq!(fast.1, reference.1, "gradients, {what}");
            // Without autograd (evaluation): the same values.
            let y = d2l::tch::no_grad(|| max_pool2d(&x, k, s, p));
            assert_eq!(bits(&y), reference.0, "values without grad, {what}");
            compared += 1;
        }
    }
    assert!(compared >= 35, "only {compared} cases compared");
    assert!(
        d2l::model::cpu_fast_max_pool(),
        "the fast kernel failed and turned itself off: libtorch's was compared with itself"
    );
}

#[test]
fn resnets_pooling_of_relu_outputs_matches_too() {
    // The stem's input: ReLU's output, zeros in every window of a negative patch.
    d2l::tch::manual_seed(3);
    let x = Tensor::randn([4, 64, 32, 32], (Kind::Float, Device::Cpu)).relu();
    let _ = x.narrow(2, 0, 9).narrow(3, 0, 9).fill_(0.0);
    assert_eq!(
        run(|x| max_pool2d(x, 3, 2, 1), &x),
        run(|x| libtorch(x, 3, 2, 1), &x)
    );
}

#[test]
fn other_layouts_and_kinds_take_libtorchs_kernel_with_the_same_results() {
    let x = awkward(2, 4, 9, 11, 5);
    // Channels-last (libtorch's kernel for it is vectorised already), a strided view, float64.
    let cl = d2l::train::to_channels_last(&x).unwrap();
    assert_eq!(
        bits(&max_pool2d(&cl, 3, 2, 1)),
        bits(&libtorch(&x, 3, 2, 1))
    );
    let view = x.transpose(2, 3);
    assert_eq!(
        bits(&max_pool2d(&view, 3, 2, 1)),
        bits(&libtorch(&view, 3, 2, 1))
    );
    let x64 = x.to_kind(Kind::Double);
    let (a, b) = (max_pool2d(&x64, 3, 2, 1), libtorch(&x64, 3, 2, 1));
    assert!(a.kind() == Kind::Double && a.isnan().equal(&b.isnan()));
    assert!(a
        .nan_to_num(0.0, None, None)
        .equal(&b.nan_to_num(0.0, None, None)));
}
