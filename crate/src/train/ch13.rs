//! d2l's `train_ch13` and `evaluate_accuracy_gpu`: the chapter's training loop, its metrics and
//! its two result lines, with a history that can be saved and compared.
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde::{Deserialize, Serialize};
use tch::nn::ModuleT;

use super::layout::{layout_autotune, LayoutTrial, Trial};
use super::parallel::{
    convert_channels_last, to_device, train_batch_ch13, with_precision, DataParallel, Replicate,
    StepOptions,
};
use super::{accuracy, Accumulator, Loss, Timer, Trainer};
use crate::data::DataLoader;
use crate::device::{device_repr, Devices};
use crate::display::Animator;
use crate::error::{Error, Result};
use crate::settings::Settings;

/// Test accuracy of `net` over `data_iter`, in eval mode without gradients (d2l's
/// `evaluate_accuracy_gpu`).
pub fn evaluate_accuracy_gpu(
    net: &impl ModuleT,
    data_iter: &DataLoader,
    device: tch::Device,
) -> Result<f64> {
    evaluate_accuracy_with(net, data_iter, device, &StepOptions::default())
}

/// [`evaluate_accuracy_gpu`] with the step options (precision, layout) training used.
pub fn evaluate_accuracy_with(
    net: &impl ModuleT,
    data_iter: &DataLoader,
    device: tch::Device,
    opts: &StepOptions,
) -> Result<f64> {
    let (correct, total) = count_correct(net, data_iter, device, opts)?;
    Ok(correct / total.max(1.0))
}

/// Correct predictions and examples over `data_iter` (this rank's share of it, when sharded).
fn count_correct(
    net: &impl ModuleT,
    data_iter: &DataLoader,
    device: tch::Device,
    opts: &StepOptions,
) -> Result<(f64, f64)> {
    let mut metric = Accumulator::new(2);
    tch::no_grad(|| -> Result<()> {
        for batch in data_iter {
            let (x, y) = batch?;
            if x.size().first() == Some(&0) {
                continue; // an empty share (distributed evaluation)
            }
            let (x, y) = (to_device(&x, device, opts)?, y.f_to_device(device)?);
            let correct = with_precision(opts.bf16, || accuracy(&net.forward_t(&x, false), &y))?;
            metric.add(&[correct, y.numel() as f64]);
        }
        Ok(())
    })?;
    Ok((metric[0], metric[1]))
}

/// The sums of `values` over the ranks of `group` (the values themselves without one).
fn sum_over_ranks(group: Option<&crate::dist::ProcessGroup>, values: &[f64]) -> Result<Vec<f64>> {
    let Some(group) = group else {
        return Ok(values.to_vec());
    };
    let t = tch::Tensor::f_from_slice(values)?;
    group.all_reduce(&[&t], crate::dist::ReduceOp::Sum)?;
    Ok(Vec::<f64>::try_from(&t)?)
}

/// The batches after which `train_ch13` records a point: every `num_batches / 5`-th and the
/// last (at least every batch when there are fewer than five).
pub fn plot_points(num_batches: usize) -> Vec<usize> {
    let every = (num_batches / 5).max(1);
    (0..num_batches)
        .filter(|i| (i + 1) % every == 0 || i + 1 == num_batches)
        .collect()
}

/// One point of the training curves.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Point {
    /// `epoch + (i + 1) / num_batches`, as d2l plots it.
    pub x: f64,
    pub train_loss: Option<f64>,
    pub train_acc: Option<f64>,
    pub test_acc: Option<f64>,
}

/// What a `train_ch13` run measured.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct History {
    pub points: Vec<Point>,
    pub num_epochs: usize,
    pub train_loss: f64,
    pub train_acc: f64,
    pub test_acc: f64,
    /// Training examples a second, the timer bracketing only the training steps (as d2l's).
    pub examples_per_sec: f64,
    /// Python's repr of the device list, `[device(type='cuda', index=0)]`.
    pub devices: String,
    /// What the run was: epochs, batch size, batches an epoch, step options, and what the
    /// caller added ([`TrainOptions::config`]: learning rate, profile, ...).
    pub config: BTreeMap<String, String>,
    /// Where the run's wall time went.
    #[serde(default)]
    pub timing: Timing,
    /// On the CPU, what the timing of the two memory layouts found (see
    /// [`set_layout_autotune`](super::set_layout_autotune)); `None` where there was none.
    #[serde(default)]
    pub layout_trial: Option<LayoutTrial>,
    /// The chapter's settings this run was made under (the book's, or the offline stand-in's),
    /// when a notebook or program chose them ([`Settings::auto`]).
    #[serde(default)]
    pub settings: Option<Settings>,
}

