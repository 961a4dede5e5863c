//! Beyond the book: the learning-rate range test, looking at the mistakes, gradual unfreezing,
//! TorchScript export checked by PyTorch, and classifying a folder into a CSV.
mod common;
mod numerics;

use std::path::Path;
use std::process::Command;

use common::tiny_loaders;
use d2l::model::{
    export_torchscript, resnet18, save_checkpoint, write_predictions_csv, Classifier, ResNet,
};
use d2l::tch::nn::{ModuleT, VarStore};
use d2l::tch::{Device, Kind, Reduction, Tensor};
use d2l::train::*;
use numerics::{assert_fp32_as_close, rel_dist};

fn tiny_net(vs: &VarStore, seed: i64) -> ResNet {
    d2l::tch::manual_seed(seed);
    resnet18(&vs.root(), 2)
}

fn snapshot(net: &ResNet) -> Vec<(String, Tensor)> {
    net.named_tensors()
        .into_iter()
        .map(|(n, t)| (n, t.detach().copy()))
        .collect()
}

fn tensor<'a>(net: &'a [(String, Tensor)], name: &str) -> &'a Tensor {
    &net.iter().find(|(n, _)| n == name).unwrap().1
}

fn devices() -> d2l::Devices {
    d2l::Devices(vec![Device::Cpu])
}

/// `lr_find` on the CPU with the chapter's optimiser and loss.
fn find(net: &ResNet, train_iter: &d2l::DataLoader, opts: &LrFindOptions) -> d2l::Result<LrFind> {
    lr_find(
        net,
        train_iter,
        CrossEntropyLoss::new(Reduction::None),
        |lr| chapter_sgd(net, lr),
        &devices(),
        opts,
    )
}

#[test]
fn lr_find_records_a_growing_rate_suggests_one_and_puts_the_model_back() {
    let dir = tempfile::tempdir().unwrap();
    let (train_iter, _) = tiny_loaders(dir.path(), 32);
    let vs = VarStore::new(Device::Cpu);
    let net = tiny_net(&vs, 1);
    let before = snapshot(&net);
    let opts = LrFindOptions {
        start_lr: 1e-5,
        end_lr: 1.0,
        num_it: 12,
        stop_div: false,
        ..Default::default()
    };
    let found = find(&net, &train_iter, &opts).unwrap();
    // 12 steps over 3 batches an epoch: the loader went round 4 times.
    assert_eq!(found.lrs.len(), 12);
    assert_eq!(found.lrs[0], 1e-5);
    assert!(numerics::rel(found.lrs[11], 1.0) < 1e-12, "{:?}", found.lrs);
    let factor = 1e5f64.powf(1.0 / 11.0);
    for w in found.lrs.windows(2) {
        assert!(numerics::rel(w[1] / w[0], factor) < 1e-12, "{w:?}");
    }
    // The first smoothed value is the first loss (the moving average debiased), and every
    // later one lies between the smallest and largest raw loss so far.
    assert!(numerics::rel(found.losses[0], found.raw_losses[0]) < 1e-12);
    for i in 0..12 {
        let seen = &found.raw_losses[..=i];
        let (lo, hi) = seen
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, b), &v| (a.min(v), b.max(v)));
        assert!(
            (lo - 1e-9..=hi + 1e-9).contains(&found.losses[i]),
            "{i}: {found:?}"
        );
    }
    for lr in [found.valley, found.steep, found.minimum * 10.0] {
        assert!(
            found.lrs.iter().any(|r| numerics::rel(lr, *r) < 1e-12),
            "{lr} is not a recorded rate: {found:?}"
        );
    }
    assert_eq!(found.suggestion(), found.valley);
    // Every parameter and running statistic is back, bit for bit.
    for ((name, b), (_, a)) in before.iter().zip(snapshot(&net).iter()) {
        assert!(a.equal(b), "{name} changed");
    }
    let png = found.figure().unwrap().to_png().unwrap();
    assert_eq!(png.size(), (525, 375));
    // Bad settings are errors that say what to give.
    let bad = LrFindOptions {
        start_lr: 1.0,
        end_lr: 0.1,
        ..Default::default()
    };
    let err = find(&net, &train_iter, &bad).unwrap_err();
    assert!(err.to_string().contains("0 < start_lr < end_lr"), "{err}");
}

