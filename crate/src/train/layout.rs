//! The memory layout of a CPU training run (NCHW or channels-last), chosen by timing training
//! steps on the machine that runs.
//!
//! Which layout trains faster depends on the CPU and on the kernels libtorch picks for it
//! (`ATEN_CPU_CAPABILITY`, `ONEDNN_MAX_CPU_ISA`): on one 2-core AMD EPYC (AVX-512) ResNet-18 at 224
//! px ran its steps about 10% faster in channels-last (its max pooling alone 9x faster), on an
//! earlier 2-core machine channels-last took 1.2-1.3 times as long at 64 px. So
//! [`train_ch13`](super::train_ch13) times both on its first full-size batches: the first step in
//! NCHW and the second in channels-last warm up (oneDNN builds its kernels for each layout's
//! shapes), then two steps in each are timed, in the order NCHW, channels-last, channels-last, NCHW
//! (so that a drift in the machine's speed falls on both), and where the quickest steps still
//! differ by under 5%, a third pair; the quickest step of each decides (the loader and other
//! programs only ever slow a step down). One timed step each is not enough: on a 2-core AMD EPYC
//! (Zen 3) at 224 px one NCHW step of 3.81 s against channels-last's 2.96 chose channels-last,
//! which ran its steps in 3.53-3.54 s there against NCHW's 2.86-3.11. An epoch's first step is not
//! timed: the loader is then decoding the epoch's first batches at once. The rest of the run,
//! evaluation included, uses the faster layout; when it ends the model is given back in the
//! standard layout. These are real training steps, the same arithmetic in another order, so the
//! trial costs only the slower layout's extra time on a few steps.
//! [`History::layout_trial`](super::History::layout_trial) keeps the times. The choice
//! is kept in the tuning cache ([`crate::tuning`]): a later process on the same machine that
//! trains the same model on batches of the same shape takes it at its first step and times
//! nothing (`LayoutTrial::cached`).
//!
//! Only for float32 models on one CPU device in one process, with `StepOptions::channels_last`
//! off (on, it is channels-last throughout). [`set_layout_autotune`]`(false)` or
//! `D2L_LAYOUT_AUTOTUNE=0` keeps NCHW throughout: runs compared bit for bit across processes
//! need that (a resumed run makes its own trial).
use serde::{Deserialize, Serialize};

use super::parallel::{convert_channels_last, Replicate};
use crate::error::Result;
use crate::switch::EnvSwitch;

static AUTOTUNE: EnvSwitch = EnvSwitch::new("D2L_LAYOUT_AUTOTUNE");

/// Whether CPU training chooses its layout by timing (the default; `D2L_LAYOUT_AUTOTUNE=0` in
/// the environment makes it `false` at start). Process-wide.
pub fn set_layout_autotune(enabled: bool) {
    AUTOTUNE.set(enabled);
}

/// See [`set_layout_autotune`].
pub fn layout_autotune() -> bool {
    AUTOTUNE.get()
}

/// Timed steps in each layout before the trial may end (see the module's text).
const MIN_TIMED: usize = 2;

/// After 2 and 3 timed steps in each layout: how much faster the faster layout's quickest step
/// must be to end the trial there (after the third, any difference decides).
const WINS_AFTER: [f64; 2] = [1.05, 1.0];

/// What a run's layout trial measured: the seconds of its timed steps in each layout (all of
/// the same batch size) and what it kept.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LayoutTrial {
    /// The batch size of the timed steps.
    pub batch: i64,
    pub nchw_s: Vec<f64>,
    pub channels_last_s: Vec<f64>,
    /// The layout kept: `Some(true)` channels-last, `Some(false)` NCHW, `None` when the run
    /// ended before the trial did (it then trained in both).
    pub channels_last: Option<bool>,
    /// Read from the tuning cache: an earlier process on this machine timed this model on
    /// batches of this shape (the times are its), and this run took its choice from the first
    /// step (see [`crate::tuning`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cached: bool,
}

