//! The learning-rate range test (fastai's `lr_find`, after Leslie Smith's "Cyclical Learning
//! Rates"): train for a few hundred steps while the learning rate grows exponentially, record
//! the smoothed loss, suggest a rate, and put the model back as it was.
use tch::Tensor;

use super::parallel::{train_batch_ch13, DataParallel, Replicate, StepOptions};
use super::{Loss, SGD};
use crate::data::DataLoader;
use crate::device::Devices;
use crate::display::Animator;
use crate::error::{Error, Result};

/// fastai's `lr_find(start_lr=1e-7, end_lr=10, num_it=100, stop_div=True)` settings.
#[derive(Clone, Debug, PartialEq)]
pub struct LrFindOptions {
    /// The first step's learning rate (of the optimiser's first group; the others keep their
    /// ratio to it, so the chapter's output layer stays at ten times the rest).
    pub start_lr: f64,
    /// The learning rate the last step would reach.
    pub end_lr: f64,
    /// Steps (batches; the loader starts another epoch when one ends).
    pub num_it: usize,
    /// Stop once the smoothed loss exceeds 4 times its minimum (or is not finite).
    pub stop_div: bool,
    /// The loss's exponential moving average factor (fastai's 0.98), debiased as fastai does.
    pub beta: f64,
    /// Precision and layout of each step.
    pub step: StepOptions,
}

impl Default for LrFindOptions {
    fn default() -> Self {
        LrFindOptions {
            start_lr: 1e-7,
            end_lr: 10.0,
            num_it: 100,
            stop_div: true,
            beta: 0.98,
            step: StepOptions::default(),
        }
    }
}

/// What [`lr_find`] recorded: one learning rate and smoothed loss a step.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LrFind {
    /// The first group's learning rate at each step.
    pub lrs: Vec<f64>,
    /// The smoothed loss per example after each step (what the figure shows).
    pub losses: Vec<f64>,
    /// The loss per example of each step's batch, before smoothing.
    pub raw_losses: Vec<f64>,
    /// fastai's default suggestion (`valley`): a rate about two thirds down the longest
    /// stretch where the loss keeps falling.
    pub valley: f64,
    /// fastai's `minimum`: the rate of the lowest smoothed loss, divided by 10.
    pub minimum: f64,
    /// fastai's `steep`: the rate where the smoothed loss falls fastest (per log-lr unit).
    pub steep: f64,
}

impl LrFind {
    /// The suggested learning rate: [`LrFind::valley`], as fastai suggests by default.
    pub fn suggestion(&self) -> f64 {
        self.valley
    }

    /// fastai's plot: the smoothed loss against the learning rate on a log axis, the suggestion
    /// marked by a dotted vertical line. Show it with `.show(name)`.
    pub fn figure(&self) -> Result<Animator> {
        let shown = shown_range(self.lrs.len());
        let (lrs, losses) = (&self.lrs[shown.clone()], &self.losses[shown]);
        let (lo, hi) = losses
            .iter()
            .filter(|v| v.is_finite())
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
                (lo.min(v), hi.max(v))
            });
        let mut animator = Animator::new()
            .xscale("log")?
            .xlabel("learning rate")
            .ylabel("loss")
            .fmts(&["-", "r:"])
            .legend_loc("upper left")?
            .legend(&["smoothed loss", &format!("valley {:.1e}", self.valley)]);
        for (&lr, &l) in lrs.iter().zip(losses) {
            animator.add(lr, &[Some(l), None]);
        }
        if lo.is_finite() && hi.is_finite() {
            animator.add(self.valley, &[None, Some(lo)]);
            animator.add(self.valley, &[None, Some(hi)]);
        }
        Ok(animator)
    }
}

/// The points fastai's suggestions and plot look at: the first tenth and the last five steps
/// left out (the start is noise, the end diverges), when that leaves enough.
fn shown_range(n: usize) -> std::ops::Range<usize> {
    let (start, end) = (n / 10, n.saturating_sub(5));
    if end > start + 2 {
        start..end
    } else {
        0..n
    }
}

