//! Data parallel over several devices (here two CPU "devices", the same code path as two GPUs
//! but for the threads) and the bf16 autocast switch.
use d2l::model::resnet18;
use d2l::tch::nn::{ModuleT, VarStore};
use d2l::tch::{Device, Kind, Tensor};
use d2l::train::*;

fn batch(n: i64) -> (Tensor, Tensor) {
    batch_of(n, 32)
}

fn batch_of(n: i64, side: i64) -> (Tensor, Tensor) {
    d2l::tch::manual_seed(7);
    let x = Tensor::randn([n, 3, side, side], (Kind::Float, Device::Cpu));
    let y = Tensor::from_slice(&(0..n).map(|i| i % 2).collect::<Vec<i64>>());
    (x, y)
}

fn max_diff(a: &[(String, Tensor)], b: &[(String, Tensor)], only_trainable: bool) -> f64 {
    a.iter()
        .zip(b)
        .filter(|((_, t), _)| !only_trainable || t.requires_grad())
        .map(|((na, ta), (nb, tb))| {
            assert_eq!(na, nb);
            (ta - tb).abs().max().double_value(&[])
        })
        .fold(0.0, f64::max)
}

#[test]
fn two_devices_take_the_same_steps_as_one_device_over_the_same_chunks() {
    d2l::tch::manual_seed(0);
    let vs_a = VarStore::new(Device::Cpu);
    let a = resnet18(&vs_a.root(), 2);
    let (vs_b, b) = a.replicate(Device::Cpu).unwrap();
    assert_eq!(max_diff(&a.named_tensors(), &b.named_tensors(), false), 0.0);
    let mut opt_a = sgd(&vs_a, 0.05, 1e-3, true).unwrap();
    let mut opt_b = sgd(&vs_b, 0.05, 1e-3, true).unwrap();
    let mut dp = DataParallel::new(&a, &[Device::Cpu, Device::Cpu]).unwrap();
    assert_eq!(dp.len(), 2);
    let (x, y) = batch(8);
    for _ in 0..3 {
        let (loss_a, correct_a) = dp
            .train_batch(&x, &y, cross_entropy, &mut opt_a, &StepOptions::default())
            .unwrap();
        // One device: the same two chunks (BatchNorm sees each chunk alone, as on two GPUs),
        // their gradients accumulated, one step.
        opt_b.zero_grad();
        let (mut loss_b, mut correct_b) = (0.0, 0.0);
        for (xc, yc) in x.chunk(2, 0).iter().zip(y.chunk(2, 0).iter()) {
            let pred = b.forward_t(xc, true);
            let l = cross_entropy(&pred, yc).unwrap().sum(Kind::Float);
            l.backward();
            loss_b += l.double_value(&[]);
            correct_b += accuracy(&pred, yc).unwrap();
        }
        opt_b.step();
        assert!(
            (loss_a - loss_b).abs() <= 1e-5 * loss_b,
            "{loss_a} vs {loss_b}"
        );
        assert_eq!(correct_a, correct_b);
    }
    let diff = max_diff(&a.named_tensors(), &b.named_tensors(), true);
    assert!(diff < 1e-5, "parameters differ by {diff}");
    // The steps moved the parameters (the comparison is not vacuous).
    let (vs_c, c) = resnet18_like(&a);
    drop(vs_c);
    assert!(max_diff(&a.named_tensors(), &c.named_tensors(), true) > 1e-3);
}

fn resnet18_like(a: &d2l::model::ResNet) -> (VarStore, d2l::model::ResNet) {
    let vs = VarStore::new(Device::Cpu);
    let c = resnet18(&vs.root(), a.fc.out_features);
    (vs, c)
}

#[test]
fn a_batch_smaller_than_the_device_count_and_a_frozen_body_work() {
    let vs = VarStore::new(Device::Cpu);
    let net = resnet18(&vs.root(), 2);
    d2l::model::freeze_body(&vs);
    let before = net.named_tensors();
    let before: Vec<(String, Tensor)> = before.into_iter().map(|(n, t)| (n, t.copy())).collect();
    let mut opt = sgd(&vs, 0.1, 0.0, false).unwrap();
    let devices = [Device::Cpu, Device::Cpu, Device::Cpu];
    let mut dp = DataParallel::new(&net, &devices).unwrap();
    let (x, y) = batch(2); // torch.chunk(2 rows, 3) gives 2 chunks
    let (loss, _) = dp
        .train_batch(&x, &y, cross_entropy, &mut opt, &StepOptions::default())
        .unwrap();
    assert!(loss.is_finite() && loss > 0.0);
    for ((name, b), (_, a)) in before.iter().zip(net.named_tensors()) {
        let changed = (b - &a).abs().max().double_value(&[]) > 0.0;
        if name.starts_with("fc.") {
            assert!(changed, "{name} did not learn");
        } else if !name.contains("running_") {
            assert!(!changed, "{name} is frozen but changed");
        }
    }
}

#[test]
fn the_model_must_live_on_the_first_device() {
    let vs = VarStore::new(Device::Cpu);
    let net = resnet18(&vs.root(), 2);
    let err = DataParallel::new(&net, &[]).err().unwrap().to_string();
    assert!(err.contains("no devices"), "{err}");
    let err = train_batch_ch13(
        &net,
        &batch(2).0,
        &batch(2).1,
        cross_entropy,
        &mut sgd(&vs, 0.1, 0.0, false).unwrap(),
        &d2l::Devices(vec![Device::Cpu, Device::Cpu]),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("DataParallel"), "{err}");
}

#[test]
fn the_bf16_autocast_switch_reaches_libtorch() {
    // libtorch's own setting (thread-local), read back through the same symbols.
    assert_eq!(cuda_autocast_kind().unwrap(), Kind::Half);
    set_cuda_autocast_bf16(true).unwrap();
    assert_eq!(cuda_autocast_kind().unwrap(), Kind::BFloat16);
    set_cuda_autocast_bf16(false).unwrap();
    assert_eq!(cuda_autocast_kind().unwrap(), Kind::Half);
    // Without CUDA, with_precision just runs the closure.
    assert_eq!(with_precision(true, || Ok(3)).unwrap(), 3);
}