/// The trial while it runs: which layout each full-size step takes, and the times.
#[derive(Debug)]
pub(crate) struct Trial {
    record: LayoutTrial,
    /// Trial steps taken so far.
    steps: usize,
    /// Whether the model is channels-last now.
    current: bool,
    /// The model's signature for the tuning cache (`None`: the cache is not used).
    model: Option<String>,
    /// The shape of the trial's batches, once the first has come.
    input: Option<Vec<i64>>,
}

/// The layout of the `k`-th trial step (`true`: channels-last) and whether it is timed: NCHW,
/// channels-last (warming up: oneDNN builds its kernels for each layout's shapes on first use),
/// then timed in the order NCHW, channels-last, channels-last, NCHW, NCHW, channels-last (a
/// drift in the machine's speed falls on both).
fn schedule(k: usize) -> Option<(bool, bool)> {
    const PLAN: [(bool, bool); 8] = [
        (false, false),
        (true, false),
        (false, true),
        (true, true),
        (true, true),
        (false, true),
        (false, true),
        (true, true),
    ];
    PLAN.get(k).copied()
}

/// The least of `times`.
fn quickest(times: &[f64]) -> f64 {
    times.iter().copied().fold(f64::INFINITY, f64::min)
}

impl Trial {
    /// A trial for batches of `batch`, the model in NCHW now. With `model` (its
    /// [`crate::tuning`] signature), a choice the tuning cache holds for it and the batches'
    /// shape is taken at the first full-size step, and a choice made by timing is kept there.
    pub(crate) fn new(batch: i64, model: Option<String>) -> Trial {
        Trial {
            record: LayoutTrial {
                batch,
                ..LayoutTrial::default()
            },
            steps: 0,
            current: false,
            model,
            input: None,
        }
    }

    /// The layout kept, once the trial is over.
    pub(crate) fn decided(&self) -> Option<bool> {
        self.record.channels_last
    }

    /// Whether the choice came from the tuning cache.
    pub(crate) fn is_cached(&self) -> bool {
        self.record.cached
    }

    /// Whether the model is channels-last now.
    pub(crate) fn channels_last(&self) -> bool {
        self.current
    }

    /// Whether a step on a batch of `n` is a trial step: full size, the trial not over, and not
    /// an epoch's first step where that one would be timed (the loader is then decoding the
    /// epoch's first batches all at once, on the cores the step runs on).
    fn is_trial_step(&self, n: i64, first_of_epoch: bool) -> Option<(bool, bool)> {
        if n != self.record.batch || self.record.channels_last.is_some() {
            return None;
        }
        schedule(self.steps).filter(|&(_, timed)| !(timed && first_of_epoch))
    }

    /// Before a step on a batch of shape `input` (`[n, c, h, w]`): puts `net` in the layout
    /// this step is to take (other steps, like an epoch's last, partial one, take the current
    /// one). At the first full-size batch, a choice in the tuning cache ends the trial at once.
    pub(crate) fn before_step(
        &mut self,
        net: &impl Replicate,
        input: &[i64],
        first_of_epoch: bool,
    ) -> Result<()> {
        let n = input.first().copied().unwrap_or(0);
        if self.input.is_none() && n == self.record.batch {
            self.input = Some(input.to_vec());
            if let Some(cached) = self.cached(input) {
                let chosen = cached.channels_last;
                self.record = LayoutTrial {
                    cached: true,
                    ..cached
                };
                return self.set(net, chosen == Some(true));
            }
        }
        if let Some((layout, _)) = self.is_trial_step(n, first_of_epoch) {
            self.set(net, layout)?;
        }
        Ok(())
    }

    /// After that step, which took `secs`: records it, and once the trial is over puts `net`
    /// in the faster layout.
    pub(crate) fn after_step(
        &mut self,
        net: &impl Replicate,
        n: i64,
        first_of_epoch: bool,
        secs: f64,
    ) -> Result<()> {
        let Some((layout, timed)) = self.is_trial_step(n, first_of_epoch) else {
            return Ok(());
        };
        self.steps += 1;
        if !timed {
            return Ok(());
        }
        let r = &mut self.record;
        if layout {
            r.channels_last_s.push(secs);
        } else {
            r.nchw_s.push(secs);
        }
        let pairs = r.nchw_s.len();
        if pairs != r.channels_last_s.len() || pairs < MIN_TIMED {
            return Ok(());
        }
        let (nchw, cl) = (quickest(&r.nchw_s), quickest(&r.channels_last_s));
        let needed = WINS_AFTER[(pairs - MIN_TIMED).min(WINS_AFTER.len() - 1)];
        if nchw.max(cl) < needed * nchw.min(cl) && schedule(self.steps).is_some() {
            return Ok(());
        }
        let chosen = cl < nchw;
        r.channels_last = Some(chosen);
        self.keep();
        self.set(net, chosen)
    }

