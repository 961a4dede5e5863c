//! Gradual unfreezing, fastai's `fine_tune(epochs, freeze_epochs=1)` schedule: train the new
//! output layer alone first (the body frozen, BatchNorm still adapting), then everything.
use super::ch13::{train_ch13_with, History, TrainOptions};
use super::{Loss, ParamGroup, Trainer, SGD};
use crate::data::DataLoader;
use crate::device::Devices;
use crate::error::{Error, Result};
use crate::model::ResNet;

/// The chapter's optimiser for `net` (the notebook's `fine_tune` with `use_fine_tune`): SGD,
/// every parameter but the output layer at `lr`, the output layer `fc` at `10 * lr`, weight
/// decay 0.001.
pub fn chapter_sgd(net: &ResNet, lr: f64) -> Result<SGD> {
    let base_params = net
        .named_parameters()
        .into_iter()
        .filter(|(name, _)| !name.starts_with("fc."))
        .map(|(_, p)| p)
        .collect();
    SGD::new(
        [
            ParamGroup::new(base_params),
            ParamGroup::new(net.fc.parameters()).lr(lr * 10.0),
        ],
        lr,
        0.001,
    )
}

impl History {
    /// This run followed by `next` (a second stage on the same model): `next`'s points shifted
    /// by this run's epochs, its final figures, the examples a second over both stages' steps,
    /// the times added.
    pub fn then(&self, next: &History) -> History {
        let shift = self.num_epochs as f64;
        let mut points = self.points.clone();
        points.extend(next.points.iter().map(|p| super::Point {
            x: p.x + shift,
            ..p.clone()
        }));
        let examples = |h: &History| h.examples_per_sec * h.timing.step_s;
        let step_s = self.timing.step_s + next.timing.step_s;
        let mut config = next.config.clone();
        config.insert(
            "num_epochs".into(),
            (self.num_epochs + next.num_epochs).to_string(),
        );
        History {
            points,
            num_epochs: self.num_epochs + next.num_epochs,
            train_loss: next.train_loss,
            train_acc: next.train_acc,
            test_acc: next.test_acc,
            examples_per_sec: (examples(self) + examples(next)) / step_s.max(1e-9),
            devices: next.devices.clone(),
            config,
            timing: super::Timing {
                wall_s: self.timing.wall_s + next.timing.wall_s,
                step_s,
                data_wait_s: self.timing.data_wait_s + next.timing.data_wait_s,
                eval_s: self.timing.eval_s + next.timing.eval_s,
                comm_s: self.timing.comm_s + next.timing.comm_s,
            },
            // The second stage's (it trained the whole model), else the first's.
            layout_trial: next
                .layout_trial
                .clone()
                .or_else(|| self.layout_trial.clone()),
            settings: next.settings.clone(),
        }
    }
}

/// fastai's `fine_tune(epochs, freeze_epochs)` on the chapter's recipe: `freeze_epochs` with the
/// body frozen ([`ResNet::freeze`]: only the output layer and BatchNorm learn), then `epochs`
/// with every parameter learning, both with `trainer` (the chapter's two groups, the output
/// layer at ten times the rate: [`chapter_sgd`]). A frozen parameter has no gradient, so SGD
/// leaves it as it is, weight decay included. Returns both stages as one [`History`]
/// ([`History::then`]) and shows its curves once, at the end. The body is unfrozen afterwards,
/// also when training fails.
#[allow(clippy::too_many_arguments)]
pub fn fine_tune_gradual(
    net: &ResNet,
    train_iter: &DataLoader,
    test_iter: &DataLoader,
    loss: impl Loss + Clone,
    trainer: &mut impl Trainer,
    freeze_epochs: usize,
    epochs: usize,
    devices: &Devices,
    opts: &TrainOptions,
) -> Result<History> {
    if epochs == 0 {
        return Err(Error::arg(
            "fine_tune_gradual",
            "epochs must be at least 1 (the unfrozen stage)",
        ));
    }
    struct Unfreeze<'a>(&'a ResNet);
    impl Drop for Unfreeze<'_> {
        fn drop(&mut self) {
            self.0.unfreeze();
        }
    }
    let stage = |no_figure| TrainOptions {
        no_figure,
        ..opts.clone()
    };
    let frozen = if freeze_epochs > 0 {
        let _unfreeze = Unfreeze(net);
        net.freeze();
        if !opts.quiet && crate::dist::is_main_process() {
            println!(
                "frozen body: the output layer and BatchNorm learn for {freeze_epochs} epoch(s)"
            );
        }
        Some(train_ch13_with(
            net,
            train_iter,
            test_iter,
            loss.clone(),
            trainer,
            freeze_epochs,
            devices,
            &stage(true),
        )?)
    } else {
        None
    };
    if !opts.quiet && crate::dist::is_main_process() {
        println!("unfrozen: every parameter learns for {epochs} epoch(s)");
    }
    let all = train_ch13_with(
        net,
        train_iter,
        test_iter,
        loss,
        trainer,
        epochs,
        devices,
        &stage(true),
    )?;
    let mut history = match &frozen {
        Some(h) => h.then(&all),
        None => all,
    };
    history
        .config
        .insert("freeze_epochs".into(), freeze_epochs.to_string());
    if !opts.no_figure && crate::dist::is_main_process() {
        let name = opts
            .figure
            .clone()
            .unwrap_or_else(|| "fine_tune_gradual".into());
        history.animator().show(&name)?;
    }
    Ok(history)
}
