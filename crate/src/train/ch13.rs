//! d2l's `train_ch13` and `evaluate_accuracy_gpu`: the chapter's training loop, its metrics and
//! its two result lines, with a history that can be saved and compared.
use serde::{Deserialize, Serialize};
use tch::nn::{ModuleT, Optimizer};
use tch::{Kind, Tensor};

use super::{accuracy, Accumulator, Timer};
use crate::data::DataLoader;
use crate::device::{device_repr, Devices};
use crate::error::Result;

/// Test accuracy of `net` over `data_iter`, in eval mode without gradients (d2l's
/// `evaluate_accuracy_gpu`).
pub fn evaluate_accuracy_gpu(
    net: &impl ModuleT,
    data_iter: &DataLoader,
    device: tch::Device,
) -> Result<f64> {
    let mut metric = Accumulator::new(2);
    tch::no_grad(|| -> Result<()> {
        for batch in data_iter {
            let (x, y) = batch?;
            let (x, y) = (x.f_to_device(device)?, y.f_to_device(device)?);
            metric.add(&[accuracy(&net.forward_t(&x, false), &y)?, y.numel() as f64]);
        }
        Ok(())
    })?;
    Ok(metric[0] / metric[1].max(1.0))
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
}

impl History {
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

/// One training step (d2l's `train_batch_ch13`): summed loss, backward, step. Returns the summed
/// loss and the number of correct predictions.
pub fn train_batch_ch13(
    net: &impl ModuleT,
    x: &Tensor,
    y: &Tensor,
    loss: impl Fn(&Tensor, &Tensor) -> Result<Tensor>,
    trainer: &mut Optimizer,
    devices: &Devices,
) -> Result<(f64, f64)> {
    let (x, y) = (x.f_to_device(devices[0])?, y.f_to_device(devices[0])?);
    trainer.zero_grad();
    let pred = net.forward_t(&x, true);
    let l = loss(&pred, &y)?.f_sum(Kind::Float)?;
    l.f_backward()?;
    trainer.step();
    Ok((l.f_double_value(&[])?, accuracy(&pred, &y)?))
}

/// Trains `net` for `num_epochs` (d2l's `train_ch13`), printing a progress line at each plot
/// point and d2l's two result lines at the end; returns the [`History`].
#[allow(clippy::too_many_arguments)]
pub fn train_ch13(
    net: &impl ModuleT,
    train_iter: &DataLoader,
    test_iter: &DataLoader,
    loss: impl Fn(&Tensor, &Tensor) -> Result<Tensor> + Copy,
    trainer: &mut Optimizer,
    num_epochs: usize,
    devices: &Devices,
) -> Result<History> {
    let mut timer = Timer::new();
    let num_batches = train_iter.len();
    let points_at = plot_points(num_batches);
    let mut points = Vec::new();
    let mut metric = Accumulator::new(4);
    let mut test_acc = 0.0;
    let (start, mut seen, total_batches) = (
        std::time::Instant::now(),
        0.0,
        (num_epochs * num_batches).max(1),
    );
    for epoch in 0..num_epochs {
        metric.reset();
        for (i, batch) in train_iter.iter().enumerate() {
            let (x, y) = batch?;
            timer.start();
            let (l, acc) = train_batch_ch13(net, &x, &y, loss, trainer, devices)?;
            metric.add(&[l, acc, y.size()[0] as f64, y.numel() as f64]);
            timer.stop();
            seen += y.size()[0] as f64;
            if points_at.contains(&i) {
                let x = epoch as f64 + (i + 1) as f64 / num_batches as f64;
                let (train_loss, train_acc) = (metric[0] / metric[2], metric[1] / metric[3]);
                let done = epoch * num_batches + i + 1;
                let elapsed = start.elapsed().as_secs_f64();
                let eta = elapsed / done as f64 * (total_batches - done) as f64;
                println!(
                    "epoch {x:.2}/{num_epochs} (batch {}/{num_batches}): loss {train_loss:.3}, train acc {train_acc:.3}, \
                     {:.1} examples/sec, {elapsed:.0} s elapsed, ETA {eta:.0} s",
                    i + 1,
                    seen / timer.sum().max(1e-9)
                );
                points.push(Point {
                    x,
                    train_loss: Some(train_loss),
                    train_acc: Some(train_acc),
                    test_acc: None,
                });
            }
        }
        test_acc = evaluate_accuracy_gpu(net, test_iter, devices[0])?;
        points.push(Point {
            x: (epoch + 1) as f64,
            train_loss: None,
            train_acc: None,
            test_acc: Some(test_acc),
        });
    }
    let devices_repr = format!(
        "[{}]",
        devices
            .iter()
            .map(|&d| device_repr(d))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let history = History {
        points,
        num_epochs,
        train_loss: metric[0] / metric[2].max(1.0),
        train_acc: metric[1] / metric[3].max(1.0),
        test_acc,
        examples_per_sec: metric[2] * num_epochs as f64 / timer.sum().max(1e-9),
        devices: devices_repr,
    };
    for line in history.result_lines() {
        println!("{line}");
    }
    Ok(history)
}
