//! PyTorch's `torch.optim.SGD` with parameter groups, and the [`Trainer`] interface `train_ch13`
//! steps.
use std::os::raw::c_char;

use tch::{COptimizer, Tensor};
use torch_sys::C_tensor;

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
/// left as it is, weight decay included, as in PyTorch. Without momentum, a contiguous float32
/// CPU parameter is updated in one pass (`sgd.cpp`: PyTorch's two multiply-adds, without its
/// temporary `d`: 4.2 -> 2.3 ms a step for ResNet-18 on a 2-core AMD EPYC).
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
    /// Without momentum: libtorch's SGD, for `zero_grad` (the step is `plain_step`'s).
    opt: Option<COptimizer>,
    lrs: Vec<f64>,
    /// The parameters of each group, for the momentum path.
    groups: Vec<Vec<Tensor>>,
    momentum: f64,
    weight_decay: f64,
    /// With momentum: PyTorch's `momentum_buffer` of each parameter (in group order), made at
    /// its first update; kept here so that a checkpoint can save them.
    bufs: Vec<Option<Tensor>>,
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
        let mut opt = if momentum == 0.0 {
            Some(COptimizer::sgd(lr, 0.0, 0.0, weight_decay, false)?)
        } else {
            None
        };
        let mut lrs = Vec::new();
        let mut params = Vec::new();
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
            let group_lr = group.lr.unwrap_or(lr);
            if let Some(opt) = &mut opt {
                for p in &group.params {
                    opt.add_parameters(p, g)?;
                }
                opt.set_learning_rate_group(g, group_lr)?;
            }
            lrs.push(group_lr);
            params.push(group.params);
        }
        if lrs.is_empty() {
            return Err(Error::arg(
                "SGD",
                "no parameter groups; give at least one (net.parameters())",
            ));
        }
        let count = params.iter().map(Vec::len).sum();
        Ok(SGD {
            opt,
            lrs,
            groups: params,
            momentum,
            weight_decay,
            bufs: (0..count).map(|_| None).collect(),
        })
    }

    /// Without momentum: `sgd.cpp`, each parameter's update in one pass (`d2l_sgd_step`).
    fn plain_step(&mut self) -> Result<()> {
        let mut ptrs = Vec::new();
        let mut lrs = Vec::new();
        for (params, &lr) in self.groups.iter().zip(&self.lrs) {
            for p in params {
                ptrs.push(p.as_ptr());
                lrs.push(lr);
            }
        }
        let mut err = [0 as c_char; 512];
        // SAFETY: `ptrs` are this optimiser's live parameters (kept by `self.groups` for the
        // call), `lrs` has one rate each; the function writes at most `err.len()` bytes of a
        // NUL-terminated message and returns non-zero on failure.
        let rc = unsafe {
            d2l_sgd_step(
                ptrs.as_ptr(),
                lrs.as_ptr(),
                ptrs.len() as i64,
                self.weight_decay,
                err.as_mut_ptr(),
                err.len(),
            )
        };
        if rc == 0 {
            return Ok(());
        }
        // SAFETY: NUL-terminated by the function (and the buffer starts zeroed).
        let msg = unsafe { std::ffi::CStr::from_ptr(err.as_ptr()) };
        Err(Error::Torch(tch::TchError::Torch(format!(
            "SGD::step: {}",
            msg.to_string_lossy()
        ))))
    }

    /// The momentum path: torch.optim.SGD's update (no dampening, no Nesterov) for each
    /// parameter with a gradient: `d = grad + weight_decay * p`; the buffer `d` at the first
    /// update, `momentum * buf + d` after; `p -= lr * buf`. It agrees with PyTorch's to float
    /// rounding (PyTorch fuses `grad + weight_decay * p` and `p - lr * buf` into single
    /// multiply-adds).
    fn momentum_step(&mut self) -> Result<()> {
        let (momentum, wd) = (self.momentum, self.weight_decay);
        let mut k = 0;
        tch::no_grad(|| -> Result<()> {
            for (params, &lr) in self.groups.iter().zip(&self.lrs) {
                for p in params {
                    let slot = &mut self.bufs[k];
                    k += 1;
                    let grad = p.grad();
                    if !grad.defined() {
                        continue;
                    }
                    let d = if wd != 0.0 {
                        grad.f_add(&p.f_mul_scalar(wd)?)?
                    } else {
                        grad
                    };
                    let buf = match slot.take() {
                        None => d.f_detach_copy()?,
                        Some(mut b) => {
                            let _ = b.f_mul_scalar_(momentum)?;
                            let _ = b.f_add_(&d)?;
                            b
                        }
                    };
                    let _ = p.shallow_clone().f_sub_(&buf.f_mul_scalar(lr)?)?;
                    *slot = Some(buf);
                }
            }
            Ok(())
        })
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
        if let Some(opt) = &mut self.opt {
            opt.set_learning_rate_group(group, lr)?;
        }
        *slot = lr;
        Ok(())
    }
}

