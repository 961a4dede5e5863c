//! Training: the chapter's loss, optimiser and loop with PyTorch's and d2l's semantics.
mod ch13;
mod loss;
mod metrics;

pub use ch13::{evaluate_accuracy_gpu, plot_points, train_batch_ch13, train_ch13, History, Point};
pub use loss::{cross_entropy, sgd};
pub use metrics::{accuracy, Accumulator, Timer};
