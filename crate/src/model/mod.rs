//! Models and their weights: torchvision's ResNet-18 and PyTorch's state-dict files.
mod checkpoint;
mod conv;
mod export;
mod norm;
mod pool;
mod pth;
mod resnet;
mod source;
mod weights;

use std::collections::HashMap;
use std::path::Path;

use tch::nn::VarStore;
use tch::Tensor;

pub(crate) use checkpoint::{check_sha256, sha256_file, stem_with};
pub use checkpoint::{
    checkpoint_paths, save_checkpoint, write_predictions_csv, CheckpointConfig, Classifier,
    Prediction,
};
pub use conv::{
    clear_conv_choices, conv2d, conv2d_weight_grad, conv2d_winograd, conv_autotune, conv_choices,
    cpu_gemm_weight_grad, cpu_im2col, cpu_winograd, set_conv_autotune, set_cpu_gemm_weight_grad,
    set_cpu_im2col, set_cpu_winograd, winograd_tile, Conv2d, ConvChoice, ConvPath,
    IM2COL_MAX_BYTES,
};
pub use export::export_torchscript;
pub use norm::{
    batch_norm_act, batch_norm_act_uses_kernel, cpu_fast_batch_norm, set_cpu_fast_batch_norm,
    BN_EPS, BN_MOMENTUM,
};
pub use pool::{cpu_fast_max_pool, max_pool2d, set_cpu_fast_max_pool};
pub use pth::read_pth;
pub use resnet::{linear, resnet18, Linear, ResNet};
pub use source::{pretrain_source_model, SourceModel, SourceModelConfig};
pub use weights::{
    read_weights, resnet18_from, resnet18_pretrained, torch_home, weights_file, weights_url,
    xavier_uniform_, RESNET18_IMAGENET1K_V1, WEIGHTS_URL,
};

use crate::error::{Error, Result};

/// The layout of a 4-d tensor as this crate's CPU kernels read it: `Some(false)` contiguous
/// NCHW, `Some(true)` channels-last (NHWC strides; dimensions of size 1 may have any stride),
/// `None` otherwise. A tensor that is both (one value a plane) counts as NCHW, as in `norm.cpp`.
pub(crate) fn layout(t: &Tensor) -> Option<bool> {
    if t.is_contiguous() {
        return Some(false);
    }
    let (size, stride) = (t.size(), t.stride());
    let [_, c, h, w] = size[..] else {
        return None;
    };
    let nhwc = [h * w * c, 1, w * c, c];
    (0..4)
        .all(|i| size[i] == 1 || stride[i] == nhwc[i])
        .then_some(true)
}

/// An error from libtorch writing `path`: a full disk is [`Error::DiskFull`], other I/O errors
/// [`Error::Io`], the rest [`Error::Weights`].
pub(crate) fn torch_write_error(path: &Path, e: tch::TchError) -> Error {
    match e {
        tch::TchError::Io(e)
        | tch::TchError::SafeTensorError {
            err: safetensors::SafeTensorError::IoError(e),
            ..
        } => Error::io(path, e),
        e => Error::Weights {
            path: path.to_owned(),
            msg: e.to_string(),
        },
    }
}

/// Copies a state dict's tensors into the variables of `vs` with the same names, like PyTorch's
/// `load_state_dict(strict=True)`, except for variables whose names start with one of `skip`
/// (`&["fc."]` keeps a new output layer). `num_batches_tracked` entries are ignored (tch keeps
/// no such counter). A missing or unexpected name, or a wrong shape or dtype, is an error that
/// names it; nothing is copied then.
pub fn load_state_dict(
    vs: &VarStore,
    state: &[(String, Tensor)],
    skip: &[&str],
    source: &Path,
) -> Result<()> {
    let bad = |msg: String| Error::Weights {
        path: source.to_owned(),
        msg,
    };
    let skipped = |name: &str| skip.iter().any(|s| name.starts_with(s));
    let given: HashMap<&str, &Tensor> = state
        .iter()
        .filter(|(n, _)| !n.ends_with("num_batches_tracked") && !skipped(n))
        .map(|(n, t)| (n.as_str(), t))
        .collect();
    let vars = vs.variables();
    let mut names: Vec<&String> = vars.keys().filter(|n| !skipped(n)).collect();
    names.sort();
    for name in &names {
        let var = &vars[*name];
        let src = given
            .get(name.as_str())
            .ok_or_else(|| bad(format!("missing {name:?}")))?;
        if src.size() != var.size() {
            return Err(bad(format!(
                "{name:?} has shape {:?}, the model wants {:?}",
                src.size(),
                var.size()
            )));
        }
        if src.kind() != var.kind() {
            return Err(bad(format!(
                "{name:?} is {:?}, the model wants {:?}",
                src.kind(),
                var.kind()
            )));
        }
    }
    let mut unexpected: Vec<&&str> = given.keys().filter(|n| !vars.contains_key(**n)).collect();
    unexpected.sort();
    if let Some(name) = unexpected.first() {
        return Err(bad(format!(
            "unexpected {name:?} ({} unexpected in all)",
            unexpected.len()
        )));
    }
    tch::no_grad(|| -> Result<()> {
        for name in names {
            let mut var = vars[name].shallow_clone();
            var.f_copy_(given[name.as_str()])?;
        }
        Ok(())
    })
}