extern "C" {
    /// `sgd.cpp`: for each parameter with a gradient, `d = grad + wd * p`, `p += -lr * d`, in
    /// one pass for contiguous float32 CPU tensors (libtorch's two operations for the others).
    fn d2l_sgd_step(
        params: *const *const C_tensor,
        lrs: *const f64,
        n: i64,
        wd: f64,
        err: *mut c_char,
        len: usize,
    ) -> i32;
}

impl std::fmt::Debug for SGD {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SGD(lrs={:?}, momentum={}, weight_decay={})",
            self.lrs, self.momentum, self.weight_decay
        )
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
    /// The optimiser's state as tensors (momentum buffers), for a training checkpoint; an
    /// optimiser that cannot give it says so ([`Error::Unsupported`]).
    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        Err(Error::Unsupported {
            what: "this optimiser cannot save its state for a training checkpoint; use d2l::train::SGD"
                .into(),
        })
    }
    /// Puts back what [`Trainer::state`] gave.
    fn load_state(&mut self, state: &[(String, Tensor)]) -> Result<()> {
        let _ = state;
        Err(Error::Unsupported {
            what: "this optimiser cannot load a training checkpoint's state; use d2l::train::SGD"
                .into(),
        })
    }
}

impl Trainer for SGD {
    fn zero_grad(&mut self) -> Result<()> {
        match &mut self.opt {
            Some(opt) => Ok(opt.zero_grad()?),
            None => {
                for p in self.groups.iter().flatten() {
                    let mut g = p.grad();
                    if g.defined() {
                        let _ = g.f_detach_()?;
                        let _ = g.f_zero_()?;
                    }
                }
                Ok(())
            }
        }
    }

    fn step(&mut self) -> Result<()> {
        match &mut self.opt {
            Some(_) => self.plain_step(),
            None => self.momentum_step(),
        }
    }

    fn learning_rates(&self) -> Vec<f64> {
        self.lrs.clone()
    }

    /// `momentum_buffer.<k>` for each parameter `k` (in group order) that has one; nothing
    /// without momentum (plain SGD keeps no state).
    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(self
            .bufs
            .iter()
            .enumerate()
            .filter_map(|(k, b)| {
                b.as_ref()
                    .map(|b| (format!("momentum_buffer.{k}"), b.shallow_clone()))
            })
            .collect())
    }

    fn load_state(&mut self, state: &[(String, Tensor)]) -> Result<()> {
        let mut bufs: Vec<Option<Tensor>> = (0..self.bufs.len()).map(|_| None).collect();
        for (name, t) in state {
            let k = name
                .strip_prefix("momentum_buffer.")
                .and_then(|k| k.parse::<usize>().ok())
                .filter(|&k| k < bufs.len())
                .ok_or_else(|| {
                    Error::arg(
                        "SGD::load_state",
                        format!(
                            "{name:?} is not a momentum buffer of this optimiser's {} parameters",
                            bufs.len()
                        ),
                    )
                })?;
            let p = self
                .groups
                .iter()
                .flatten()
                .nth(k)
                .expect("k < the number of parameters");
            if t.size() != p.size() {
                return Err(Error::arg(
                    "SGD::load_state",
                    format!(
                        "{name} has shape {:?}, its parameter {:?}",
                        t.size(),
                        p.size()
                    ),
                ));
            }
            bufs[k] = Some(t.f_to_device(p.device())?.f_to_kind(p.kind())?);
        }
        if self.momentum == 0.0 && bufs.iter().any(Option::is_some) {
            return Err(Error::arg(
                "SGD::load_state",
                "momentum buffers for an optimiser without momentum",
            ));
        }
        self.bufs = bufs;
        Ok(())
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
