//! Ctrl-C during training: a clean stop between two steps, no half-written files. Its own test
//! binary, since the stop request is process-wide.
use d2l::data::synthetic::{make_hotdog_dataset, HotdogConfig};
use d2l::data::transforms::*;
use d2l::data::{DataLoader, ImageFolder};
use d2l::model::{resnet18, save_checkpoint, Classifier};
use d2l::tch::nn::VarStore;
use d2l::tch::Device;
use d2l::train::*;

#[test]
fn ctrl_c_stops_training_between_steps_and_a_checkpoint_can_still_be_saved() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = HotdogConfig {
        train_per_class: 4,
        test_per_class: 2,
        min_side: 24,
        max_side: 40,
        seed: 3,
    };
    let root = make_hotdog_dataset(dir.path(), &cfg).unwrap();
    let t = || {
        Compose::new()
            .then(Resize::new(16, 16))
            .then(ToTensor)
            .then(Normalize::imagenet())
    };
    let train = DataLoader::new(ImageFolder::new(root.join("train")).unwrap(), t(), 2).unwrap();
    let test = DataLoader::new(ImageFolder::new(root.join("test")).unwrap(), t(), 2).unwrap();
    let vs = VarStore::new(Device::Cpu);
    let net = resnet18(&vs.root(), 2);
    let mut trainer = SGD::new([ParamGroup::new(net.parameters())], 1e-3, 0.0).unwrap();
    let devices = d2l::Devices(vec![Device::Cpu]);
    let opts = TrainOptions {
        no_figure: true,
        ..TrainOptions::default()
    };

    let run = |trainer: &mut _, epochs| {
        train_ch13_with(
            &net,
            &train,
            &test,
            cross_entropy,
            trainer,
            epochs,
            &devices,
            &opts,
        )
    };

    // A real SIGINT to this process, through the handler.
    install_ctrl_c_handler().unwrap();
    let pid = std::process::id().to_string();
    let status = std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap();
    assert!(status.success());
    // Delivery is asynchronous: wait for it, up to 10 s (a bound against hanging, not a timing).
    for _ in 0..1000 {
        if stop_requested() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(stop_requested(), "SIGINT did not reach the handler");

    let err = run(&mut trainer, 3).unwrap_err();
    assert!(
        matches!(err, d2l::Error::Interrupted { epoch: 1, batch: 0 }),
        "{err}"
    );
    assert!(
        err.to_string().contains("interrupted at epoch 1, batch 0"),
        "{err}"
    );
    assert!(!stop_requested(), "the request is taken once");

    // The model is intact: it saves and loads, and training runs again afterwards.
    let classes = ["hotdog".to_owned(), "not-hotdog".to_owned()];
    let stem = dir.path().join("ckpt/hotdog");
    save_checkpoint(&net, &stem, &classes, (16, 16), Default::default()).unwrap();
    Classifier::load(&stem, Device::Cpu).unwrap();
    let history = run(&mut trainer, 1).unwrap();
    assert!(history.train_loss.is_finite());

    // A stop asked for mid-run ends it after the current step.
    request_stop();
    let err = run(&mut trainer, 1).unwrap_err();
    assert!(matches!(err, d2l::Error::Interrupted { .. }), "{err}");
}
