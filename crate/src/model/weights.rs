//! ImageNet weights for ResNet-18 (torchvision's `IMAGENET1K_V1`), fetched and cached like
//! `torch.hub`, ResNet-18 built from a weights file, and `xavier_uniform_`.
use std::path::{Path, PathBuf};

use tch::nn::VarStore;
use tch::Tensor;

use super::{load_state_dict, read_pth, resnet18, ResNet};
use crate::data::{fetch, Checksum};
use crate::error::Result;

/// Where torchvision's weights live. `D2L_WEIGHTS_URL` replaces this prefix (a mirror).
pub const WEIGHTS_URL: &str = "https://download.pytorch.org/models/";

/// torchvision's `ResNet18_Weights.IMAGENET1K_V1` file; `f37072fd` starts its SHA-256.
pub const RESNET18_IMAGENET1K_V1: &str = "resnet18-f37072fd.pth";

pub use crate::files::torch_home;

/// The path of a torchvision weights file, downloaded into `<torch_home>/hub/checkpoints/` if it
/// is not there yet (a file PyTorch already fetched is reused) and checked against the SHA-256
/// prefix in its name, as torch.hub does. Where the offline stand-in is in force, ResNet-18's
/// ImageNet file is the source model it pre-trained here instead.
pub fn weights_file(file_name: &str) -> Result<PathBuf> {
    if let Some(stand_in) = crate::offline::weights(file_name) {
        return stand_in;
    }
    let path = torch_home().join("hub").join("checkpoints").join(file_name);
    let prefix = file_name
        .rsplit_once('-')
        .and_then(|(_, rest)| rest.split('.').next())
        .filter(|h| !h.is_empty() && h.chars().all(|c| c.is_ascii_hexdigit()))
        .unwrap_or_default();
    fetch(
        &weights_url(file_name),
        &path,
        &Checksum::Sha256Prefix(prefix.to_owned()),
    )?;
    Ok(path)
}

/// Where [`weights_file`] fetches `file_name` from: the mirror in `D2L_WEIGHTS_URL` when it is
/// set and not empty, else torchvision's [`WEIGHTS_URL`].
pub fn weights_url(file_name: &str) -> String {
    let base =
        crate::files::env_nonempty("D2L_WEIGHTS_URL").unwrap_or_else(|| WEIGHTS_URL.to_owned());
    format!("{}/{file_name}", base.trim_end_matches('/'))
}

/// ResNet-18 with its pre-trained weights, like
/// `torchvision.models.resnet18(weights=ResNet18_Weights.IMAGENET1K_V1)`: torchvision's ImageNet
/// weights (1000 classes), fetched once ([`weights_file`]). Where the offline stand-in is in use
/// ([`Settings::auto`](crate::Settings::auto)), the ResNet-18 it pre-trained here instead.
pub fn resnet18_pretrained(vs: &VarStore) -> Result<ResNet> {
    let path = weights_file(RESNET18_IMAGENET1K_V1)?;
    resnet18_from(vs, &path)
}

/// ResNet-18 with every weight from a state-dict file (`.pth` from `torch.save`, or
/// `.safetensors`); as many outputs as the file's `fc.weight` has rows.
pub fn resnet18_from(vs: &VarStore, weights: &Path) -> Result<ResNet> {
    let state = read_weights(weights)?;
    let num_classes = state
        .iter()
        .find(|(name, _)| name == "fc.weight")
        .map(|(_, t)| t.size())
        .and_then(|size| (size.len() == 2).then(|| size[0]))
        .ok_or_else(|| crate::Error::Weights {
            path: weights.to_owned(),
            msg: "no 2-D \"fc.weight\": not a ResNet state dict".into(),
        })?;
    let net = resnet18(&vs.root(), num_classes);
    load_state_dict(vs, &state, &[], weights)?;
    Ok(net)
}

/// `nn.init.xavier_uniform_(t)`: uniform in `±sqrt(6 / (fan_in + fan_out))`, in place (for a
/// `[out, in]` weight, `fan_in = in`, `fan_out = out`; a convolution's counts its kernel too).
pub fn xavier_uniform_(t: &Tensor) -> Result<()> {
    let size = t.size();
    if size.len() < 2 {
        return Err(crate::Error::arg(
            "xavier_uniform_",
            format!(
            "a tensor of shape {size:?} has no fan-in and fan-out (it needs 2 dimensions or more)"
        ),
        ));
    }
    let receptive: i64 = size[2..].iter().product();
    let (fan_in, fan_out) = (size[1] * receptive, size[0] * receptive);
    let bound = (6.0 / (fan_in + fan_out) as f64).sqrt();
    let mut t = t.shallow_clone();
    tch::no_grad(|| t.f_uniform_(-bound, bound).map(drop))?;
    Ok(())
}

/// Tensors of a `.pth`/`.pt` (torch.save) or `.safetensors` file, by name.
pub fn read_weights(path: &Path) -> Result<Vec<(String, Tensor)>> {
    if path.extension().is_some_and(|e| e == "safetensors") {
        return tch::Tensor::read_safetensors(path).map_err(|e| crate::Error::Weights {
            path: path.to_owned(),
            msg: e.to_string(),
        });
    }
    read_pth(path)
}