#[test]
fn lr_find_stops_once_the_loss_diverges() {
    let dir = tempfile::tempdir().unwrap();
    let (train_iter, _) = tiny_loaders(dir.path(), 32);
    let vs = VarStore::new(Device::Cpu);
    let net = tiny_net(&vs, 2);
    let opts = LrFindOptions {
        start_lr: 1e-4,
        end_lr: 1e8,
        num_it: 40,
        ..Default::default()
    };
    let found = find(&net, &train_iter, &opts).unwrap();
    let n = found.losses.len();
    assert!(n < 40, "no stop at lr {:e}", found.lrs[n - 1]);
    let best = found.losses[..n - 1]
        .iter()
        .cloned()
        .fold(f64::MAX, f64::min);
    let last = found.losses[n - 1];
    assert!(
        !last.is_finite() || last > 4.0 * best,
        "stopped at {last} (best {best})"
    );
}

#[test]
fn interpretation_counts_and_ranks_the_mistakes() {
    let dir = tempfile::tempdir().unwrap();
    let (train_iter, test_iter) = tiny_loaders(dir.path(), 32);
    let vs = VarStore::new(Device::Cpu);
    let net = tiny_net(&vs, 3);
    let interp = ClassificationInterpretation::from_net(&net, &test_iter, Device::Cpu).unwrap();
    let n = test_iter.dataset().len();
    assert_eq!((interp.targets.len(), interp.losses.len()), (n, n));
    let cm = interp.confusion_matrix();
    assert_eq!(cm.iter().flatten().sum::<usize>(), n);
    for (class, row) in cm.iter().enumerate() {
        let actual = interp
            .targets
            .iter()
            .filter(|&&t| t == class as i64)
            .count();
        assert_eq!(row.iter().sum::<usize>(), actual);
    }
    let acc = evaluate_accuracy_gpu(&net, &test_iter, Device::Cpu).unwrap();
    assert_eq!(interp.accuracy(), acc);
    let confused: usize = interp.most_confused(1).iter().map(|c| c.2).sum();
    assert_eq!(confused, n - (acc * n as f64).round() as usize);
    // The losses are the chapter's cross-entropy of each image (float32 there, float64 here).
    let (x, y) = test_iter.iter().next().unwrap().unwrap();
    let l = cross_entropy(&d2l::tch::no_grad(|| net.forward_t(&x, false)), &y).unwrap();
    for (i, v) in Vec::<f64>::try_from(l.to_kind(Kind::Double))
        .unwrap()
        .iter()
        .enumerate()
    {
        assert!(
            (v - interp.losses[i]).abs() <= 1e-5 * (1.0 + v.abs()),
            "{i}: {v}"
        );
    }
    for p in &interp.probs {
        assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-12);
    }
    let top = interp.top_losses(3);
    assert_eq!(top.len(), 3);
    assert!(top
        .windows(2)
        .all(|w| interp.losses[w[0]] >= interp.losses[w[1]]));
    let rest_max = (0..n)
        .filter(|i| !top.contains(i))
        .map(|i| interp.losses[i])
        .fold(f64::MIN, f64::max);
    assert!(interp.losses[top[2]] >= rest_max);
    // The pictures: a heat map with both ends of the Blues scale, a grid of three.
    let cm_png = interp.plot_confusion_matrix().unwrap();
    let img = image::load_from_memory(cm_png.bytes()).unwrap().to_rgb8();
    let count = |rgb: [u8; 3]| img.pixels().filter(|p| p.0 == rgb).count();
    let (dark, light) = (count([8, 48, 107]), count([247, 251, 255]));
    let zero_cells = cm.iter().flatten().filter(|&&c| c == 0).count();
    assert!(dark > 1000, "no cell of the largest count ({dark} px)");
    assert_eq!(
        light > 1000,
        zero_cells > 0,
        "{light} px of empty cells, {zero_cells} cells"
    );
    assert_eq!(interp.plot_top_losses(3, 3).unwrap().size(), (600, 200));
    // The training loader shuffles: its order is not the data set's.
    let err = ClassificationInterpretation::from_net(&net, &train_iter, Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("shuffles"), "{err}");
}

