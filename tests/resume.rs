//! Surviving an interrupted run: train_ch13 with a checkpoint, killed with SIGKILL after an
//! epoch and started again, gives the uninterrupted run's history and weights, bit for bit.
mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{child, tiny_loaders, wait_child};
use d2l::model::resnet18;
use d2l::tch::nn::VarStore;
use d2l::tch::{Device, Kind, Reduction, Tensor};
use d2l::train::*;

const EPOCHS: usize = 4;

/// The child's run: 4 epochs (or `D2L_TEST_EPOCHS`) of the chapter's two groups with momentum
/// 0.9 (so that the optimiser has state), checkpointed under `D2L_TEST_STEM`; prints the
/// history's numbers and each tensor's sum.
fn train_run(stem: &Path, data: &Path) -> d2l::Result<String> {
    // The same convolution path and memory layout in every process (a timed choice could
    // differ between the uninterrupted run and the resumed one, and so would the last bits).
    d2l::model::set_conv_autotune(false);
    set_layout_autotune(false);
    d2l::tch::set_num_threads(1);
    let epochs = std::env::var("D2L_TEST_EPOCHS").map_or(EPOCHS, |v| v.parse().unwrap());
    let (train_iter, test_iter) = tiny_loaders(data, 32);
    let vs = VarStore::new(Device::Cpu);
    d2l::tch::manual_seed(7);
    let net = resnet18(&vs.root(), 2);
    let body = net
        .named_parameters()
        .into_iter()
        .filter(|(n, _)| !n.starts_with("fc."))
        .map(|(_, p)| p)
        .collect();
    let groups = [
        ParamGroup::new(body),
        ParamGroup::new(net.fc.parameters()).lr(0.1),
    ];
    let mut trainer = SGD::with_momentum(groups, 0.01, 0.9, 1e-3)?;
    let opts = TrainOptions {
        no_figure: true,
        checkpoint: Some(stem.to_owned()),
        ..Default::default()
    };
    let loss = CrossEntropyLoss::new(Reduction::None);
    let h = train_ch13_with(
        &net,
        &train_iter,
        &test_iter,
        loss,
        &mut trainer,
        epochs,
        &d2l::Devices(vec![Device::Cpu]),
        &opts,
    )?;
    let sums: Vec<f64> = net
        .named_tensors()
        .iter()
        .map(|(_, t)| t.to_kind(Kind::Double).sum(Kind::Double).double_value(&[]))
        .collect();
    Ok(serde_json::json!({
        "points": h.points,
        "train_loss": h.train_loss,
        "train_acc": h.train_acc,
        "test_acc": h.test_acc,
        "sums": sums,
    })
    .to_string())
}

#[test]
fn child_process() {
    if std::env::var("D2L_TEST_ROLE").as_deref() == Ok("train") {
        let var = |n: &str| std::env::var(n).unwrap();
        common::report(train_run(
            Path::new(&var("D2L_TEST_STEM")),
            Path::new(&var("D2L_TEST_DATA")),
        ));
    }
}

fn run(stem: &Path, data: &Path, epochs: usize) -> common::ChildRun {
    let child = child("train")
        .env("D2L_TEST_STEM", stem)
        .env("D2L_TEST_DATA", data)
        .env("D2L_TEST_EPOCHS", epochs.to_string())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_child(child)
}

fn epochs_done(stem: &Path) -> Option<usize> {
    let (_, json) = training_state_paths(stem);
    let text = std::fs::read_to_string(json).ok()?;
    let state: TrainState = serde_json::from_str(&text).ok()?;
    Some(state.epochs_done)
}

#[test]
fn a_run_killed_after_an_epoch_resumes_to_the_uninterrupted_history() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // The uninterrupted run.
    let whole = run(&dir.path().join("whole/run"), &data, EPOCHS);
    let expected = whole
        .result()
        .unwrap_or_else(|| panic!("{whole:?}"))
        .to_owned();
    assert_eq!(epochs_done(&dir.path().join("whole/run")), Some(EPOCHS));

    // The same run, killed with SIGKILL once its second epoch is saved.
    let stem = dir.path().join("killed/run");
    let mut child = child("train")
        .env("D2L_TEST_STEM", &stem)
        .env("D2L_TEST_DATA", &data)
        .env("D2L_TEST_EPOCHS", EPOCHS.to_string())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while epochs_done(&stem).is_none_or(|e| e < 2) {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before its second epoch"
        );
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "no second epoch in 300 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let at_kill = epochs_done(&stem).unwrap();
    assert!(
        (2..EPOCHS).contains(&at_kill),
        "killed after epoch {at_kill}: the kill came too late to test resuming"
    );

    // Started again: it resumes after the saved epoch and ends where the whole run ended.
    let resumed = run(&stem, &data, EPOCHS);
    assert!(
        resumed
            .stdout
            .contains(&format!("after epoch {at_kill}/{EPOCHS}")),
        "{}",
        resumed.stdout
    );
    let got = resumed.result().unwrap_or_else(|| panic!("{resumed:?}"));
    let (got, want): (serde_json::Value, serde_json::Value) = (
        serde_json::from_str(got).unwrap(),
        serde_json::from_str(&expected).unwrap(),
    );
    assert_eq!(
        got, want,
        "resumed history and weights differ from the uninterrupted run's"
    );
    println!(
        "resumed after epoch {at_kill} of {EPOCHS}: the same history and weights, bit for bit"
    );

    // A finished checkpoint gives its history at once; another run's arguments are refused.
    let again = run(&stem, &data, EPOCHS);
    let again: serde_json::Value = serde_json::from_str(again.result().unwrap()).unwrap();
    assert_eq!(again, want);
    let other = run(&stem, &data, EPOCHS + 1);
    let err = other.error().unwrap_or_else(|| panic!("{other:?}"));
    assert!(
        err.contains("checkpoint of another run") && err.contains("num_epochs"),
        "{err}"
    );
}

