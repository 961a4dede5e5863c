//! train_ch13 on a tiny synthetic run: history, print format, plot-point schedule, metrics.
mod common;

use common::{chapter_sgd, tiny_loaders};
use d2l::model::resnet18;
use d2l::tch::nn::VarStore;
use d2l::tch::{Device, Tensor};
use d2l::train::*;

#[test]
fn plot_points_follow_d2l_without_dividing_by_zero() {
    // 16 batches: every 3rd, and the last.
    assert_eq!(plot_points(16), [2, 5, 8, 11, 14, 15]);
    // Fewer than 5 batches: every batch (d2l would divide by zero).
    assert_eq!(plot_points(3), [0, 1, 2]);
    assert_eq!(plot_points(1), [0]);
    assert!(plot_points(0).is_empty());
}

#[test]
fn accumulator_timer_and_accuracy_behave_like_d2l() {
    let mut m = Accumulator::new(2);
    m.add(&[1.0, 2.0]);
    m.add(&[0.5, 1.0]);
    assert_eq!((m[0], m[1]), (1.5, 3.0));
    m.reset();
    assert_eq!(m[0], 0.0);
    // An interval lasts at least the sleep inside it (sleep's contract, a monotonic clock), and
    // start() restarts: the second interval fits in the time after the first one ended.
    let mut t = Timer::new();
    t.start();
    std::thread::sleep(std::time::Duration::from_millis(30));
    let first = t.stop();
    assert!(first >= 0.030, "{first}");
    let after_first = std::time::Instant::now();
    t.start();
    let second = t.stop();
    assert!(
        second <= after_first.elapsed().as_secs_f64(),
        "{second} includes the first"
    );
    assert_eq!((t.sum(), t.avg()), (first + second, (first + second) / 2.0));
    let y_hat = Tensor::from_slice(&[0.1f32, 0.9, 0.8, 0.2, 0.3, 0.7]).reshape([3, 2]);
    let y = Tensor::from_slice(&[1i64, 0, 0]);
    assert_eq!(accuracy(&y_hat, &y).unwrap(), 2.0);
}

