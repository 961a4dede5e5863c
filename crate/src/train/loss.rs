//! The chapter's loss, with PyTorch's semantics.
use tch::{Reduction, Tensor};

use crate::error::Result;

/// A loss a training loop can call: `loss(y_hat, y)`. `train_ch13` sums what it returns over the
/// batch (d2l's `l.sum().backward()`). Closures `Fn(&Tensor, &Tensor) -> Result<Tensor>` are losses.
pub trait Loss: Send + Sync {
    fn loss(&self, y_hat: &Tensor, y: &Tensor) -> Result<Tensor>;
}

impl<F: Fn(&Tensor, &Tensor) -> Result<Tensor> + Send + Sync> Loss for F {
    fn loss(&self, y_hat: &Tensor, y: &Tensor) -> Result<Tensor> {
        self(y_hat, y)
    }
}

/// `nn.CrossEntropyLoss(reduction=...)` over logits: the chapter's
/// `nn.CrossEntropyLoss(reduction='none')` is `CrossEntropyLoss::new(Reduction::None)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CrossEntropyLoss {
    pub reduction: Reduction,
}

impl CrossEntropyLoss {
    pub fn new(reduction: Reduction) -> CrossEntropyLoss {
        CrossEntropyLoss { reduction }
    }
}

impl Loss for CrossEntropyLoss {
    /// # Shapes
    /// `y_hat` `[n, classes]` logits, `y` `[n]` labels -> `[n]` (`Reduction::None`) or `[]`
    fn loss(&self, y_hat: &Tensor, y: &Tensor) -> Result<Tensor> {
        // In the logits' precision (float32 under CUDA autocast, as PyTorch's: `log_softmax` is
        // on autocast's float32 list).
        Ok(y_hat
            .f_log_softmax(-1, None)?
            .f_nll_loss::<&Tensor>(y, None, self.reduction, -100)?)
    }
}

/// `CrossEntropyLoss::new(Reduction::None)` as a function: one loss an example.
///
/// # Shapes
/// `y_hat` `[n, classes]` logits, `y` `[n]` labels -> `[n]`
pub fn cross_entropy(y_hat: &Tensor, y: &Tensor) -> Result<Tensor> {
    CrossEntropyLoss::new(Reduction::None).loss(y_hat, y)
}
