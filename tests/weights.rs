//! Pretrained weights: torch.hub-style cache and hash check through a mirror on 127.0.0.1, and
//! the fine-tuning model built from a weights file (its own test binary: it sets environment
//! variables).
mod common;

use common::{chapter_sgd, fine_tune_net, Reply, Server};
use d2l::model::{resnet18, weights_file};
use d2l::tch::nn::{self, VarStore};
use d2l::tch::{Device, Kind, Tensor};
use d2l::train::Trainer;
use sha2::Digest;

/// A 1000-class ResNet-18 saved as safetensors in `dir`, standing in for the ImageNet weights.
fn saved_resnet18(dir: &std::path::Path) -> (std::path::PathBuf, VarStore) {
    let path = dir.join("source.safetensors");
    let vs = VarStore::new(Device::Cpu);
    let _ = resnet18(&vs.root(), 1000);
    vs.save(&path).unwrap();
    (path, vs)
}

#[test]
fn weights_download_once_into_torch_home_checked_by_the_hash_in_their_name() {
    let server = Server::start();
    let body = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/pth/tiny.pth"
    ))
    .unwrap();
    let hash: String = sha2::Sha256::digest(&body)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let name = format!("tiny-{}.pth", &hash[..8]);
    server.route(&name, Reply::Body(body.clone()));
    server.route("tiny-f37072fd.pth", Reply::Body(body.clone()));
    let home = tempfile::tempdir().unwrap();
    std::env::set_var("TORCH_HOME", home.path());
    std::env::set_var("D2L_WEIGHTS_URL", &server.base);

    let path = weights_file(&name).unwrap();
    assert_eq!(path, home.path().join("hub/checkpoints").join(&name));
    assert_eq!(std::fs::read(&path).unwrap(), body);
    weights_file(&name).unwrap();
    assert_eq!(server.hits(&name), 1, "a cached file is reused");
    assert_eq!(d2l::model::read_weights(&path).unwrap().len(), 13);

    // The same bytes under a name whose hash prefix they do not have: refused, nothing kept.
    let err = weights_file("tiny-f37072fd.pth").unwrap_err().to_string();
    assert!(
        err.contains("SHA-256 starting f37072fd") && err.contains(&hash),
        "{err}"
    );
    assert!(!home
        .path()
        .join("hub/checkpoints/tiny-f37072fd.pth")
        .exists());

    // An empty D2L_WEIGHTS_URL is no mirror: torchvision's own address, for the download and
    // for the settings' probe alike (both ask weights_url).
    std::env::set_var("D2L_WEIGHTS_URL", "");
    assert_eq!(
        d2l::model::weights_url("x.pth"),
        format!("{}x.pth", d2l::model::WEIGHTS_URL)
    );
    std::env::set_var("D2L_WEIGHTS_URL", format!("{}//", server.base));
    assert_eq!(
        d2l::model::weights_url("x.pth"),
        format!("{}x.pth", server.base)
    );
}

#[test]
fn fine_tune_model_keeps_the_body_gets_a_new_head_and_its_own_learning_rate() {
    let dir = tempfile::tempdir().unwrap();
    let (source, src_vs) = saved_resnet18(dir.path());

    let vs = VarStore::new(Device::Cpu);
    let net = fine_tune_net(&vs, &source);
    let (src, dst) = (src_vs.variables(), vs.variables());
    assert!(dst["layer3.1.conv2.weight"].equal(&src["layer3.1.conv2.weight"]));
    assert!(dst["bn1.running_var"].equal(&src["bn1.running_var"]));
    // The new layer replaced the old one in the var store, under the same names: torchvision's
    // 102 tensors, none left over from the 1000-class head.
    assert_eq!(dst["fc.weight"].size(), [2, 512]);
    assert_eq!(
        dst.len(),
        102,
        "{:?}",
        dst.keys().filter(|k| k.contains("fc")).collect::<Vec<_>>()
    );
    assert_eq!(vs.trainable_variables().len(), 62);
    assert_eq!(
        net.fc.repr(),
        "Linear(in_features=512, out_features=2, bias=True)"
    );
    // xavier_uniform_: uniform in ±sqrt(6 / (fan_in + fan_out)); 1024 values all inside half of
    // it has probability 0.5^1024.
    let bound = (6.0f64 / 514.0).sqrt();
    let max = dst["fc.weight"].abs().max().double_value(&[]);
    assert!(
        max <= bound && max > 0.5 * bound,
        "xavier bound {bound}, max {max}"
    );

    // Group 1 (fc) at 10 x lr: with a gradient of ones and no weight decay, fc moves ten times
    // as far as the body.
    let lr = 0.01;
    let mut opt = chapter_sgd(&net, lr, 0.0, true);
    let before: Vec<(String, Tensor)> = dst.iter().map(|(n, t)| (n.clone(), t.copy())).collect();
    let loss = vs
        .trainable_variables()
        .iter()
        .map(|t| t.sum(Kind::Float))
        .fold(Tensor::from(0f32), |a, b| a + b);
    opt.zero_grad().unwrap();
    loss.backward();
    opt.step().unwrap();
    let after = vs.variables();
    for (name, old) in before {
        if name.contains("running") {
            continue;
        }
        // Each value moves by want up to float32's rounding of the new value (u |w - want|),
        // the mean taken exactly enough in float64; a group at the other rate moves 10x.
        let diff = old.to_kind(Kind::Double) - after[&name].to_kind(Kind::Double);
        let step = diff.mean(Kind::Double).double_value(&[]);
        let want = if name.starts_with("fc.") {
            10.0 * lr
        } else {
            lr
        };
        let scale = old.abs().max().double_value(&[]) + want;
        let tol = 2.0 * (f32::EPSILON as f64 / 2.0) * scale;
        assert!(
            (step - want).abs() <= tol,
            "{name}: moved {step}, expected {want} within {tol:.1e}"
        );
    }
}

#[test]
fn frozen_body_stays_put_while_the_head_learns() {
    let dir = tempfile::tempdir().unwrap();
    let (source, _) = saved_resnet18(dir.path());

    let vs = VarStore::new(Device::Cpu);
    let net = fine_tune_net(&vs, &source);
    for (name, param) in net.named_parameters() {
        if !name.starts_with("fc.") {
            let _ = param.set_requires_grad(false);
        }
    }
    let before: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .map(|(n, t)| (n, t.copy()))
        .collect();
    // Weight decay too: a frozen weight gets no gradient, so SGD leaves it as it is.
    let mut opt = chapter_sgd(&net, 0.1, 0.001, true);
    let x = Tensor::randn([4, 3, 32, 32], (Kind::Float, Device::Cpu));
    let y = Tensor::from_slice(&[0i64, 1, 0, 1]);
    let loss = d2l::train::cross_entropy(&nn::ModuleT::forward_t(&net, &x, true), &y)
        .unwrap()
        .sum(Kind::Float);
    opt.zero_grad().unwrap();
    loss.backward();
    opt.step().unwrap();
    let after = vs.variables();
    for (name, old) in before {
        let moved = !after[&name].equal(&old);
        if name.starts_with("fc.") {
            assert!(moved, "{name} should learn");
        } else if !name.contains("running") {
            assert!(!moved, "{name} is frozen");
        }
    }
}
