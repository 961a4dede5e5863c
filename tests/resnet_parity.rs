//! ResNet-18 number for number with PyTorch: eval logits, and 3 SGD steps with the chapter's two
//! parameter groups, weight decay and summed loss. PyTorch's side is written at test time by
//! tests/fixtures/resnet/make_parity.py into target/parity (scripts/test runs it first), in
//! float32 and in float64.
//!
//! Both sides' float32 results are measured against PyTorch's float64 ones (tests/numerics):
//! ours may be off by what PyTorch's own float32 run is off (the eval logits and the first loss,
//! continuous results). The training itself (3 steps, whose gradients pass ReLU's kinks) is
//! compared in float64, ours against PyTorch's, where only float64's rounding separates them.
//!
//! Both sides run direct convolutions here: Winograd's 3x3 convolution, which the autotuning may
//! choose where it times faster, is other arithmetic with a larger error bound of its own (about
//! 4e-6 of the first loss on an AMD EPYC, where PyTorch's float32 run was off by 7e-8), tested
//! against that bound layer by layer in tests/conv_winograd.rs.
mod common;
mod numerics;

use std::path::{Path, PathBuf};

use common::chapter_sgd;
use d2l::model::{read_pth, resnet18_from};
use d2l::tch::nn::{ModuleT, VarStore};
use d2l::tch::{Device, Kind, Tensor};
use d2l::train::{cross_entropy, train_batch_ch13, DataParallel, StepOptions};
use numerics::*;

fn parity_dir() -> PathBuf {
    // Direct convolutions, as PyTorch's (see the module's text).
    d2l::model::set_cpu_winograd(false);
    let dir = std::env::var_os("D2L_PARITY_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/parity"));
    assert!(
        dir.join("losses.json").exists(),
        "{} has no PyTorch fixtures: run scripts/test, or tests/fixtures/resnet/make_parity.py with the full torch install",
        dir.display()
    );
    dir
}

/// The input batch, labels, and PyTorch's eval logits in float32 and float64.
fn io(dir: &Path) -> (Tensor, Tensor, Tensor, Tensor) {
    let io = read_pth(dir.join("io.pt")).unwrap();
    let get = |n: &str| io.iter().find(|(k, _)| k == n).unwrap().1.shallow_clone();
    (get("x"), get("y"), get("logits"), get("logits64"))
}

/// The fixture's initial network, in float32 or float64.
fn init(dir: &Path, kind: Kind) -> (VarStore, d2l::model::ResNet) {
    let mut vs = VarStore::new(Device::Cpu);
    let net = resnet18_from(&vs, &dir.join("init.pth")).unwrap();
    if kind == Kind::Double {
        vs.double();
    }
    (vs, net)
}

#[test]
fn eval_logits_match_pytorch() {
    let dir = parity_dir();
    let (x, _, logits, logits64) = io(&dir);
    let forward = |kind| {
        let (_vs, net) = init(&dir, kind);
        d2l::tch::no_grad(|| net.forward_t(&x.to_kind(kind), false))
    };
    let torch_err = rel_dist(&[logits], &[logits64.shallow_clone()]);
    assert_fp32_as_close(
        "eval logits",
        rel_dist(&[forward(Kind::Float)], &[logits64.shallow_clone()]),
        torch_err,
    );
    assert_f64_as_close(
        "eval logits",
        rel_dist(&[forward(Kind::Double)], &[logits64]),
        torch_err,
    );
}

/// 3 SGD steps with the chapter's two groups, weight decay and summed loss: the losses, and the
/// state dict after.
fn three_steps(dir: &Path, kind: Kind, lr: f64, wd: f64) -> (Vec<f64>, VarStore) {
    let (vs, net) = init(dir, kind);
    let mut trainer = chapter_sgd(&net, lr, wd, true);
    let (x, y, _, _) = io(dir);
    let x = x.to_kind(kind);
    // The step train_ch13 takes, on one device.
    let mut dp = DataParallel::new(&net, &[Device::Cpu]).unwrap();
    let opts = StepOptions::default();
    let losses = (0..3)
        .map(|_| {
            train_batch_ch13(&mut dp, &x, &y, &cross_entropy, &mut trainer, &opts)
                .unwrap()
                .0
        })
        .collect();
    (losses, vs)
}

#[test]
fn three_sgd_steps_with_parameter_groups_match_pytorch() {
    let dir = parity_dir();
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("losses.json")).unwrap()).unwrap();
    let lr = expected["lr"].as_f64().unwrap();
    let wd = expected["weight_decay"].as_f64().unwrap();
    let numbers = |key: &str| -> Vec<f64> {
        expected[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect()
    };
    let (torch, torch64) = (numbers("losses"), numbers("losses64"));
    let (ours, _) = three_steps(&dir, Kind::Float, lr, wd);
    let (ours64, vs64) = three_steps(&dir, Kind::Double, lr, wd);
    println!("losses: ours {ours:?}, PyTorch {torch:?}, both in float64 {ours64:?} {torch64:?}");
    // The first loss comes before any step: a continuous result.
    assert_fp32_as_close(
        "first loss",
        rel(ours[0], torch64[0]),
        rel(torch[0], torch64[0]),
    );
    // Each loss depends on every step before it, so the amplification of rounding that PyTorch's
    // float32 error measures can only grow along them: the bound for loss i takes the largest of
    // losses 0..=i. (One float32 run may land near the float64 value by chance: on an Intel
    // Xeon with ATen's baseline kernels, loss 2's gave a bound of 4.6e-15 where loss 1's was
    // 1.5e-14, and the float64 paths differed by 7.7e-15.)
    let mut trusted: f64 = 0.0;
    for i in 0..3 {
        trusted = trusted.max(rel(torch[i], torch64[i]));
        assert_f64_as_close(&format!("loss {i}"), rel(ours64[i], torch64[i]), trusted);
    }

    // What 3 steps moved every tensor by (parameters and running statistics), ours against
    // PyTorch's, in float64; the bound from what PyTorch's float32 steps are off.
    let load = |name: &str| -> Vec<(String, Tensor)> {
        read_pth(dir.join(name))
            .unwrap()
            .into_iter()
            .filter(|(n, _)| !n.ends_with("num_batches_tracked"))
            .collect()
    };
    let (start, after, after64) = (load("init.pth"), load("after.pth"), load("after64.pth"));
    let vars = vs64.variables();
    let pick = |s: &[(String, Tensor)]| -> Vec<Tensor> {
        s.iter().map(|(_, t)| t.shallow_clone()).collect()
    };
    let start = pick(&start);
    let want = steps(&pick(&after64), &start);
    let ours: Vec<Tensor> = after64
        .iter()
        .map(|(n, _)| vars[n].shallow_clone())
        .collect();
    let torch_err = rel_dist(&steps(&pick(&after), &start), &want);
    println!("PyTorch's float32 steps off float64 by {torch_err:.2e}");
    assert!(torch_err <= MEANINGFUL, "{torch_err:.2e}");
    assert_f64_as_close(
        "3 steps, every tensor",
        rel_dist(&steps(&ours, &start), &want),
        torch_err,
    );
}
