//! ImageNet weights for ResNet-18 (torchvision's `IMAGENET1K_V1`), fetched and cached like
//! `torch.hub`, and the chapter's fine-tuning model built from them.
use std::path::{Path, PathBuf};

use tch::nn::{Init, VarStore};

use super::{load_state_dict, read_pth, resnet18, ResNet};
use crate::data::{fetch, Checksum};
use crate::error::Result;

/// Where torchvision's weights live. `D2L_WEIGHTS_URL` replaces this prefix (a mirror).
pub const WEIGHTS_URL: &str = "https://download.pytorch.org/models/";

/// torchvision's `ResNet18_Weights.IMAGENET1K_V1` file; `f37072fd` starts its SHA-256.
pub const RESNET18_IMAGENET1K_V1: &str = "resnet18-f37072fd.pth";

/// torch.hub's cache: `$TORCH_HOME`, else `$XDG_CACHE_HOME/torch`, else `~/.cache/torch`.
pub fn torch_home() -> PathBuf {
    if let Some(home) = std::env::var_os("TORCH_HOME") {
        return PathBuf::from(home);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    cache.join("torch")
}

/// The path of a torchvision weights file, downloaded into `<torch_home>/hub/checkpoints/` if it
/// is not there yet (a file PyTorch already fetched is reused) and checked against the SHA-256
/// prefix in its name, as torch.hub does.
pub fn weights_file(file_name: &str) -> Result<PathBuf> {
    let path = torch_home().join("hub").join("checkpoints").join(file_name);
    let prefix = file_name
        .rsplit_once('-')
        .and_then(|(_, rest)| rest.split('.').next())
        .filter(|h| !h.is_empty() && h.chars().all(|c| c.is_ascii_hexdigit()))
        .unwrap_or_default();
    let base = std::env::var("D2L_WEIGHTS_URL").unwrap_or_else(|_| WEIGHTS_URL.to_owned());
    let url = format!("{}/{file_name}", base.trim_end_matches('/'));
    fetch(&url, &path, &Checksum::Sha256Prefix(prefix.to_owned()))?;
    Ok(path)
}

/// ResNet-18 with ImageNet weights (1000 classes), like
/// `torchvision.models.resnet18(weights=ResNet18_Weights.IMAGENET1K_V1)`.
pub fn resnet18_pretrained(vs: &VarStore) -> Result<ResNet> {
    let path = weights_file(RESNET18_IMAGENET1K_V1)?;
    resnet18_from(vs, &path, 1000)
}

/// ResNet-18 with `num_classes` outputs and every weight from a state-dict file (`.pth` from
/// `torch.save`, or `.safetensors`).
pub fn resnet18_from(vs: &VarStore, weights: &Path, num_classes: i64) -> Result<ResNet> {
    let net = resnet18(&vs.root(), num_classes);
    load_state_dict(vs, &read_weights(weights)?, &[], weights)?;
    Ok(net)
}

/// The chapter's target model: ResNet-18's body from `weights`, and a new output layer of
/// `num_classes` with `xavier_uniform_` weights and `nn.Linear`'s default bias.
///
/// `fc` is in optimiser group 1 and everything else in group 0, so that an optimiser can give
/// the new layer ten times the learning rate (`opt.set_lr_group(1, 10.0 * lr)`).
pub fn resnet18_fine_tune(vs: &VarStore, weights: &Path, num_classes: i64) -> Result<ResNet> {
    let mut net = resnet18(&vs.root(), num_classes);
    load_state_dict(vs, &read_weights(weights)?, &["fc."], weights)?;
    xavier_uniform(&mut net);
    Ok(net)
}

/// `nn.init.xavier_uniform_(net.fc.weight)`: uniform in `±sqrt(6 / (fan_in + fan_out))`.
pub fn xavier_uniform(net: &mut ResNet) {
    let bound = (6.0 / (net.fc.in_features + net.fc.out_features) as f64).sqrt();
    tch::no_grad(|| {
        net.fc.ws.init(Init::Uniform {
            lo: -bound,
            up: bound,
        })
    });
}

/// Tensors of a `.pth`/`.pt` (torch.save) or `.safetensors` file, by name.
pub fn read_weights(path: &Path) -> Result<Vec<(String, tch::Tensor)>> {
    if path.extension().is_some_and(|e| e == "safetensors") {
        return tch::Tensor::read_safetensors(path).map_err(|e| crate::Error::Weights {
            path: path.to_owned(),
            msg: e.to_string(),
        });
    }
    read_pth(path)
}

/// Stops gradients for everything but the output layer `fc` (the chapter's exercise: freeze
/// the pre-trained body). Frozen parameters get no gradient, so SGD leaves them as they are,
/// weight decay included, as in PyTorch.
pub fn freeze_body(vs: &VarStore) {
    for (name, var) in vs.variables() {
        if !name.starts_with("fc.") {
            let _ = var.set_requires_grad(false);
        }
    }
}

/// Starts output `target_class` of `net.fc` from the ImageNet head's row `source_class` (the
/// chapter's exercise: class 934 is "hotdog, hot dog, red hot"). `source` is the ImageNet state
/// dict, as [`read_weights`] gives it.
pub fn init_head_from_class(
    net: &mut ResNet,
    source: &[(String, tch::Tensor)],
    source_class: i64,
    target_class: i64,
) -> Result<()> {
    let get = |name: &str| {
        source
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t)
            .ok_or_else(|| {
                crate::Error::Invalid(format!(
                    "init_head_from_class: the source weights have no {name:?}"
                ))
            })
    };
    let (w, b) = (get("fc.weight")?, get("fc.bias")?);
    let rows = w.size()[0];
    if !(0..rows).contains(&source_class) || !(0..net.fc.out_features).contains(&target_class) {
        return Err(crate::Error::Invalid(format!(
            "init_head_from_class: class {source_class} of {rows} -> {target_class} of {} is out of range",
            net.fc.out_features
        )));
    }
    tch::no_grad(|| -> Result<()> {
        net.fc
            .ws
            .f_get(target_class)?
            .f_copy_(&w.f_get(source_class)?)?;
        net.fc
            .bs
            .f_get(target_class)?
            .f_copy_(&b.f_get(source_class)?)?;
        Ok(())
    })
}
