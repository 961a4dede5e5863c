//! Data parallel over several devices (here CPU "devices", the same code path as several GPUs but
//! for the threads) and the bf16 autocast switch. Float32 results are measured against the same
//! computation in float64 (see tests/numerics).
mod common;
mod numerics;

use common::chapter_sgd;
use d2l::model::{resnet18, ResNet};
use d2l::tch::nn::{ModuleT, VarStore};
use d2l::tch::{Device, Kind, Tensor};
use d2l::train::*;
use numerics::*;

fn batch_of(n: i64, side: i64) -> (Tensor, Tensor) {
    d2l::tch::manual_seed(7);
    let x = Tensor::randn([n, 3, side, side], (Kind::Float, Device::Cpu));
    let y = Tensor::from_slice(&(0..n).map(|i| i % 2).collect::<Vec<i64>>());
    (x, y)
}

/// A copy of `net` in float64 (same values, same `requires_grad` flags).
fn in_f64(net: &ResNet) -> (VarStore, ResNet) {
    let (mut vs, copy) = net.replicate(Device::Cpu).unwrap();
    vs.double();
    (vs, copy)
}

/// Deep copies of the tensors whose names `keep` accepts, in the net's order.
fn tensors(net: &ResNet, keep: impl Fn(&str) -> bool) -> Vec<Tensor> {
    let named = net.named_tensors();
    copies(named.iter().filter(|(n, _)| keep(n)).map(|(_, t)| t))
}

/// BatchNorm's running means and variances; everything else is a parameter.
fn is_stat(name: &str) -> bool {
    name.contains("running_")
}

fn is_param(name: &str) -> bool {
    !is_stat(name)
}

fn is_fc(name: &str) -> bool {
    name.starts_with("fc.")
}

/// `nn.DataParallel`'s step by hand, on one device: the batch in `torch.chunk`s, each chunk's
/// forward and backward alone (BatchNorm normalises each chunk with its own statistics), the
/// gradients summed, one optimiser step; the running statistics are those the first chunk left,
/// as the first device's are. Returns the summed loss and the number of correct predictions.
fn data_parallel_by_hand(
    net: &ResNet,
    opt: &mut SGD,
    x: &Tensor,
    y: &Tensor,
    devices: i64,
) -> (f64, f64) {
    let x = x.to_kind(net.fc.weight.kind());
    opt.zero_grad().unwrap();
    let (mut loss, mut correct, mut first_stats) = (0.0, 0.0, None);
    for (xc, yc) in x.chunk(devices, 0).iter().zip(y.chunk(devices, 0).iter()) {
        let pred = net.forward_t(xc, true);
        let l = cross_entropy(&pred, yc).unwrap();
        let l = l.sum(l.kind());
        l.backward();
        loss += l.double_value(&[]);
        correct += accuracy(&pred, yc).unwrap();
        if first_stats.is_none() {
            first_stats = Some(
                running_stats(net)
                    .iter()
                    .map(|t| t.copy())
                    .collect::<Vec<_>>(),
            );
        }
    }
    opt.step().unwrap();
    d2l::tch::no_grad(|| {
        for (mut t, s) in running_stats(net).into_iter().zip(first_stats.unwrap()) {
            t.copy_(&s);
        }
    });
    (loss, correct)
}

/// BatchNorm's running means and variances (shallow: they share storage with the net).
fn running_stats(net: &ResNet) -> Vec<Tensor> {
    net.named_tensors()
        .into_iter()
        .filter(|(n, _)| is_stat(n))
        .map(|(_, t)| t)
        .collect()
}

#[test]
fn two_devices_take_the_same_steps_as_data_parallel_by_hand() {
    d2l::tch::manual_seed(0);
    let vs = VarStore::new(Device::Cpu);
    let net = resnet18(&vs.root(), 2);
    let (_vs_hand, hand) = net.replicate(Device::Cpu).unwrap();
    let (_vs64, net64) = in_f64(&net);
    let (_vs64_hand, hand64) = in_f64(&net);
    let (fc0, stats0) = (tensors(&net, is_fc), tensors(&net, is_stat));
    let (params0, devices) = (tensors(&net, is_param), [Device::Cpu, Device::Cpu]);
    let mut dp = DataParallel::new(&net, &devices).unwrap();
    let mut dp64 = DataParallel::new(&net64, &devices).unwrap();
    assert_eq!(dp.len(), 2);
    let opt = |n: &ResNet| chapter_sgd(n, 0.01, 1e-3, true);
    let (mut o, mut o_hand, mut o64, mut o64_hand) =
        (opt(&net), opt(&hand), opt(&net64), opt(&hand64));
    // 64 px, 8 images in 2 chunks of 4: the last stage's BatchNorm sees 16 values a channel.
    let (x, y) = batch_of(8, 64);
    let default = StepOptions::default();
    let mut trusted_loss = 0.0f64;
    for i in 0..3 {
        let (loss, correct) =
            train_batch_ch13(&mut dp, &x, &y, &cross_entropy, &mut o, &default).unwrap();
        let (loss_hand, correct_hand) = data_parallel_by_hand(&hand, &mut o_hand, &x, &y, 2);
        let (loss64, correct64) = train_batch_ch13(
            &mut dp64,
            &x.to_kind(Kind::Double),
            &y,
            &cross_entropy,
            &mut o64,
            &default,
        )
        .unwrap();
        let (loss64_hand, _) = data_parallel_by_hand(&hand64, &mut o64_hand, &x, &y, 2);
        trusted_loss = trusted_loss.max(rel(loss_hand, loss64_hand));
        assert_f64_as_close(
            &format!("step {i}: loss"),
            rel(loss64, loss64_hand),
            trusted_loss,
        );
        if i == 0 {
            // The first step's continuous results, in float32.
            assert_fp32_as_close(
                "step 0: loss",
                rel(loss, loss64_hand),
                rel(loss_hand, loss64_hand),
            );
            assert_eq!((correct, correct_hand), (correct64, correct64));
            for (what, keep, start) in [
                ("step 0: output layer", is_fc as fn(&str) -> bool, &fc0),
                ("step 0: running statistics", is_stat, &stats0),
            ] {
                let want = steps(&tensors(&hand64, keep), start);
                assert_fp32_as_close(
                    what,
                    rel_dist(&steps(&tensors(&net, keep), start), &want),
                    rel_dist(&steps(&tensors(&hand, keep), start), &want),
                );
            }
        }
    }
    // Three whole steps (the replicas take the new values before each), in float64.
    for (what, keep, start) in [
        (
            "3 steps: parameters",
            is_param as fn(&str) -> bool,
            &params0,
        ),
        ("3 steps: running statistics", is_stat, &stats0),
    ] {
        let want = steps(&tensors(&hand64, keep), start);
        let trusted = rel_dist(&steps(&tensors(&hand, keep), start), &want);
        println!("{what}: float32 off float64 by {trusted:.2e}");
        assert_f64_as_close(
            what,
            rel_dist(&steps(&tensors(&net64, keep), start), &want),
            trusted,
        );
    }
}

