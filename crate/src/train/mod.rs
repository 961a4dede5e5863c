//! Training: the chapter's loss, optimiser and loop with PyTorch's and d2l's semantics, data
//! parallel over several devices, and a clean stop on Ctrl-C.
mod ch13;
mod interpret;
mod interrupt;
mod layout;
mod loss;
mod lr_find;
mod memory;
mod metrics;
mod optim;
mod parallel;
mod resume;
mod unfreeze;

pub use ch13::{
    evaluate_accuracy_gpu, evaluate_accuracy_with, plot_points, train_ch13, train_ch13_with,
    History, Point, Timing, TrainOptions,
};
pub use interpret::ClassificationInterpretation;
pub use interrupt::{install_ctrl_c_handler, request_stop, stop_requested};
pub use layout::{convert_contiguous, layout_autotune, set_layout_autotune, LayoutTrial};
pub use loss::{cross_entropy, CrossEntropyLoss, Loss};
pub use lr_find::{lr_find, LrFind, LrFindOptions};
pub use memory::keep_freed_memory;
pub use metrics::{accuracy, Accumulator, Timer};
pub use optim::{ParamGroup, Trainer, SGD};
pub use parallel::{
    convert_channels_last, cuda_autocast_kind, set_cuda_autocast_bf16, to_channels_last,
    train_batch_ch13, with_precision, DataParallel, Replicate, StepOptions,
};
pub use resume::{training_state_paths, TrainState};
pub use unfreeze::{chapter_sgd, fine_tune_gradual};