#[test]
fn gradual_unfreezing_trains_the_head_and_batchnorm_first() {
    let dir = tempfile::tempdir().unwrap();
    d2l::set_figures_dir(dir.path().join("figures"));
    let (train_iter, test_iter) = tiny_loaders(dir.path(), 32);
    let vs = VarStore::new(Device::Cpu);
    let net = tiny_net(&vs, 4);
    net.freeze();
    for (name, p) in net.named_parameters() {
        let learns = name.starts_with("fc.")
            || name.starts_with("bn1.")
            || name.contains(".bn")
            || name.contains("downsample.1.");
        assert_eq!(p.requires_grad(), learns, "{name}");
    }
    let before = snapshot(&net);
    let mut trainer = chapter_sgd(&net, 0.05).unwrap();
    let opts = TrainOptions {
        quiet: true,
        no_figure: true,
        ..Default::default()
    };
    let loss = CrossEntropyLoss::new(Reduction::None);
    train_ch13_with(
        &net,
        &train_iter,
        &test_iter,
        loss,
        &mut trainer,
        1,
        &devices(),
        &opts,
    )
    .unwrap();
    let after = snapshot(&net);
    for name in [
        "conv1.weight",
        "layer4.1.conv2.weight",
        "layer2.0.downsample.0.weight",
    ] {
        assert!(
            tensor(&after, name).equal(tensor(&before, name)),
            "{name} moved while frozen"
        );
    }
    for name in ["fc.weight", "bn1.weight", "layer4.1.bn2.bias"] {
        assert!(
            !tensor(&after, name).equal(tensor(&before, name)),
            "{name} did not learn"
        );
    }
    net.unfreeze();
    assert!(net.parameters().iter().all(Tensor::requires_grad));

    // The whole schedule: 1 frozen epoch, then 2 with everything learning, one history.
    let history = fine_tune_gradual(
        &net,
        &train_iter,
        &test_iter,
        loss,
        &mut trainer,
        1,
        2,
        &devices(),
        &opts,
    )
    .unwrap();
    assert_eq!(history.num_epochs, 3);
    assert_eq!(history.config["freeze_epochs"], "1");
    let test_points: Vec<f64> = history
        .points
        .iter()
        .filter(|p| p.test_acc.is_some())
        .map(|p| p.x)
        .collect();
    assert_eq!(test_points, [1.0, 2.0, 3.0]);
    assert!(net.parameters().iter().all(Tensor::requires_grad));
    assert!(!tensor(&snapshot(&net), "conv1.weight").equal(tensor(&after, "conv1.weight")));
}

/// The Python with PyTorch that scripts/setup.py installs (the full install).
fn torch_python() -> std::path::PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("python3")
        .args(["scripts/setup.py", "--torch", "cuda", "--print-venv"])
        .current_dir(root)
        .output()
        .unwrap();
    let venv = String::from_utf8(out.stdout).unwrap();
    let python = Path::new(venv.trim()).join("bin/python");
    assert!(
        python.exists(),
        "{} is missing: run `python3 scripts/setup.py --torch cuda --python-only` (scripts/test does)",
        python.display()
    );
    python
}