/// Where a `train_ch13` run's wall time went, in seconds: d2l's timer covers only the steps;
/// this also says how long the loop waited for the training loader and how long the evaluations
/// took, so that an epoch slower than its steps can be explained.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Timing {
    /// From the first epoch's start to the last evaluation's end.
    pub wall_s: f64,
    /// The training steps: d2l's timer, the copy to the device included.
    pub step_s: f64,
    /// Waiting for the training loader's next batch (an epoch's first included).
    pub data_wait_s: f64,
    /// The evaluations on the test set, its loading included.
    pub eval_s: f64,
    /// Within the steps: the collectives of distributed training (gradients summed across the
    /// processes, buffers from rank 0); 0 in one process.
    #[serde(default)]
    pub comm_s: f64,
}

/// Options of [`train_ch13_with`] beyond d2l's arguments.
#[derive(Clone, Debug, Default)]
pub struct TrainOptions {
    /// Precision, layout and copy options of each step.
    pub step: StepOptions,
    /// The name of the final figure: shown in a notebook, saved as `<figure>.png`/`.svg`
    /// elsewhere. `None`: `train_ch13-1`, `train_ch13-2`, ... in the order of runs.
    pub figure: Option<String>,
    /// Draw no figure at the end.
    pub no_figure: bool,
    /// Print no progress lines (the two result lines are still printed).
    pub quiet: bool,
    /// Entries copied into [`History::config`].
    pub config: BTreeMap<String, String>,
    /// Keep the training state here (`<stem>.state.safetensors` and `.state.json`: weights,
    /// BatchNorm statistics, the optimiser's momentum buffers, epochs done, the loader's epoch,
    /// the history so far), written at the end of each epoch. A run started with a checkpoint
    /// that exists resumes after its last epoch and gives the history the uninterrupted run
    /// gives; one whose arguments differ (epochs, batch size, data, learning rates, seed) is an
    /// error. For a notebook whose kernel was interrupted (which ends the kernel): run the cells
    /// again, and training picks up where it was.
    pub checkpoint: Option<std::path::PathBuf>,
}

impl History {
    /// d2l's figure of this run: `train loss`, `train acc` and `test acc` over `epoch`, x from 1
    /// to `num_epochs` (0 to 1 for a single epoch), y from 0 to 1.
    pub fn animator(&self) -> Animator {
        let mut animator = Animator::new()
            .xlabel("epoch")
            // d2l's [1, num_epochs]; one epoch has all its points in [0, 1].
            .xlim(
                if self.num_epochs > 1 { 1.0 } else { 0.0 },
                self.num_epochs.max(1) as f64,
            )
            .ylim(0.0, 1.0)
            .legend(&["train loss", "train acc", "test acc"]);
        for p in &self.points {
            animator.add(p.x, &[p.train_loss, p.train_acc, p.test_acc]);
        }
        animator
    }

    /// d2l's two result lines: `loss 0.177, train acc 0.928, test acc 0.941` and
    /// `296.9 examples/sec on [device(type='cuda', index=0)]`.
    pub fn result_lines(&self) -> [String; 2] {
        [
            format!(
                "loss {:.3}, train acc {:.3}, test acc {:.3}",
                self.train_loss, self.train_acc, self.test_acc
            ),
            format!(
                "{:.1} examples/sec on {}",
                self.examples_per_sec, self.devices
            ),
        ]
    }
}

/// Trains `net` for `num_epochs` (d2l's `train_ch13`), printing a progress line at each plot
/// point and d2l's two result lines at the end, then showing the curves (inline in a notebook,
/// saved to files elsewhere); returns the [`History`]. With several devices the batches are split
/// across them as `nn.DataParallel` does (see [`DataParallel`]).
#[allow(clippy::too_many_arguments)]
pub fn train_ch13<N: Replicate>(
    net: &N,
    train_iter: &DataLoader,
    test_iter: &DataLoader,
    loss: impl Loss,
    trainer: &mut impl Trainer,
    num_epochs: usize,
    devices: &Devices,
) -> Result<History> {
    let opts = TrainOptions::default();
    train_ch13_with(
        net, train_iter, test_iter, loss, trainer, num_epochs, devices, &opts,
    )
}