    /// A decided trial of this model on batches of `input` in the tuning cache.
    fn cached(&self, input: &[i64]) -> Option<LayoutTrial> {
        let model = self.model.as_ref()?;
        crate::tuning::load()
            .layout
            .into_iter()
            .find(|e| &e.model == model && e.input == input && e.trial.channels_last.is_some())
            .map(|e| e.trial)
    }

    /// Puts the decided trial in the tuning cache.
    fn keep(&self) {
        let (Some(model), Some(input)) = (&self.model, &self.input) else {
            return;
        };
        let entry = crate::tuning::LayoutEntry {
            model: model.clone(),
            input: input.clone(),
            trial: self.record.clone(),
        };
        crate::tuning::update(|t| {
            t.layout
                .retain(|e| !(e.model == entry.model && e.input == entry.input));
            t.layout.push(entry);
        });
    }

    /// Ends the trial: `net` back in the standard layout; what was measured.
    pub(crate) fn finish(mut self, net: &impl Replicate) -> Result<LayoutTrial> {
        self.set(net, false)?;
        Ok(self.record)
    }

    fn set(&mut self, net: &impl Replicate, channels_last: bool) -> Result<()> {
        if channels_last != self.current {
            if channels_last {
                convert_channels_last(net)?;
            } else {
                convert_contiguous(net)?;
            }
            self.current = channels_last;
        }
        Ok(())
    }
}

