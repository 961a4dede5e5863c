//! ResNet-18 number for number with PyTorch: eval logits, and 3 SGD steps with the chapter's two
//! parameter groups, weight decay and summed loss. PyTorch's side is written at test time by
//! tests/fixtures/resnet/make_parity.py into target/parity (scripts/test runs it first).
use std::path::{Path, PathBuf};

use d2l::model::{read_pth, resnet18_from};
use d2l::tch::nn::{ModuleT, VarStore};
use d2l::tch::{Device, Kind, Tensor};

fn parity_dir() -> PathBuf {
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

fn io(dir: &Path) -> (Tensor, Tensor, Tensor) {
    let io = read_pth(dir.join("io.pt")).unwrap();
    let get = |n: &str| io.iter().find(|(k, _)| k == n).unwrap().1.shallow_clone();
    (get("x"), get("y"), get("logits"))
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn eval_logits_match_pytorch() {
    let dir = parity_dir();
    let vs = VarStore::new(Device::Cpu);
    let net = resnet18_from(&vs, &dir.join("init.pth"), 2).unwrap();
    let (x, _, logits) = io(&dir);
    let got = d2l::tch::no_grad(|| net.forward_t(&x, false));
    let diff = max_diff(&got, &logits);
    println!("eval logits: max abs difference {diff:.2e}");
    assert!(diff < 1e-4, "{diff}");
}

#[test]
fn three_sgd_steps_with_parameter_groups_match_pytorch() {
    let dir = parity_dir();
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("losses.json")).unwrap()).unwrap();
    let lr = expected["lr"].as_f64().unwrap();
    let wd = expected["weight_decay"].as_f64().unwrap();
    let vs = VarStore::new(Device::Cpu);
    let net = resnet18_from(&vs, &dir.join("init.pth"), 2).unwrap();
    let mut trainer = d2l::train::sgd(&vs, lr, wd, true).unwrap();
    let (x, y, _) = io(&dir);
    let mut losses = Vec::new();
    for _ in 0..3 {
        trainer.zero_grad();
        let l = d2l::train::cross_entropy(&net.forward_t(&x, true), &y)
            .unwrap()
            .sum(Kind::Float);
        l.backward();
        trainer.step();
        losses.push(l.double_value(&[]));
    }
    let want: Vec<f64> = expected["losses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    println!("losses: ours {losses:?}, PyTorch {want:?}");
    for (a, b) in losses.iter().zip(&want) {
        assert!((a - b).abs() / b.abs().max(1e-12) < 1e-4, "loss {a} vs {b}");
    }
    let after = read_pth(dir.join("after.pth")).unwrap();
    let vars = vs.variables();
    let mut worst = (0.0, String::new());
    for (name, t) in after
        .iter()
        .filter(|(n, _)| !n.ends_with("num_batches_tracked"))
    {
        let d = max_diff(&vars[name], t);
        if d > worst.0 {
            worst = (d, name.clone());
        }
    }
    println!(
        "parameters after 3 steps: max abs difference {:.2e} ({})",
        worst.0, worst.1
    );
    assert!(worst.0 < 1e-4, "{worst:?}");
}