/// [`train_ch13`] with [`TrainOptions`]: precision and layout, figure name, quiet mode, and
/// configuration recorded in the history.
///
/// Stops with [`Error::Interrupted`] between two steps when a stop was requested (Ctrl-C with
/// [`install_ctrl_c_handler`](super::install_ctrl_c_handler)); the model keeps the weights of
/// the last finished step.
#[allow(clippy::too_many_arguments)]
pub fn train_ch13_with<N: Replicate>(
    net: &N,
    train_iter: &DataLoader,
    test_iter: &DataLoader,
    loss: impl Loss,
    trainer: &mut impl Trainer,
    num_epochs: usize,
    devices: &Devices,
    opts: &TrainOptions,
) -> Result<History> {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    let run = RUNS.fetch_add(1, Ordering::SeqCst) + 1;
    super::keep_freed_memory();
    let fingerprint = fingerprint(train_iter, test_iter, &*trainer, num_epochs);
    // A checkpoint to resume from: the model and optimiser as they were after its last epoch.
    let resumed = match &opts.checkpoint {
        Some(stem) => {
            // An optimiser that cannot save its state fails now, not after an epoch.
            trainer.state()?;
            super::resume::load(stem, &fingerprint)?
        }
        None => None,
    };
    if let (Some(stem), Some((state, model, optim))) = (&opts.checkpoint, &resumed) {
        let (tensors_path, json) = super::resume::training_state_paths(stem);
        super::resume::restore_model(&net.named_tensors(), model, &tensors_path)?;
        trainer.load_state(optim)?;
        train_iter.set_epoch(state.loader_epoch);
        if !opts.quiet && crate::dist::is_main_process() {
            println!(
                "resuming from {} after epoch {}/{num_epochs}",
                json.display(),
                state.epochs_done
            );
        }
    }
    if opts.step.channels_last {
        convert_channels_last(net)?;
    }
    let mut parallel = DataParallel::new(net, devices)?.distributed(crate::dist::default_group())?;
    // Under a process group: each rank its share of every batch, rank 0 speaking for all.
    let group = parallel.group().cloned();
    let (rank, world) = group
        .as_ref()
        .map_or((0, 1), |g| (g.rank(), g.world_size()));
    train_iter.set_shard(rank, world)?;
    test_iter.set_shard(rank, world)?;
    let _unshard = Unshard([train_iter, test_iter]);
    let quiet = opts.quiet || rank != 0;
    // On one CPU, NCHW or channels-last by timing (see super::layout).
    let trial = (layout_autotune()
        && group.is_none()
        && devices.len() == 1
        && devices[0] == tch::Device::Cpu
        && !opts.step.channels_last
        && !opts.step.bf16
        && net
            .named_tensors()
            .iter()
            .any(|(_, t)| t.dim() == 4 && t.kind() == tch::Kind::Float))
    .then(|| {
        let model = crate::tuning::tuning_cache()
            .then(|| crate::tuning::model_signature(&net.named_tensors()));
        Trial::new(train_iter.batch_size() as i64, model)
    });
    // The model goes back in the standard layout however the run ends.
    let mut trial = TrialGuard { net, trial };
    let trial = &mut trial.trial;
    let mut step_opts = opts.step.clone();
    let mut timer = Timer::new();
    let num_batches = train_iter.len();
    let points_at = plot_points(num_batches);
    let mut points = Vec::new();
    let mut metric = Accumulator::new(4);
    let mut test_acc = 0.0;
    let mut timing = Timing::default();
    let (start, mut seen, total_batches) = (
        std::time::Instant::now(),
        0.0,
        (num_epochs * num_batches).max(1),
    );
    // What the checkpoint's epochs measured: the group's sums of its last epoch, its step time.
    let (mut first_epoch, mut prior_step_s, mut prior_wall_s) = (0, 0.0, 0.0);
    let mut resumed_metric = None;
    if let Some((state, _, _)) = resumed {
        first_epoch = state.epochs_done;
        points = state.points;
        test_acc = state.test_acc;
        seen = state.seen;
        prior_step_s = state.step_s;
        prior_wall_s = state.timing.wall_s;
        timing = state.timing;
        resumed_metric = Some(state.metric);
    }
    for epoch in first_epoch..num_epochs {
        metric.reset();
        let mut waiting = std::time::Instant::now();
        for (i, batch) in train_iter.iter().enumerate() {
            timing.data_wait_s += waiting.elapsed().as_secs_f64();
            if super::interrupt::take_stop() {
                return Err(Error::Interrupted {
                    epoch: epoch + 1,
                    batch: i,
                });
            }
            let (x, y) = batch?;
            let n = x.size()[0];
            if let Some(t) = trial.as_mut() {
                t.before_step(net, &x.size(), i == 0)?;
                step_opts.channels_last = t.channels_last();
            }
            timer.start();
            let (l, acc) = train_batch_ch13(&mut parallel, &x, &y, &loss, trainer, &step_opts)?;
            metric.add(&[l, acc, y.size()[0] as f64, y.numel() as f64]);
            let step_s = timer.stop();
            if let Some(t) = trial.as_mut() {
                t.after_step(net, n, i == 0, step_s)?;
                step_opts.channels_last = t.channels_last();
            }
            seen += y.size()[0] as f64;
            if points_at.contains(&i) {
                let x = epoch as f64 + (i + 1) as f64 / num_batches as f64;
                // The whole group's numbers (every rank is at this batch).
                let m = sum_over_ranks(
                    group.as_deref(),
                    &[metric[0], metric[1], metric[2], metric[3], seen],
                )?;
                let (train_loss, train_acc) = (m[0] / m[2], m[1] / m[3]);
                let seen = m[4];
                let done = epoch * num_batches + i + 1;
                let elapsed = prior_wall_s + start.elapsed().as_secs_f64();
                let eta = elapsed / done as f64 * (total_batches - done) as f64;
                if !quiet {
                    println!(
                        "epoch {x:.2}/{num_epochs} (batch {}/{num_batches}): loss {train_loss:.3}, train acc {train_acc:.3}, \
                         {:.1} examples/sec, {elapsed:.0} s elapsed, ETA {eta:.0} s",
                        i + 1,
                        seen / (prior_step_s + timer.sum()).max(1e-9)
                    );
                }
                points.push(Point {
                    x,
                    train_loss: Some(train_loss),
                    train_acc: Some(train_acc),
                    test_acc: None,
                });
            }
            waiting = std::time::Instant::now();
        }
        let evaluating = std::time::Instant::now();
        let (correct, total) = count_correct(net, test_iter, devices[0], &step_opts)?;
        let counts = sum_over_ranks(group.as_deref(), &[correct, total])?;
        test_acc = counts[0] / counts[1].max(1.0);
        timing.eval_s += evaluating.elapsed().as_secs_f64();
        if !quiet {
            println!("epoch {}/{num_epochs}: test acc {test_acc:.3}", epoch + 1);
        }
        points.push(Point {
            x: (epoch + 1) as f64,
            train_loss: None,
            train_acc: None,
            test_acc: Some(test_acc),
        });
        resumed_metric = None;
        if let Some(stem) = &opts.checkpoint {
            // Every rank takes part in the sums; rank 0 writes; all meet after.
            let m = sum_over_ranks(
                group.as_deref(),
                &[metric[0], metric[1], metric[2], metric[3]],
            )?;
            let seen_all = sum_over_ranks(group.as_deref(), &[seen])?[0];
            let mut state = super::resume::TrainState {
                epochs_done: epoch + 1,
                fingerprint: fingerprint.clone(),
                loader_epoch: train_iter.epoch(),
                points: points.clone(),
                test_acc,
                metric: [m[0], m[1], m[2], m[3]],
                seen: seen_all / world as f64,
                step_s: prior_step_s + timer.sum(),
                timing: Timing {
                    wall_s: prior_wall_s + start.elapsed().as_secs_f64(),
                    step_s: prior_step_s + timer.sum(),
                    comm_s: timing.comm_s + parallel.comm_seconds(),
                    ..timing.clone()
                },
                tensors_sha256: String::new(),
            };
            let written = if rank == 0 {
                super::resume::save(stem, &mut state, &net.named_tensors(), &trainer.state()?)
            } else {
                Ok(())
            };
            if let Some(g) = &group {
                g.barrier()?;
            }
            written?;
        }
    }
    let mut devices_repr = format!(
        "[{}]",
        devices
            .iter()
            .map(|&d| device_repr(d))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if world > 1 {
        devices_repr = format!("{devices_repr} x {world} processes");
    }
    // The group's totals: examples and the loss and accuracy sums of the last epoch (the
    // checkpoint's, when it had every epoch already).
    let m = match resumed_metric {
        Some(m) => m.to_vec(),
        None => sum_over_ranks(
            group.as_deref(),
            &[metric[0], metric[1], metric[2], metric[3]],
        )?,
    };
    let mut config = opts.config.clone();
    for (k, v) in [
        ("num_epochs", num_epochs.to_string()),
        ("batch_size", train_iter.batch_size().to_string()),
        ("num_batches", num_batches.to_string()),
        ("train_examples", train_iter.dataset().len().to_string()),
        ("test_examples", test_iter.dataset().len().to_string()),
        ("learning_rates", format!("{:?}", trainer.learning_rates())),
        ("bf16", opts.step.bf16.to_string()),
        (
            "channels_last",
            match trial.as_ref().map(|t| (t.decided(), t.is_cached())) {
                Some((Some(cl), true)) => format!("{cl} (cached timing)"),
                Some((Some(cl), false)) => format!("{cl} (timed)"),
                Some((None, _)) | None => opts.step.channels_last.to_string(),
            },
        ),
        ("processes", world.to_string()),
    ] {
        config.entry(k.to_owned()).or_insert(v);
    }
    let layout_trial = trial.take().map(|t| t.finish(net)).transpose()?;
    let history = History {
        points,
        num_epochs,
        train_loss: m[0] / m[2].max(1.0),
        train_acc: m[1] / m[3].max(1.0),
        test_acc,
        examples_per_sec: m[2] * num_epochs as f64 / (prior_step_s + timer.sum()).max(1e-9),
        devices: devices_repr,
        config,
        timing: Timing {
            wall_s: prior_wall_s + start.elapsed().as_secs_f64(),
            step_s: prior_step_s + timer.sum(),
            comm_s: timing.comm_s + parallel.comm_seconds(),
            ..timing
        },
        layout_trial,
        settings: Settings::current(),
    };
    if rank == 0 {
        for line in history.result_lines() {
            println!("{line}");
        }
    }
    if !opts.no_figure && rank == 0 {
        let name = opts
            .figure
            .clone()
            .unwrap_or_else(|| format!("train_ch13-{run}"));
        if let Some(png) = history.animator().show(&name)? {
            // Outside a notebook the run is kept beside its curves, settings included.
            let text = serde_json::to_string_pretty(&history)
                .map_err(|e| Error::json("train_ch13: the history", e))?;
            crate::files::write_atomically(&png.with_extension("json"), text.as_bytes())?;
        }
    }
    Ok(history)
}

/// What a run is, for a checkpoint to be resumed only by the same run.
fn fingerprint(
    train_iter: &DataLoader,
    test_iter: &DataLoader,
    trainer: &(impl Trainer + ?Sized),
    num_epochs: usize,
) -> BTreeMap<String, String> {
    let world = crate::dist::default_group().map_or(1, |g| g.world_size());
    [
        ("num_epochs", num_epochs.to_string()),
        ("batch_size", train_iter.batch_size().to_string()),
        ("train_examples", train_iter.dataset().len().to_string()),
        ("test_examples", test_iter.dataset().len().to_string()),
        (
            "train_root",
            train_iter.dataset().root().display().to_string(),
        ),
        ("shuffle", train_iter.is_shuffled().to_string()),
        ("seed", train_iter.seed_value().to_string()),
        ("learning_rates", format!("{:?}", trainer.learning_rates())),
        ("processes", world.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// Ends a layout trial that a run left (an error, a stop) with the model in the standard layout.
struct TrialGuard<'a, N: Replicate> {
    net: &'a N,
    trial: Option<Trial>,
}

impl<N: Replicate> Drop for TrialGuard<'_, N> {
    fn drop(&mut self) {
        if let Some(t) = self.trial.take() {
            let _ = t.finish(self.net);
        }
    }
}

/// Puts loaders back to reading whole batches when training ends (also by an error).
struct Unshard<'a>([&'a DataLoader; 2]);

impl Drop for Unshard<'_> {
    fn drop(&mut self) {
        for loader in self.0 {
            let _ = loader.set_shard(0, 1);
        }
    }
}