#[test]
fn sgd_momentum_follows_pytorchs_update_and_its_state_round_trips() {
    // torch.optim.SGD(momentum=0.9, weight_decay=0.1), lr 0.5, on loss = sum(w * g) with a
    // fixed g: d = g + 0.1 w; buf = d, then 0.9 buf + d; w -= 0.5 buf. In float64 the same
    // operations give the same numbers up to rounding of a few operations.
    let w = Tensor::from_slice(&[1.0f64, -2.0, 0.5]).set_requires_grad(true);
    let g = [0.3f64, -0.7, 1.1];
    let mut sgd =
        SGD::with_momentum([ParamGroup::new(vec![w.shallow_clone()])], 0.5, 0.9, 0.1).unwrap();
    let (mut ref_w, mut buf) = ([1.0f64, -2.0, 0.5], None::<[f64; 3]>);
    for _ in 0..3 {
        sgd.zero_grad().unwrap();
        (&w * Tensor::from_slice(&g)).sum(Kind::Double).backward();
        sgd.step().unwrap();
        let d: Vec<f64> = (0..3).map(|i| g[i] + 0.1 * ref_w[i]).collect();
        let b = match buf {
            None => [d[0], d[1], d[2]],
            Some(b) => [0.9 * b[0] + d[0], 0.9 * b[1] + d[1], 0.9 * b[2] + d[2]],
        };
        for i in 0..3 {
            ref_w[i] -= 0.5 * b[i];
        }
        buf = Some(b);
    }
    let got = Vec::<f64>::try_from(&w.detach()).unwrap();
    for i in 0..3 {
        assert!(
            (got[i] - ref_w[i]).abs() <= 1e-14 * (1.0 + ref_w[i].abs()),
            "{got:?} {ref_w:?}"
        );
    }
    // The state: one buffer, equal to the reference's; loading it elsewhere gives the same.
    let state = sgd.state().unwrap();
    assert_eq!(state.len(), 1);
    assert_eq!(state[0].0, "momentum_buffer.0");
    let w2 = Tensor::zeros([3], (Kind::Double, Device::Cpu)).set_requires_grad(true);
    let mut other = SGD::with_momentum([ParamGroup::new(vec![w2])], 0.5, 0.9, 0.1).unwrap();
    other.load_state(&state).unwrap();
    assert!(other.state().unwrap()[0].1.equal(&state[0].1));
    // Plain SGD keeps no state, and refuses buffers.
    let plain = SGD::new([ParamGroup::new(vec![w.shallow_clone()])], 0.5, 0.0).unwrap();
    assert!(plain.state().unwrap().is_empty());
    let mut plain = plain;
    assert!(plain.load_state(&state).is_err());
}

#[test]
fn an_optimiser_without_saveable_state_is_refused_before_training() {
    use d2l::tch::nn::OptimizerConfig;
    let dir = tempfile::tempdir().unwrap();
    let (train_iter, test_iter) = tiny_loaders(dir.path(), 32);
    let vs = VarStore::new(Device::Cpu);
    let net = resnet18(&vs.root(), 2);
    let mut adam = d2l::tch::nn::Adam::default().build(&vs, 1e-3).unwrap();
    let stem = dir.path().join("ckpt/run");
    let opts = TrainOptions {
        quiet: true,
        no_figure: true,
        checkpoint: Some(stem.clone()),
        ..Default::default()
    };
    let err = train_ch13_with(
        &net,
        &train_iter,
        &test_iter,
        cross_entropy,
        &mut adam,
        1,
        &d2l::Devices(vec![Device::Cpu]),
        &opts,
    )
    .unwrap_err();
    assert!(err.to_string().contains("d2l::train::SGD"), "{err}");
    assert!(!stem.parent().unwrap().exists(), "it wrote before refusing");
}
