//! A progress bar on standard error for long commands (`predict` over a folder).
use std::io::Write;
use std::time::{Duration, Instant};

/// `what [##########----------] 120/400 (30%), 35.2 img/s, ETA 8 s`, redrawn in place at most
/// ten times a second; [`finish`](ProgressBar::finish) draws the last state and ends the line.
pub struct ProgressBar {
    what: String,
    total: usize,
    done: usize,
    start: Instant,
    drawn: Option<Instant>,
    enabled: bool,
}

impl ProgressBar {
    /// A bar for `total` items; `enabled: false` draws nothing.
    pub fn new(what: &str, total: usize, enabled: bool) -> ProgressBar {
        ProgressBar {
            what: what.to_owned(),
            total,
            done: 0,
            start: Instant::now(),
            drawn: None,
            enabled,
        }
    }

    /// Items done so far.
    pub fn position(&self) -> usize {
        self.done
    }

    /// `n` more items done.
    pub fn inc(&mut self, n: usize) {
        self.done = (self.done + n).min(self.total);
        if self
            .drawn
            .is_none_or(|t| t.elapsed() >= Duration::from_millis(100))
        {
            self.draw();
        }
    }

    /// The bar's text now.
    pub fn line(&self) -> String {
        const WIDTH: usize = 30;
        let frac = if self.total == 0 {
            1.0
        } else {
            self.done as f64 / self.total as f64
        };
        let filled = (frac * WIDTH as f64).round() as usize;
        let secs = self.start.elapsed().as_secs_f64();
        let rate = self.done as f64 / secs.max(1e-9);
        let eta = if self.done > 0 {
            format!(
                ", ETA {:.0} s",
                (self.total - self.done) as f64 / rate.max(1e-9)
            )
        } else {
            String::new()
        };
        format!(
            "{} [{}{}] {}/{} ({:.0}%), {rate:.1} img/s{eta}",
            self.what,
            "#".repeat(filled),
            "-".repeat(WIDTH - filled),
            self.done,
            self.total,
            100.0 * frac
        )
    }

    fn draw(&mut self) {
        if !self.enabled {
            return;
        }
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r{}", self.line());
        let _ = err.flush();
        self.drawn = Some(Instant::now());
    }

    /// Draws the final state and ends the line.
    pub fn finish(mut self) {
        self.draw();
        if self.enabled {
            eprintln!();
        }
    }
}