#[test]
fn tiny_run_gives_history_and_d2l_result_lines() {
    let dir = tempfile::tempdir().unwrap();
    d2l::set_figures_dir(dir.path().join("figures"));
    let (train_iter, test_iter) = tiny_loaders(dir.path(), 16);
    let vs = VarStore::new(Device::Cpu);
    let net = resnet18(&vs.root(), 2);
    let mut trainer = chapter_sgd(&net, 1e-3, 1e-3, true);
    let devices = d2l::Devices(vec![Device::Cpu]);

    let history = train_ch13(
        &net,
        &train_iter,
        &test_iter,
        cross_entropy,
        &mut trainer,
        2,
        &devices,
    )
    .unwrap();
    // 12 images in batches of 4: 3 batches, a point after each, then test accuracy each epoch.
    let xs: Vec<f64> = history.points.iter().map(|p| p.x).collect();
    assert_eq!(
        xs,
        [
            1.0 / 3.0,
            2.0 / 3.0,
            1.0,
            1.0,
            1.0 + 1.0 / 3.0,
            1.0 + 2.0 / 3.0,
            2.0,
            2.0
        ]
    );
    assert!(history.points[3].test_acc.is_some() && history.points[3].train_loss.is_none());
    assert!((0.0..=1.0).contains(&history.train_acc) && (0.0..=1.0).contains(&history.test_acc));
    assert!(history.train_loss > 0.0 && history.examples_per_sec > 0.0);
    let [first, second] = history.result_lines();
    let expect = format!(
        "loss {:.3}, train acc {:.3}, test acc {:.3}",
        history.train_loss, history.train_acc, history.test_acc
    );
    assert_eq!(first, expect);
    assert!(
        first.starts_with("loss ") && first.split(", ").count() == 3,
        "{first}"
    );
    assert!(
        second.ends_with(" examples/sec on [device(type='cpu')]"),
        "{second}"
    );
    // Where the wall time went: steps (d2l's timer), waiting for batches, evaluation, all inside
    // the run's wall time and each taken (2 epochs of 3 training batches and 1 test batch).
    let t = &history.timing;
    assert!(
        t.step_s > 0.0 && t.data_wait_s > 0.0 && t.eval_s > 0.0,
        "{t:?}"
    );
    assert!(t.step_s + t.data_wait_s + t.eval_s <= t.wall_s, "{t:?}");
    // The same quotient in float64 (the step times summed in another order): a few roundings.
    assert!(
        (history.examples_per_sec - 2.0 * 12.0 / t.step_s).abs() < 1e-12 * history.examples_per_sec
    );
    let json = serde_json::to_string(&history).unwrap();
    assert!(json.contains("\"examples_per_sec\"") && json.contains("\"data_wait_s\""));
    // Histories saved before `timing` existed still load.
    let mut old: serde_json::Value = serde_json::from_str(&json).unwrap();
    old.as_object_mut().unwrap().remove("timing");
    let old: History = serde_json::from_value(old).unwrap();
    assert_eq!(old.timing, Timing::default());
    assert_eq!(history.config["batch_size"], "4");
    assert_eq!(history.config["num_batches"], "3");
    assert_eq!(history.config["train_examples"], "12");
    // Outside a notebook the curves were saved, PNG and SVG.
    let figs: Vec<String> = std::fs::read_dir(dir.path().join("figures"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        figs.iter()
            .any(|f| f.starts_with("train_ch13-") && f.ends_with(".png")),
        "{figs:?}"
    );
    assert!(figs.iter().any(|f| f.ends_with(".svg")), "{figs:?}");
    let curves = history.animator();
    assert_eq!(curves.lines().len(), 3);
    assert_eq!(curves.lines()[2].len(), 2); // test acc once an epoch
}

#[test]
fn train_ch13_on_two_devices_splits_batches_and_names_both() {
    let dir = tempfile::tempdir().unwrap();
    // 64 px: split in chunks of 2 images, the last stage (2x2) still gives BatchNorm 8 values
    // a channel (at 16 px it would normalise 2 values to exactly -1 and 1, whatever the input,
    // and train on rounding noise).
    let (train_iter, test_iter) = tiny_loaders(dir.path(), 64);
    d2l::tch::manual_seed(0);
    let vs = VarStore::new(Device::Cpu);
    let net = resnet18(&vs.root(), 2);
    let (_vs_dp, by_hand) = net.replicate(Device::Cpu).unwrap();
    let (_vs_one, one_device) = net.replicate(Device::Cpu).unwrap();
    let params = |n: &d2l::model::ResNet| -> Vec<Tensor> {
        let named = n.named_tensors();
        let params = named
            .into_iter()
            .filter(|(name, _)| !name.contains("running_"));
        params.map(|(_, t)| t).collect()
    };
    let start: Vec<Tensor> = params(&net).iter().map(|t| t.copy()).collect();
    let two = d2l::Devices(vec![Device::Cpu, Device::Cpu]);
    let opts = TrainOptions {
        no_figure: true,
        quiet: true,
        ..TrainOptions::default()
    };
    let run = |net: &d2l::model::ResNet, devices: &d2l::Devices| {
        train_iter.set_epoch(0);
        let mut trainer = chapter_sgd(net, 1e-3, 1e-3, true);
        train_ch13_with(
            net,
            &train_iter,
            &test_iter,
            cross_entropy,
            &mut trainer,
            1,
            devices,
            &opts,
        )
        .unwrap()
    };
    let history = run(&net, &two);
    assert_eq!(history.devices, "[device(type='cpu'), device(type='cpu')]");
    assert!(history.train_loss.is_finite() && history.points.len() == 4);

    // The same epoch's batches (the loader replays epoch 0), each split by DataParallel over the
    // two devices: the same computation on the same inputs, so the same bits.
    train_iter.set_epoch(0);
    let mut trainer = chapter_sgd(&by_hand, 1e-3, 1e-3, true);
    let mut dp = DataParallel::new(&by_hand, &two).unwrap();
    for batch in &train_iter {
        let (x, y) = batch.unwrap();
        train_batch_ch13(
            &mut dp,
            &x,
            &y,
            &cross_entropy,
            &mut trainer,
            &StepOptions::default(),
        )
        .unwrap();
    }
    let tensors = |n: &d2l::model::ResNet| -> Vec<Tensor> {
        n.named_tensors().into_iter().map(|(_, t)| t).collect()
    };
    for ((name, a), b) in net.named_tensors().iter().zip(tensors(&by_hand)) {
        assert!(
            a.equal(&b),
            "{name}: train_ch13 on two devices is not DataParallel's step"
        );
    }
    // And the split matters: on one device BatchNorm normalises whole batches of 4, not chunks
    // of 2, and the epoch's parameters end far from there (not by rounding: by a tenth of the
    // step or more).
    run(&one_device, &d2l::Devices(vec![Device::Cpu]));
    let moved = |n: &d2l::model::ResNet| -> Vec<Tensor> {
        params(n).iter().zip(&start).map(|(a, b)| a - b).collect()
    };
    let (two_moved, one_moved) = (moved(&net), moved(&one_device));
    let diff: f64 = two_moved
        .iter()
        .zip(&one_moved)
        .map(|(a, b)| {
            (a - b)
                .square()
                .sum(d2l::tch::Kind::Double)
                .double_value(&[])
        })
        .sum::<f64>()
        .sqrt();
    let size: f64 = two_moved
        .iter()
        .map(|a| a.square().sum(d2l::tch::Kind::Double).double_value(&[]))
        .sum::<f64>()
        .sqrt();
    println!(
        "one device and two differ by {:.3} of the step",
        diff / size
    );
    assert!(
        diff > 0.1 * size,
        "one device and two differ by {diff:.2e} of {size:.2e}"
    );
}