#[test]
fn a_batch_smaller_than_the_device_count_and_a_frozen_body_work() {
    d2l::tch::manual_seed(3);
    let vs = VarStore::new(Device::Cpu);
    let net = resnet18(&vs.root(), 2);
    // The chapter's second exercise: the body keeps its weights, only fc learns.
    for (name, param) in net.named_parameters() {
        if !is_fc(&name) {
            let _ = param.set_requires_grad(false);
        }
    }
    let (_vs_hand, hand) = net.replicate(Device::Cpu).unwrap();
    let (_vs64, hand64) = in_f64(&net);
    let frozen = |n: &str| !is_fc(n) && !is_stat(n);
    let (body0, fc0, stats0) = (
        tensors(&net, frozen),
        tensors(&net, is_fc),
        tensors(&net, is_stat),
    );
    let mut opt = chapter_sgd(&net, 0.1, 0.0, false);
    let mut opt_hand = chapter_sgd(&hand, 0.1, 0.0, false);
    let mut opt64 = chapter_sgd(&hand64, 0.1, 0.0, false);
    let devices = [Device::Cpu, Device::Cpu, Device::Cpu];
    let mut dp = DataParallel::new(&net, &devices).unwrap();
    // 2 images on 3 devices: torch.chunk gives 2 chunks of one image. At 64 px the last stage is
    // 2x2, so BatchNorm normalises 4 values a channel and the pooled features are not 0 (at
    // 32 px it would normalise one value to exactly 0, and fc.weight would get no gradient).
    let (x, y) = batch_of(2, 64);
    let (loss, _) = train_batch_ch13(
        &mut dp,
        &x,
        &y,
        &cross_entropy,
        &mut opt,
        &StepOptions::default(),
    )
    .unwrap();
    let (loss_hand, _) = data_parallel_by_hand(&hand, &mut opt_hand, &x, &y, 3);
    let (loss64, _) = data_parallel_by_hand(&hand64, &mut opt64, &x, &y, 3);
    assert_fp32_as_close("loss", rel(loss, loss64), rel(loss_hand, loss64));

    // The body is frozen: not one of its weights moved, not even by rounding.
    for (b, a) in body0.iter().zip(tensors(&net, frozen)) {
        assert!(a.equal(b), "a frozen weight changed");
    }
    // The head learned what exact arithmetic says it should, a step far above rounding's size.
    let fc64 = steps(&tensors(&hand64, is_fc), &fc0);
    let moved = norm(&fc64) / norm(&fc0);
    assert!(
        moved > 1e-3,
        "fc moved by {moved:.1e} of itself in float64: no real step"
    );
    assert_fp32_as_close(
        "fc step",
        rel_dist(&steps(&tensors(&net, is_fc), &fc0), &fc64),
        rel_dist(&steps(&tensors(&hand, is_fc), &fc0), &fc64),
    );
    // The running statistics are the first chunk's (the first device's), as in PyTorch.
    let stats64 = steps(&tensors(&hand64, is_stat), &stats0);
    assert_fp32_as_close(
        "running statistics",
        rel_dist(&steps(&tensors(&net, is_stat), &stats0), &stats64),
        rel_dist(&steps(&tensors(&hand, is_stat), &stats0), &stats64),
    );
}

#[test]
fn data_parallel_needs_devices_and_the_model_on_the_first_one() {
    let vs = VarStore::new(Device::Cpu);
    let net = resnet18(&vs.root(), 2);
    let err = DataParallel::new(&net, &[]).err().unwrap().to_string();
    assert!(err.contains("no devices"), "{err}");
    // A model on the CPU with a GPU first: refused before anything touches CUDA, so this runs
    // on a machine without one.
    let err = DataParallel::new(&net, &[Device::Cuda(0), Device::Cpu])
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("the model is on Cpu, the first device is Cuda(0)"),
        "{err}"
    );
    assert!(DataParallel::new(&net, &[Device::Cpu]).is_ok());
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