/// Gives every 4-D tensor of `net` the standard (NCHW, contiguous) layout, in place: the
/// inverse of [`convert_channels_last`].
pub fn convert_contiguous(net: &impl Replicate) -> Result<()> {
    for (_, mut t) in net.named_tensors() {
        if t.dim() == 4 && !t.is_contiguous() {
            let nchw = t.detach().f_contiguous()?;
            t.f_set_data(&nchw)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::VarStore;

    #[test]
    fn the_schedule_warms_up_both_then_times_abba() {
        let plan: Vec<_> = (0..9).map(schedule).collect();
        assert_eq!(
            plan,
            [
                Some((false, false)),
                Some((true, false)),
                Some((false, true)),
                Some((true, true)),
                Some((true, true)),
                Some((false, true)),
                Some((false, true)),
                Some((true, true)),
                None
            ]
        );
    }

    fn conv1_channels_last(net: &crate::model::ResNet) -> bool {
        let w = &net.named_tensors()[0].1; // conv1.weight [64, 3, 7, 7]
        !w.is_contiguous() && w.stride()[1] == 1
    }

    /// Runs a trial on batches of 4 with the given step times (`(first_of_epoch, n, secs)`),
    /// checking before each step that the model is in the layout the schedule says.
    fn run(steps: &[(bool, i64, f64)]) -> (Trial, crate::model::ResNet, VarStore) {
        let vs = VarStore::new(tch::Device::Cpu);
        let net = crate::model::resnet18(&vs.root(), 2);
        let mut trial = Trial::new(4, None);
        for &(first, n, secs) in steps {
            trial.before_step(&net, &[n, 3, 8, 8], first).unwrap();
            assert_eq!(conv1_channels_last(&net), trial.channels_last());
            trial.after_step(&net, n, first, secs).unwrap();
            assert_eq!(conv1_channels_last(&net), trial.channels_last());
        }
        (trial, net, vs)
    }

    /// [`run`] on full batches, none an epoch's first, that took `times`.
    fn run_times(times: &[f64]) -> (Trial, crate::model::ResNet, VarStore) {
        let steps: Vec<_> = times.iter().map(|&t| (false, 4, t)).collect();
        run(&steps)
    }

    #[test]
    fn a_clear_win_ends_the_trial_after_two_timed_steps_each() {
        // Warm-ups (any time), then NCHW 1.0 s, channels-last 0.8 s: 1.25x, but one step each
        // does not decide; then channels-last 0.85, NCHW 1.1.
        let first = [
            (true, 4, 9.0),
            (false, 4, 9.0),
            (false, 4, 1.0),
            (false, 4, 0.8),
        ];
        let (trial, _, _vs) = run(&first);
        assert_eq!(trial.decided(), None);
        let (mut trial, net, _vs) =
            run(&[first.as_slice(), &[(false, 4, 0.85), (false, 4, 1.1)]].concat());
        assert_eq!(trial.decided(), Some(true));
        assert_eq!(trial.record.nchw_s, [1.0, 1.1]);
        assert_eq!(trial.record.channels_last_s, [0.8, 0.85]);
        assert!(conv1_channels_last(&net));
        // Later steps keep it; finishing gives the model back in NCHW.
        trial.before_step(&net, &[4, 3, 8, 8], false).unwrap();
        assert!(conv1_channels_last(&net));
        let record = trial.finish(&net).unwrap();
        assert_eq!(record.channels_last, Some(true));
        assert!(net.named_tensors().iter().all(|(_, t)| t.is_contiguous()));
    }

    #[test]
    fn one_slow_step_does_not_decide() {
        // NCHW's first timed step slowed by a drift (1.3 s against 0.8 for channels-last), its
        // second 0.7 s, channels-last's second 0.82: NCHW.
        let (trial, net, _vs) = run_times(&[9.0, 9.0, 1.3, 0.8, 0.82, 0.7]);
        assert_eq!(trial.decided(), Some(false));
        assert!(!conv1_channels_last(&net));
    }

    #[test]
    fn close_times_take_more_steps_and_the_quickest_decides() {
        // 1.0 against 0.95 (1.05x): not yet; then channels-last 0.97, NCHW 0.92: the quickest
        // are 0.92 and 0.95, 1.03x: not yet; then NCHW 0.99, channels-last 0.90: 0.92 against 0.90.
        let times = [9.0, 9.0, 1.0, 0.95, 0.97, 0.92, 0.99, 0.90];
        let (trial, net, _vs) = run_times(&times[..6]);
        assert_eq!(trial.decided(), None);
        assert!(!conv1_channels_last(&net)); // the sixth trial step was NCHW
        let (trial, net, _vs) = run_times(&times);
        assert_eq!(trial.decided(), Some(true));
        assert_eq!(trial.record.nchw_s, [1.0, 0.92, 0.99]);
        assert_eq!(trial.record.channels_last_s, [0.95, 0.97, 0.90]);
        assert!(conv1_channels_last(&net));
        // A 1.05x difference in the second pair decides there: NCHW 1.0, 0.9; CL 1.2, 0.95.
        let (trial, net, _vs) = run_times(&[9.0, 9.0, 1.0, 1.2, 0.95, 0.9]);
        assert_eq!(trial.decided(), Some(false));
        assert!(!conv1_channels_last(&net));
    }

    #[test]
    fn partial_batches_and_an_epochs_first_timed_step_are_not_counted() {
        let (trial, net, _vs) = run(&[
            (true, 4, 9.0),  // warm-up NCHW (an epoch's first step may warm up)
            (false, 4, 9.0), // warm-up channels-last
            (false, 3, 0.1), // a partial batch: the current layout, not counted
            (true, 4, 0.1),  // an epoch's first step where NCHW would be timed: not counted
            (false, 4, 1.0), // NCHW, timed
            (false, 2, 0.1), // partial
            (false, 4, 2.0), // channels-last, timed
            (true, 4, 0.1),  // an epoch's first step where channels-last would be timed
            (false, 4, 2.1), // channels-last, timed
            (false, 1, 0.1), // partial
            (false, 4, 1.1), // NCHW, timed: NCHW wins 2x
        ]);
        assert_eq!(trial.record.nchw_s, [1.0, 1.1]);
        assert_eq!(trial.record.channels_last_s, [2.0, 2.1]);
        assert_eq!(trial.decided(), Some(false));
        assert!(!conv1_channels_last(&net));
    }
}
