//! d2l's small helpers for the training loop: `Accumulator`, `Timer`, `accuracy`.
use tch::Tensor;

use crate::error::Result;

/// Sums of `n` running metrics (d2l's `Accumulator`).
#[derive(Clone, Debug, Default)]
pub struct Accumulator(Vec<f64>);

impl Accumulator {
    pub fn new(n: usize) -> Accumulator {
        Accumulator(vec![0.0; n])
    }

    /// Adds `values` position by position.
    pub fn add(&mut self, values: &[f64]) {
        for (a, v) in self.0.iter_mut().zip(values) {
            *a += v;
        }
    }

    pub fn reset(&mut self) {
        self.0.iter_mut().for_each(|a| *a = 0.0);
    }
}

impl std::ops::Index<usize> for Accumulator {
    type Output = f64;
    fn index(&self, i: usize) -> &f64 {
        &self.0[i]
    }
}

/// Wall-clock intervals (d2l's `Timer`).
#[derive(Clone, Debug)]
pub struct Timer {
    times: Vec<f64>,
    start: std::time::Instant,
}

impl Default for Timer {
    fn default() -> Self {
        Timer {
            times: Vec::new(),
            start: std::time::Instant::now(),
        }
    }
}

impl Timer {
    /// A timer, already started.
    pub fn new() -> Timer {
        Timer::default()
    }

    pub fn start(&mut self) {
        self.start = std::time::Instant::now();
    }

    /// Stops, records and returns the interval in seconds.
    pub fn stop(&mut self) -> f64 {
        let t = self.start.elapsed().as_secs_f64();
        self.times.push(t);
        t
    }

    pub fn sum(&self) -> f64 {
        self.times.iter().sum()
    }

    pub fn avg(&self) -> f64 {
        if self.times.is_empty() {
            0.0
        } else {
            self.sum() / self.times.len() as f64
        }
    }
}

/// The number of correct predictions (d2l's `accuracy`).
///
/// # Shapes
/// `y_hat` `[n, classes]` (or `[n]` labels), `y` `[n]`
pub fn accuracy(y_hat: &Tensor, y: &Tensor) -> Result<f64> {
    let pred = if y_hat.dim() > 1 && y_hat.size()[1] > 1 {
        y_hat.f_argmax(1, false)?
    } else {
        y_hat.shallow_clone()
    };
    let same = pred.f_to_kind(y.kind())?.f_eq_tensor(y)?;
    Ok(same.f_sum(tch::Kind::Float)?.f_double_value(&[])?)
}