/// fastai's `valley`: the longest decreasing subsequence of the losses, and the rate at a point
/// a bit past its middle (`start + len/3 + len/6`, of the index span).
fn valley(lrs: &[f64], losses: &[f64]) -> f64 {
    let n = losses.len();
    let mut lds = vec![1i64; n];
    // Signed, as in Python: a run from the very first point starts at -1.
    let (mut max_start, mut max_end) = (0i64, 0usize);
    for i in 1..n {
        for j in 0..i {
            if losses[i] < losses[j] && lds[i] < lds[j] + 1 {
                lds[i] = lds[j] + 1;
            }
            if lds[max_end] < lds[i] {
                max_end = i;
                max_start = max_end as i64 - lds[max_end];
            }
        }
    }
    let sections = (max_end as i64 - max_start) as f64 / 3.0;
    let idx = max_start + sections as i64 + (sections / 2.0) as i64;
    // Python's indexing: -1 is the last.
    let idx = if idx < 0 { n as i64 + idx } else { idx };
    lrs[(idx.max(0) as usize).min(n - 1)]
}

/// fastai's `steep`: the rate where the loss falls fastest against log(lr) (the start of the
/// steepest segment, as fastai's `lrs[grads.argmin()]`).
fn steep(lrs: &[f64], losses: &[f64]) -> f64 {
    let mut best = (f64::INFINITY, lrs[0]);
    for i in 1..losses.len() {
        let slope = (losses[i] - losses[i - 1]) / (lrs[i].log10() - lrs[i - 1].log10());
        if slope.is_finite() && slope < best.0 {
            best = (slope, lrs[i - 1]);
        }
    }
    best.1
}

/// The LR range test (fastai's `learn.lr_find()`): `make_optimizer(start_lr)` builds the
/// optimiser (the parameter groups and weight decay of the recipe under test); then for
/// `num_it` steps over `train_iter` the first group's rate grows from `start_lr` to `end_lr`
/// exponentially (the other groups keep their ratio to it), recording the smoothed loss per
/// example, and stopping early once it diverges. Afterwards every parameter and BatchNorm
/// statistic of `net` is put back as it was (the optimiser, and its state, are dropped), so the
/// next training starts from the same weights.
pub fn lr_find<N: Replicate>(
    net: &N,
    train_iter: &DataLoader,
    loss: impl Loss,
    make_optimizer: impl FnOnce(f64) -> Result<SGD>,
    devices: &Devices,
    opts: &LrFindOptions,
) -> Result<LrFind> {
    let LrFindOptions {
        start_lr,
        end_lr,
        num_it,
        beta,
        ..
    } = *opts;
    if !(start_lr > 0.0 && end_lr > start_lr && end_lr.is_finite()) || num_it < 2 {
        return Err(Error::arg(
            "lr_find",
            format!(
                "start_lr {start_lr}, end_lr {end_lr}, num_it {num_it}: give 0 < start_lr < end_lr and num_it >= 2"
            ),
        ));
    }
    if !(0.0..1.0).contains(&beta) {
        return Err(Error::arg(
            "lr_find",
            format!("beta {beta} must be in [0, 1)"),
        ));
    }
    if train_iter.is_empty() {
        return Err(Error::arg("lr_find", "the training loader has no images"));
    }
    let mut optimizer = make_optimizer(start_lr)?;
    let ratios: Vec<f64> = optimizer.lrs().iter().map(|lr| lr / start_lr).collect();
    // What to put back: copies of every tensor (parameters and running statistics).
    let saved: Vec<Tensor> = tch::no_grad(|| {
        net.named_tensors()
            .iter()
            .map(|(_, t)| t.f_detach_copy())
            .collect::<std::result::Result<_, _>>()
    })?;
    let recorded = run(
        net,
        train_iter,
        &loss,
        &mut optimizer,
        devices,
        opts,
        &ratios,
    );
    drop(optimizer);
    tch::no_grad(|| -> Result<()> {
        for ((_, t), s) in net.named_tensors().iter().zip(&saved) {
            t.shallow_clone().f_copy_(s)?;
            let mut g = t.grad();
            if g.defined() {
                let _ = g.f_zero_()?;
            }
        }
        Ok(())
    })?;
    let (lrs, losses, raw_losses) = recorded?;
    if lrs.len() < 2 {
        return Err(Error::arg(
            "lr_find",
            format!(
                "the loss diverged after {} step(s) from {start_lr:e}; start lower",
                lrs.len()
            ),
        ));
    }
    let shown = shown_range(lrs.len());
    let (l, s) = (&lrs[shown.clone()], &losses[shown]);
    let finite: Vec<usize> = (0..s.len()).filter(|&i| s[i].is_finite()).collect();
    let (fl, fs): (Vec<f64>, Vec<f64>) = finite.iter().map(|&i| (l[i], s[i])).unzip();
    if fl.len() < 2 {
        return Err(Error::arg(
            "lr_find",
            format!("the loss was not finite from {start_lr:e} on; start lower"),
        ));
    }
    let min_at = (0..fs.len())
        .min_by(|&a, &b| fs[a].total_cmp(&fs[b]))
        .unwrap_or(0);
    Ok(LrFind {
        valley: valley(&fl, &fs),
        minimum: fl[min_at] / 10.0,
        steep: steep(&fl, &fs),
        lrs,
        losses,
        raw_losses,
    })
}