#[test]
fn torchscript_export_loads_in_pytorch_with_the_same_logits() {
    let dir = tempfile::tempdir().unwrap();
    let vs = VarStore::new(Device::Cpu);
    let net = tiny_net(&vs, 5);
    // Running statistics that are not the initial 0 and 1, so that eval mode matters.
    d2l::tch::no_grad(|| {
        for (name, t) in net.named_tensors() {
            if name.ends_with("running_var") {
                let _ = t.shallow_clone().uniform_(0.5, 2.0);
            } else if name.ends_with("running_mean") {
                let _ = t.shallow_clone().uniform_(-0.2, 0.2);
            }
        }
    });
    let path = dir.path().join("model.pt");
    export_torchscript(&net, &path, 64).unwrap();
    // Three images, not the traced batch of one, at the traced size.
    let x = Tensor::randn([3, 3, 64, 64], (Kind::Float, Device::Cpu));
    let raw: Vec<f32> = Vec::try_from(x.flatten(0, -1)).unwrap();
    let bytes: Vec<u8> = raw.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(dir.path().join("x.f32"), bytes).unwrap();
    let script = r#"
import json, sys, torch
m = torch.jit.load(sys.argv[1])
x = torch.frombuffer(bytearray(open(sys.argv[2], "rb").read()), dtype=torch.float32).reshape(3, 3, 64, 64)
with torch.no_grad():
    y = m(x)
print(json.dumps({"logits": y.double().flatten().tolist(), "shape": list(y.shape)}))
"#;
    let out = Command::new(torch_python())
        .arg("-c")
        .arg(script)
        .arg(&path)
        .arg(dir.path().join("x.f32"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["shape"], serde_json::json!([3, 2]));
    let py: Vec<f64> = serde_json::from_value(r["logits"].clone()).unwrap();
    let py = Tensor::from_slice(&py).reshape([3, 2]);
    // Against a float64 copy of the model: PyTorch's float32 logits are as close to it as
    // this crate's own float32 forward is.
    let (_vs64, net64) = net.replicate(Device::Cpu).unwrap();
    let mut vs64 = _vs64;
    vs64.double();
    let y64 = d2l::tch::no_grad(|| net64.forward_t(&x.to_kind(Kind::Double), false));
    let y32 = d2l::tch::no_grad(|| net.forward_t(&x, false));
    assert_fp32_as_close(
        "TorchScript logits in PyTorch",
        rel_dist(&[py], &[y64.shallow_clone()]),
        rel_dist(&[y32], &[y64]),
    );
    // A path it cannot write is an error naming it; nothing is left behind.
    let err = export_torchscript(&net, dir.path().join("x.f32/model.pt"), 64).unwrap_err();
    assert!(err.to_string().contains("x.f32"), "{err}");
    assert!(export_torchscript(&net, dir.path().join("small.pt"), 8).is_err());
}

#[test]
fn predict_folder_matches_single_predictions_and_writes_a_csv() {
    let dir = tempfile::tempdir().unwrap();
    let (train_iter, test_iter) = tiny_loaders(dir.path(), 32);
    let vs = VarStore::new(Device::Cpu);
    let net = tiny_net(&vs, 6);
    let stem = dir.path().join("ckpt/tiny");
    let classes = train_iter.dataset().classes().to_vec();
    save_checkpoint(&net, &stem, &classes, (36, 32), Default::default()).unwrap();
    let classifier = Classifier::load(&stem, Device::Cpu).unwrap();
    // The test images, and one more in a sub-folder under a name with a comma and a quote.
    let folder = dir.path().join("to-classify");
    std::fs::create_dir_all(folder.join("more")).unwrap();
    for (i, (path, _)) in test_iter.dataset().samples().iter().enumerate() {
        std::fs::copy(path, folder.join(format!("{i}.png"))).unwrap();
    }
    let first = &test_iter.dataset().samples()[0].0;
    std::fs::copy(first, folder.join("more/a,\"b\".png")).unwrap();
    std::fs::write(folder.join("notes.txt"), "not an image").unwrap();
    let rows = classifier.predict_folder(&folder, 3, false).unwrap();
    assert_eq!(rows.len(), test_iter.dataset().len() + 1);
    let mut paths: Vec<_> = rows.iter().map(|(p, _)| p.clone()).collect();
    paths.sort();
    assert_eq!(
        paths,
        rows.iter().map(|(p, _)| p.clone()).collect::<Vec<_>>()
    );
    for (path, pred) in &rows {
        let one = classifier.predict(path).unwrap();
        assert_eq!(one.index, pred.index, "{}", path.display());
        assert!(
            (one.probability - pred.probability).abs() < 1e-5,
            "{}",
            path.display()
        );
        assert_eq!(pred.class, classes[pred.index]);
    }
    let csv = dir.path().join("out/predictions.csv");
    write_predictions_csv(&csv, &rows).unwrap();
    let text = std::fs::read_to_string(&csv).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "path,label,probability");
    assert_eq!(lines.len(), rows.len() + 1);
    let quoted = lines.iter().find(|l| l.contains("a,")).unwrap();
    assert!(
        quoted.starts_with('"') && quoted.contains("a,\"\"b\"\".png\","),
        "{quoted}"
    );
    let last = lines[1].rsplit(',').next().unwrap().parse::<f64>().unwrap();
    assert!((last - rows[0].1.probability).abs() < 1e-6);
    // Clear errors: a folder without images, a batch of 0, an unreadable image.
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let err = classifier.predict_folder(&empty, 4, false).unwrap_err();
    assert!(err.to_string().contains("no image files"), "{err}");
    assert!(classifier.predict_folder(&folder, 0, false).is_err());
    std::fs::write(folder.join("broken.jpg"), b"not a jpeg").unwrap();
    let err = classifier.predict_folder(&folder, 4, false).unwrap_err();
    assert!(err.to_string().contains("broken.jpg"), "{err}");
}
