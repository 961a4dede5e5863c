//! The chapter's loss and optimiser, with PyTorch's semantics.
use tch::nn::{self, Optimizer, OptimizerConfig, VarStore};
use tch::{Reduction, Tensor};

use crate::error::Result;

/// `nn.CrossEntropyLoss(reduction="none")`: one loss an example, in the logits' precision (in
/// float32 under CUDA autocast, as PyTorch's: `log_softmax` is on autocast's float32 list).
///
/// # Shapes
/// `y_hat` `[n, classes]` logits, `y` `[n]` labels -> `[n]`
pub fn cross_entropy(y_hat: &Tensor, y: &Tensor) -> Result<Tensor> {
    Ok(y_hat
        .f_log_softmax(-1, None)?
        .f_nll_loss::<&Tensor>(y, None, Reduction::None, -100)?)
}

/// The chapter's `torch.optim.SGD(..., lr=lr, weight_decay=weight_decay)`: no momentum, weight
/// decay on every parameter (BatchNorm's too). With `param_group`, the parameters of optimiser
/// group 1 (the new output layer of [`resnet18_fine_tune`](crate::model::resnet18_fine_tune))
/// learn at `10 * lr`, the rest at `lr`; without, all at `lr`.
///
/// Set learning rates later with `set_lr_group`: tch's `set_lr` overwrites every group.
pub fn sgd(vs: &VarStore, lr: f64, weight_decay: f64, param_group: bool) -> Result<Optimizer> {
    let mut opt = nn::Sgd {
        momentum: 0.0,
        dampening: 0.0,
        wd: weight_decay,
        nesterov: false,
    }
    .build(vs, lr)?;
    if param_group {
        opt.set_lr_group(1, 10.0 * lr);
    }
    Ok(opt)
}
