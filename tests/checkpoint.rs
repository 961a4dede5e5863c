//! Saving a fine-tuned model and predicting single images with it.
use std::collections::BTreeMap;

use d2l::data::transforms::*;
use d2l::model::{checkpoint_paths, resnet18, save_checkpoint, Classifier};
use d2l::tch::nn::{ModuleT, VarStore};
use d2l::tch::{Device, Kind, Tensor};

fn classes() -> Vec<String> {
    vec!["hotdog".into(), "not-hotdog".into()]
}

fn picture() -> image::RgbImage {
    image::RgbImage::from_fn(50, 40, |x, y| {
        image::Rgb([(x * 5) as u8, (y * 6) as u8, 90])
    })
}

#[test]
fn a_saved_model_predicts_like_the_model_it_was() {
    let dir = tempfile::tempdir().unwrap();
    d2l::tch::manual_seed(3);
    let vs = VarStore::new(Device::Cpu);
    let net = resnet18(&vs.root(), 2);
    let notes = BTreeMap::from([("profile".to_owned(), "test".to_owned())]);
    let stem = dir.path().join("out/hotdog-resnet18");
    let (weights, json) = save_checkpoint(&net, &stem, &classes(), (40, 32), notes).unwrap();
    assert_eq!(weights, dir.path().join("out/hotdog-resnet18.safetensors"));
    assert_eq!((weights.clone(), json.clone()), checkpoint_paths(&stem));
    let cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(cfg["classes"][1], "not-hotdog");
    assert_eq!(cfg["crop"], 32);
    assert_eq!(cfg["notes"]["profile"], "test");
    // Only the two files: no temporary file left behind.
    assert_eq!(
        std::fs::read_dir(dir.path().join("out")).unwrap().count(),
        2
    );

    let clf = Classifier::load(&json, Device::Cpu).unwrap();
    let img_path = dir.path().join("dog.png");
    picture().save(&img_path).unwrap();
    let p = clf.predict(&img_path).unwrap();
    // A float32 softmax sums to 1 within a few roundings (6e-8 each).
    assert!((p.probabilities.iter().sum::<f64>() - 1.0).abs() < 1e-6);
    assert_eq!(p.class, classes()[p.index]);
    assert_eq!(p.probability, p.probabilities[p.index]);
    assert!(p.to_string().starts_with(&format!("{} (", p.class)), "{p}");

    // The same numbers as the original model on the test transform.
    let t = Compose::new()
        .then(Resize::new(40, 40))
        .then(CenterCrop::new(32))
        .then(ToTensor)
        .then(Normalize::imagenet());
    let mut rng = rand::rngs::mock::StepRng::new(0, 0);
    let Sample::Tensor(x) = t.apply(Sample::Image(picture()), &mut rng).unwrap() else {
        panic!("no tensor")
    };
    let x = Tensor::from_slice(&x.data).reshape([1, 3, 32, 32]);
    let want = net.forward_t(&x, false).softmax(-1, Kind::Float);
    let want: Vec<f64> = Vec::try_from(want.flatten(0, -1).to_kind(Kind::Double)).unwrap();
    // The same float32 computation on the same weights (saved and loaded exactly): equal but for
    // the rounding of probabilities below 1 (an ulp is 6e-8 there).
    for (a, b) in want.iter().zip(&p.probabilities) {
        assert!((a - b).abs() < 1e-6, "{want:?} vs {:?}", p.probabilities);
    }
}

#[test]
fn broken_or_mismatched_checkpoints_are_refused_with_the_file_named() {
    let dir = tempfile::tempdir().unwrap();
    let vs = VarStore::new(Device::Cpu);
    let net = resnet18(&vs.root(), 2);
    let stem = dir.path().join("m");
    let err = save_checkpoint(&net, &stem, &classes()[..1], (32, 32), Default::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("1 class names for a model with 2 outputs"),
        "{err}"
    );
    let (weights, json) =
        save_checkpoint(&net, &stem, &classes(), (32, 32), Default::default()).unwrap();

    // A weights file from another save (or cut short) is not taken for this one.
    let mut bytes = std::fs::read(&weights).unwrap();
    bytes.truncate(bytes.len() - 10);
    std::fs::write(&weights, &bytes).unwrap();
    let err = Classifier::load(&stem, Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("m.safetensors") && err.contains("not from one save"),
        "{err}"
    );

    std::fs::write(&json, "{ not json").unwrap();
    let err = Classifier::load(&stem, Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("m.json") && err.contains("not a checkpoint description"),
        "{err}"
    );

    let err = Classifier::load(dir.path().join("nothing"), Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("nothing.json"), "{err}");

    save_checkpoint(&net, &stem, &classes(), (32, 32), Default::default()).unwrap();
    let clf = Classifier::load(&stem, Device::Cpu).unwrap();
    let not_image = dir.path().join("notes.jpg");
    std::fs::write(&not_image, b"hello").unwrap();
    let err = clf.predict(&not_image).unwrap_err().to_string();
    assert!(err.contains("notes.jpg"), "{err}");
}
