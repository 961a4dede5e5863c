//! PyTorch's `torch.optim.SGD` with parameter groups, on libtorch's own SGD (the C++ twin of
//! PyTorch's, the same update), and the [`Trainer`] interface `train_ch13` steps.
use tch::{COptimizer, Tensor};

use crate::error::{Error, Result};

/// Parameters that share a learning rate: PyTorch's `{'params': ..., 'lr': ...}`. Without
/// [`ParamGroup::lr`] the group takes the optimiser's.
#[derive(Debug)]
pub struct ParamGroup {
    pub params: Vec<Tensor>,
    pub lr: Option<f64>,
}

impl ParamGroup {
    pub fn new(params: Vec<Tensor>) -> ParamGroup {
        ParamGroup { params, lr: None }
    }

    /// This group's own learning rate.
    pub fn lr(mut self, lr: f64) -> ParamGroup {
        self.lr = Some(lr);
        self
    }
}

impl From<Vec<Tensor>> for ParamGroup {
    fn from(params: Vec<Tensor>) -> ParamGroup {
        ParamGroup::new(params)
    }
}

/// `torch.optim.SGD(params, lr, momentum=0, weight_decay=...)`: for each parameter with a
/// gradient, `d = grad + weight_decay * p` (then the momentum buffer, if any), `p -= lr * d`,
/// with each group's learning rate. A parameter without a gradient (frozen, or not used) is
/// left as it is, weight decay included, as in PyTorch.
///
/// The chapter's optimiser, two groups and the new output layer at ten times the rate:
///
/// ```no_run
/// # use d2l::train::{ParamGroup, SGD};
/// # fn f(net: &d2l::model::ResNet, lr: f64) -> d2l::Result<SGD> {
/// let base_params = net
///     .named_parameters()
///     .into_iter()
///     .filter(|(name, _)| name != "fc.weight" && name != "fc.bias")
///     .map(|(_, p)| p)
///     .collect();
/// SGD::new(
///     [ParamGroup::new(base_params), ParamGroup::new(net.fc.parameters()).lr(lr * 10.0)],
///     lr,
///     0.001,
/// )
/// # }
/// ```
pub struct SGD {
    opt: COptimizer,
    lrs: Vec<f64>,
}

impl SGD {
    /// Plain SGD (no momentum) over `groups`, at `lr` where a group sets none, with
    /// `weight_decay` on every parameter.
    pub fn new(
        groups: impl IntoIterator<Item = ParamGroup>,
        lr: f64,
        weight_decay: f64,
    ) -> Result<SGD> {
        SGD::with_momentum(groups, lr, 0.0, weight_decay)
    }

    /// [`SGD::new`] with momentum (PyTorch's `momentum=`, no dampening, no Nesterov).
    pub fn with_momentum(
        groups: impl IntoIterator<Item = ParamGroup>,
        lr: f64,
        momentum: f64,
        weight_decay: f64,
    ) -> Result<SGD> {
        for (what, v) in [
            ("lr", lr),
            ("momentum", momentum),
            ("weight_decay", weight_decay),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(Error::arg(
                    "SGD",
                    format!("{what} = {v}; it must be a finite number >= 0"),
                ));
            }
        }
        let mut opt = COptimizer::sgd(lr, momentum, 0.0, weight_decay, false)?;
        let mut lrs = Vec::new();
        for (g, group) in groups.into_iter().enumerate() {
            if let Some(bad) = group.params.iter().position(|p| !p.is_leaf()) {
                return Err(Error::arg(
                    "SGD",
                    format!(
                        "parameter {bad} of group {g} is computed from others (not a leaf); \
                     give the model's own tensors"
                    ),
                ));
            }
            for p in &group.params {
                opt.add_parameters(p, g)?;
            }
            let group_lr = group.lr.unwrap_or(lr);
            opt.set_learning_rate_group(g, group_lr)?;
            lrs.push(group_lr);
        }
        if lrs.is_empty() {
            return Err(Error::arg(
                "SGD",
                "no parameter groups; give at least one (net.parameters())",
            ));
        }
        Ok(SGD { opt, lrs })
    }

    /// Each group's learning rate, in order.
    pub fn lrs(&self) -> &[f64] {
        &self.lrs
    }

    /// Sets group `group`'s learning rate (a schedule's `param_groups[g]['lr'] = lr`).
    pub fn set_lr(&mut self, group: usize, lr: f64) -> Result<()> {
        let groups = self.lrs.len();
        let slot = self.lrs.get_mut(group).ok_or_else(|| {
            Error::arg("SGD::set_lr", format!("no group {group} (it has {groups})"))
        })?;
        self.opt.set_learning_rate_group(group, lr)?;
        *slot = lr;
        Ok(())
    }
}

impl std::fmt::Debug for SGD {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SGD(lrs={:?})", self.lrs)
    }
}

/// What a training loop needs of an optimiser: PyTorch's `zero_grad()` and `step()`.
pub trait Trainer {
    /// Forgets the gradients (PyTorch's `set_to_none`: the next backward starts afresh).
    fn zero_grad(&mut self) -> Result<()>;
    /// One update from the current gradients.
    fn step(&mut self) -> Result<()>;
    /// Each parameter group's learning rate, for the run's record (empty where unknown).
    fn learning_rates(&self) -> Vec<f64> {
        Vec::new()
    }
}

impl Trainer for SGD {
    fn zero_grad(&mut self) -> Result<()> {
        Ok(self.opt.zero_grad()?)
    }

    fn step(&mut self) -> Result<()> {
        Ok(self.opt.step()?)
    }

    fn learning_rates(&self) -> Vec<f64> {
        self.lrs.clone()
    }
}

/// tch's optimisers (built from a `VarStore`) train too.
impl Trainer for tch::nn::Optimizer {
    fn zero_grad(&mut self) -> Result<()> {
        tch::nn::Optimizer::zero_grad(self);
        Ok(())
    }

    fn step(&mut self) -> Result<()> {
        tch::nn::Optimizer::step(self);
        Ok(())
    }
}
