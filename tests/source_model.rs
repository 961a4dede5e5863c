//! The offline source model: trained for real on the synthetic food set, cached by config, and
//! usable as the fine-tuning model's body.
mod common;

use d2l::model::{pretrain_source_model, resnet18_from, SourceModelConfig};
use d2l::tch::nn::VarStore;
use d2l::tch::Device;

/// The cache tests' tiny source model, trained one epoch here.
fn tiny() -> SourceModelConfig {
    SourceModelConfig {
        epochs: 1,
        ..common::tiny_source()
    }
}

#[test]
fn source_model_is_trained_once_cached_and_says_what_it_is() {
    let cache = tempfile::tempdir().unwrap();
    let model = pretrain_source_model(cache.path(), &tiny(), Device::Cpu).unwrap();
    assert_eq!(model.classes.len(), 11);
    assert!(model.weights.is_file());
    assert!((0.0..=1.0).contains(&model.test_acc));
    let text = model.describe();
    assert!(
        text.contains("NOT on ImageNet") && text.contains("11-class"),
        "{text}"
    );

    let again = pretrain_source_model(cache.path(), &tiny(), Device::Cpu).unwrap();
    assert_eq!(
        again.train_seconds, model.train_seconds,
        "the cached model is reused"
    );
    let entries: Vec<_> = std::fs::read_dir(cache.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        entries
            .iter()
            .all(|n| !n.to_string_lossy().starts_with(".source-model.")),
        "{entries:?}"
    );

    // It loads as a ResNet-18 with one output a source class.
    let vs = VarStore::new(Device::Cpu);
    let net = resnet18_from(&vs, &model.weights).unwrap();
    assert_eq!(net.fc.out_features, model.classes.len() as i64);
}