type Recorded = (Vec<f64>, Vec<f64>, Vec<f64>);

fn run<N: Replicate>(
    net: &N,
    train_iter: &DataLoader,
    loss: &impl Loss,
    optimizer: &mut SGD,
    devices: &Devices,
    opts: &LrFindOptions,
    ratios: &[f64],
) -> Result<Recorded> {
    let mut parallel = DataParallel::new(net, devices)?;
    let (mut lrs, mut losses, mut raw) = (Vec::new(), Vec::new(), Vec::new());
    let (mut avg, mut best) = (0.0f64, f64::INFINITY);
    let growth = (opts.end_lr / opts.start_lr).ln() / (opts.num_it - 1) as f64;
    'epochs: loop {
        for batch in train_iter {
            let i = lrs.len();
            if i >= opts.num_it {
                break 'epochs;
            }
            let lr = opts.start_lr * (growth * i as f64).exp();
            for (g, ratio) in ratios.iter().enumerate() {
                optimizer.set_lr(g, lr * ratio)?;
            }
            let (x, y) = batch?;
            let n = y.size()[0].max(1) as f64;
            let (sum, _) = train_batch_ch13(&mut parallel, &x, &y, loss, optimizer, &opts.step)?;
            let l = sum / n;
            avg = opts.beta * avg + (1.0 - opts.beta) * l;
            let smooth = avg / (1.0 - opts.beta.powi(i as i32 + 1));
            lrs.push(lr);
            losses.push(smooth);
            raw.push(l);
            if smooth < best {
                best = smooth;
            }
            if opts.stop_div && (!smooth.is_finite() || smooth > 4.0 * best) {
                break 'epochs;
            }
        }
    }
    Ok((lrs, losses, raw))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions_are_fastais() {
        // Computed with fastai's own `valley` and `steep` (Python): the longest decreasing run
        // ends at 8 and is 8 long (from 2.1 at index 1), so start 0, sections 8/3, index
        // 0 + 2 + 1 = 3; the steepest fall is 1.9 -> 1.0, and fastai takes the rate where that
        // segment starts (`lrs[grads.argmin()]`), index 2; the minimum 0.5 at index 8, over 10.
        let lrs: Vec<f64> = (0..12).map(|i| 10f64.powi(i - 6)).collect();
        let losses = [2.0, 2.1, 1.9, 1.0, 0.8, 0.7, 0.6, 0.55, 0.5, 0.9, 2.0, 5.0];
        assert_eq!(valley(&lrs, &losses), lrs[3]);
        assert_eq!(steep(&lrs, &losses), lrs[2]);
    }

    #[test]
    fn valley_of_a_loss_falling_from_the_start_indexes_as_python() {
        // Falling all the way: lds[i] = i + 1, so fastai's max_start is -1; 6 points give
        // sections 2.0 and idx -1 + 2 + 1 = 2.
        let lrs: Vec<f64> = (0..6).map(f64::from).collect();
        assert_eq!(valley(&lrs, &[6.0, 5.0, 4.0, 3.0, 2.0, 1.0]), 2.0);
    }

    #[test]
    fn shown_range_leaves_out_the_ends() {
        assert_eq!(shown_range(100), 10..95);
        assert_eq!(shown_range(6), 0..6);
    }
}
