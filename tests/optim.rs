//! Plain SGD's one-pass update (`sgd.cpp`) against the same update in float64.
use d2l::tch::{Device, Kind, Tensor};
use d2l::train::{ParamGroup, Trainer, SGD};

#[test]
fn plain_sgd_updates_each_group_as_pytorch_to_float32_rounding() {
    d2l::tch::manual_seed(11);
    let (lr, wd) = (0.01, 0.1);
    // 1037 values (vector bodies and a tail), a non-contiguous leaf (libtorch's operations),
    // a parameter without a gradient (left as it is, weight decay included), a second group.
    let a = Tensor::randn([1037], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let b = Tensor::randn([8, 5], (Kind::Float, Device::Cpu))
        .t_()
        .detach()
        .set_requires_grad(true);
    let unused = Tensor::randn([3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let c = Tensor::randn([70], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    assert!(!b.is_contiguous());
    let params = [&a, &b, &unused, &c];
    let before: Vec<Tensor> = params.iter().map(|p| p.detach().copy()).collect();
    let grads: Vec<Tensor> = params.iter().map(|p| p.randn_like() * 3.0).collect();
    let mut sgd = SGD::new(
        [
            ParamGroup::new(vec![
                a.shallow_clone(),
                b.shallow_clone(),
                unused.shallow_clone(),
            ]),
            ParamGroup::new(vec![c.shallow_clone()]).lr(lr * 10.0),
        ],
        lr,
        wd,
    )
    .unwrap();
    sgd.zero_grad().unwrap();
    let loss = [0, 1, 3]
        .iter()
        .map(|&i| (params[i] * &grads[i]).sum(Kind::Float))
        .fold(Tensor::from(0f32), |s, l| s + l);
    loss.backward();
    sgd.step().unwrap();
    assert!(
        unused.detach().equal(&before[2]),
        "a parameter without a gradient moved"
    );
    let u = f64::from(f32::EPSILON) / 2.0; // float32's unit roundoff
    for (i, rate) in [(0, lr), (1, lr), (3, lr * 10.0)] {
        let p = before[i].to_kind(Kind::Double);
        let g = grads[i].to_kind(Kind::Double);
        let d = &g + &p * wd;
        let exact = &p - &d * rate;
        let got = params[i].detach().to_kind(Kind::Double);
        // Two multiply-adds, fused or not: at most four roundings of these magnitudes.
        let bound = (p.abs() + (g.abs() + p.abs() * wd) * rate) * (4.0 * u);
        let excess = ((&got - &exact).abs() - bound).max().double_value(&[]);
        assert!(
            excess <= 0.0,
            "parameter {i}: off by {excess} more than float32 rounding"
        );
        assert!(!got.equal(&p), "parameter {i} did not move");
    }
}
