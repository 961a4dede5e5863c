//! ResNet-18's names and initialisation, and reading torch.save state dicts.
use std::path::{Path, PathBuf};

use d2l::model::{load_state_dict, read_pth, resnet18};
use d2l::tch::nn::{self, ModuleT, VarStore};
use d2l::tch::{Device, Kind, Tensor};
use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/pth")
        .join(name)
}

/// torchvision's resnet18 state_dict keys, less the 20 `num_batches_tracked`.
fn torchvision_names() -> Vec<String> {
    let bn =
        |p: &str| ["weight", "bias", "running_mean", "running_var"].map(|s| format!("{p}.{s}"));
    let mut names = vec!["conv1.weight".to_owned()];
    names.extend(bn("bn1"));
    for layer in 1..=4 {
        for block in 0..2 {
            let p = format!("layer{layer}.{block}");
            names.push(format!("{p}.conv1.weight"));
            names.extend(bn(&format!("{p}.bn1")));
            names.push(format!("{p}.conv2.weight"));
            names.extend(bn(&format!("{p}.bn2")));
            if layer > 1 && block == 0 {
                names.push(format!("{p}.downsample.0.weight"));
                names.extend(bn(&format!("{p}.downsample.1")));
            }
        }
    }
    names.extend(["fc.weight".to_owned(), "fc.bias".to_owned()]);
    names.sort();
    names
}

#[test]
fn resnet18_has_torchvisions_names_and_shapes() {
    let vs = VarStore::new(Device::Cpu);
    let net = resnet18(&vs.root(), 1000);
    let mut names: Vec<String> = vs.variables().into_keys().collect();
    names.sort();
    assert_eq!(names.len(), 102);
    assert_eq!(names, torchvision_names());
    let vars = vs.variables();
    assert_eq!(vars["layer2.0.downsample.0.weight"].size(), [128, 64, 1, 1]);
    assert_eq!(vars["fc.weight"].size(), [1000, 512]);
    assert_eq!(
        net.fc.repr(),
        "Linear(in_features=512, out_features=1000, bias=True)"
    );
    let y = net.forward_t(
        &Tensor::zeros([2, 3, 32, 32], (Kind::Float, Device::Cpu)),
        false,
    );
    assert_eq!(y.size(), [2, 1000]);
}

#[test]
fn resnet18_is_initialised_like_torchvision() {
    d2l::tch::manual_seed(0);
    let vs = VarStore::new(Device::Cpu);
    let _net = resnet18(&vs.root(), 2);
    let vars = vs.variables();
    // kaiming_normal_(fan_out, relu): std = sqrt(2 / (c_out * k * k)). The sample std of n
    // normal values has a relative standard error of 1 / sqrt(2 (n - 1)): allow 6 of them (a
    // wrong fan, fan_in for conv1, is off by 4.6x; a wrong gain by 1.4x).
    let std_within = |name: &str, want: f64| {
        let t = &vars[name];
        let (got, n) = (t.std(true).double_value(&[]), t.numel() as f64);
        let tol = 6.0 / (2.0 * (n - 1.0)).sqrt();
        assert!(
            (got / want - 1.0).abs() < tol,
            "{name}: std {got}, want {want} within {tol:.1e}"
        );
    };
    std_within("conv1.weight", (2.0f64 / (64.0 * 49.0)).sqrt());
    std_within("layer4.1.conv2.weight", (2.0f64 / (512.0 * 9.0)).sqrt());
    for (name, want) in [
        ("bn1.weight", 1.0),
        ("bn1.bias", 0.0),
        ("layer3.0.bn2.weight", 1.0),
        ("bn1.running_var", 1.0),
    ] {
        let t = &vars[name];
        assert!(t.eq(want).all().int64_value(&[]) == 1, "{name}");
    }
    // nn.Linear's default: uniform in ±1/sqrt(512).
    let bound = 1.0 / 512f64.sqrt();
    for name in ["fc.weight", "fc.bias"] {
        let t = &vars[name];
        assert!(t.abs().max().double_value(&[]) <= bound, "{name}");
    }
    // 1024 uniform values all inside 0.9 of the bound: probability 0.9^1024, about 1e-47.
    assert!(vars["fc.weight"].abs().max().double_value(&[]) > 0.9 * bound);
}

