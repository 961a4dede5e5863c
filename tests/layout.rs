//! CPU training chooses NCHW or channels-last by timing its first steps (d2l::train's layout
//! trial), keeps the quicker and gives the model back in the standard layout; switched off, it
//! trains in NCHW throughout.
mod common;

use common::train_tiny_epoch;
use d2l::model::resnet18;
use d2l::tch::nn::VarStore;
use d2l::tch::Device;
use d2l::train::*;

fn quickest(times: &[f64]) -> f64 {
    times.iter().copied().fold(f64::INFINITY, f64::min)
}

// One test: the switch is process-wide.
#[test]
fn cpu_training_times_both_layouts_and_keeps_the_quicker() {
    let dir = tempfile::tempdir().unwrap();
    // Timed here, whatever an earlier run kept (tests/tuning.rs tests the cache).
    d2l::tuning::set_tuning_cache(false);
    set_layout_autotune(true);
    let (h, _vs, net) = train_tiny_epoch(dir.path());
    let trial = h
        .layout_trial
        .clone()
        .expect("a CPU float32 run has a layout trial");
    assert_eq!(trial.batch, 4);
    // 8 full batches: 2 warm-ups and 2 or 3 timed steps in each layout, always as many in
    // each when it decides.
    let (n, c) = (trial.nchw_s.len(), trial.channels_last_s.len());
    assert!(n == c && (2..=3).contains(&n), "{trial:?}");
    let chosen = trial.channels_last.expect("decided within 8 steps");
    let (nchw, cl) = (quickest(&trial.nchw_s), quickest(&trial.channels_last_s));
    assert_eq!(chosen, cl < nchw, "{trial:?}");
    // It stopped at the first clear difference: 1.05x after two steps each (one step each
    // never decides; the third pair decides whatever the difference).
    let ratio = nchw.max(cl) / nchw.min(cl);
    if n == 2 {
        assert!(ratio >= 1.05, "{trial:?}");
    }
    // The timed steps are d2l's timed steps.
    let timed: f64 = trial.nchw_s.iter().chain(&trial.channels_last_s).sum();
    assert!(
        timed > 0.0 && timed <= h.timing.step_s,
        "{trial:?} {:?}",
        h.timing
    );
    assert_eq!(h.config["channels_last"], format!("{chosen} (timed)"));
    // The model comes back in the standard layout, trained.
    for (name, t) in net.named_tensors() {
        assert!(t.is_contiguous(), "{name} strides {:?}", t.stride());
    }
    assert!(h.train_loss.is_finite() && h.train_loss > 0.0);
    let json = serde_json::to_string(&h).unwrap();
    let back: History = serde_json::from_str(&json).unwrap();
    assert_eq!(back.layout_trial, Some(trial));

    // Switched off: NCHW throughout, no trial.
    set_layout_autotune(false);
    let dir = tempfile::tempdir().unwrap();
    let (h, _vs, _net) = train_tiny_epoch(dir.path());
    assert_eq!(h.layout_trial, None);
    assert_eq!(h.config["channels_last"], "false");
    // Histories saved before the trial existed still load.
    let mut old: serde_json::Value = serde_json::to_value(&h).unwrap();
    old.as_object_mut().unwrap().remove("layout_trial");
    assert_eq!(
        serde_json::from_value::<History>(old).unwrap().layout_trial,
        None
    );
}

#[test]
fn channels_last_and_back_keep_every_value() {
    let vs = VarStore::new(Device::Cpu);
    let net = resnet18(&vs.root(), 2);
    let before: Vec<_> = net
        .named_tensors()
        .into_iter()
        .map(|(n, t)| (n, t.copy()))
        .collect();
    convert_channels_last(&net).unwrap();
    let w = &net.named_tensors()[0].1; // conv1.weight [64, 3, 7, 7]
    assert_eq!(w.stride(), [147, 1, 21, 3]);
    convert_contiguous(&net).unwrap();
    for ((name, t), (_, b)) in net.named_tensors().into_iter().zip(&before) {
        assert!(t.is_contiguous(), "{name}");
        assert!(t.equal(b), "{name} changed");
    }
}