#[test]
fn reads_a_torch_save_state_dict_exactly() {
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("tiny.json")).unwrap()).unwrap();
    assert!(expected["torch"].as_str().unwrap().starts_with("2.11"));
    let state = read_pth(fixture("tiny.pth")).unwrap();
    let order: Vec<&str> = expected["order"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(
        state.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        order
    );
    for (name, t) in &state {
        let want = &expected["tensors"][name];
        let shape: Vec<i64> = want["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect();
        assert_eq!(t.size(), shape, "{name}");
        let kind = match want["dtype"].as_str().unwrap() {
            "float32" => Kind::Float,
            "float16" => Kind::Half,
            "int64" => Kind::Int64,
            other => panic!("{other}"),
        };
        assert_eq!(t.kind(), kind, "{name}");
        let got = Vec::<f64>::try_from(t.to_kind(Kind::Double).flatten(0, -1)).unwrap();
        let want: Vec<f64> = want["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_eq!(got, want, "{name}");
    }
}

#[test]
fn broken_weight_files_are_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(fixture("tiny.pth")).unwrap();
    let cut = dir.path().join("cut.pth");
    std::fs::write(&cut, &bytes[..bytes.len() - 300]).unwrap();
    let err = read_pth(&cut).unwrap_err().to_string();
    assert!(err.contains("cut.pth"), "{err}");
    let text = dir.path().join("notes.pth");
    std::fs::write(&text, b"not weights at all").unwrap();
    let err = read_pth(&text).unwrap_err().to_string();
    assert!(
        err.contains("notes.pth") && err.contains("not a zip-format torch.save file"),
        "{err}"
    );
    let err = read_pth(dir.path().join("missing.pth"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing.pth"), "{err}");
}

#[test]
fn load_state_dict_checks_names_shapes_and_dtypes() {
    let state = read_pth(fixture("tiny.pth")).unwrap();
    let model = |vs: &VarStore, out: i64| {
        let p = vs.root();
        let _ = (&p / "0").var("weight", &[2, 3, 3, 3], nn::Init::Const(0.0));
        let _ = nn::batch_norm2d(&p / "1", 2, Default::default());
        let _ = nn::linear(&p / "3", 2, out, Default::default());
    };
    let src = fixture("tiny.pth");
    let only_model: Vec<(String, Tensor)> = state
        .iter()
        .filter(|(n, _)| !n.starts_with("extra."))
        .map(|(n, t)| (n.clone(), t.shallow_clone()))
        .collect();

    let vs = VarStore::new(Device::Cpu);
    model(&vs, 4);
    load_state_dict(&vs, &only_model, &[], &src).unwrap();
    let want = &state.iter().find(|(n, _)| n == "1.running_mean").unwrap().1;
    assert!(vs.variables()["1.running_mean"].equal(want));

    let err = load_state_dict(&vs, &state, &[], &src)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("unexpected") && err.contains("extra."),
        "{err}"
    );

    let other = VarStore::new(Device::Cpu);
    model(&other, 5);
    let err = load_state_dict(&other, &only_model, &[], &src)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("\"3.bias\" has shape [4], the model wants [5]") && err.contains("tiny.pth"),
        "{err}"
    );
    // A new output layer is kept when skipped.
    let before = other.variables()["3.weight"].copy();
    let no_head: Vec<(String, Tensor)> = only_model
        .iter()
        .filter(|(n, _)| !n.starts_with("3."))
        .map(|(n, t)| (n.clone(), t.shallow_clone()))
        .collect();
    load_state_dict(&other, &no_head, &["3."], &src).unwrap();
    assert!(other.variables()["3.weight"].equal(&before));

    let doubled: Vec<(String, Tensor)> = only_model
        .iter()
        .map(|(n, t)| {
            (
                n.clone(),
                if n == "1.weight" {
                    t.to_kind(Kind::Double)
                } else {
                    t.shallow_clone()
                },
            )
        })
        .collect();
    let err = load_state_dict(&vs, &doubled, &[], &src)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("\"1.weight\" is Double, the model wants Float"),
        "{err}"
    );

    let missing: Vec<(String, Tensor)> = only_model
        .iter()
        .skip(1)
        .map(|(n, t)| (n.clone(), t.shallow_clone()))
        .collect();
    let err = load_state_dict(&vs, &missing, &[], &src)
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing \"0.weight\""), "{err}");
}

#[test]
fn summary_counts_torchvisions_parameters() {
    let vs = VarStore::new(Device::Cpu);
    let net = resnet18(&vs.root(), 1000);
    let text = net.to_string();
    // torchvision's resnet18 has 11,689,512 parameters.
    assert!(
        text.starts_with("ResNet-18: 11,689,512 trainable parameters"),
        "{text}"
    );
    assert!(
        text.contains("Linear(in_features=512, out_features=1000, bias=True)"),
        "{text}"
    );
    assert!(
        text.contains("2 x BasicBlock(256 -> 512, stride 2)"),
        "{text}"
    );
    let counted: i64 = vs
        .trainable_variables()
        .iter()
        .map(|t| t.numel() as i64)
        .sum();
    assert_eq!(counted, 11_689_512);
}
