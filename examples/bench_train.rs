//! The chapter's training, timed: the Rust side of `bench/compare.py`. Prints one JSON line.
//!
//! ```text
//! bench_train e2e  DATA_DIR [--crop 64] [--resize 72] [--batch 32] [--epochs 2] [--workers 2]
//!                  [--device cpu|cuda] [--bf16] [--channels-last] [--no-im2col]
//! bench_train step [--crop 64] [--batch 32] [--steps 20] [--device cpu|cuda] [--bf16] [--channels-last]
//!                  [--no-im2col] [--host-input] [--ab-batch-norm | --ab-gemm-weight-grad]
//! ```
//! `e2e`: the notebook's `fine_tune` path (ImageFolder, the chapter's augmentations, the loader,
//! ResNet-18, SGD with the 10x group, summed loss, d2l's `train_ch13` with its timer): d2l's
//! examples/sec, wall seconds an epoch (loading, augmentation, training, evaluation), time to the
//! first batch, peak RSS. `step`: the training step alone on tensors already on the device, the
//! limit that `e2e` is compared with; with `--host-input` the batch stays in pinned host memory
//! and each step copies it to the device, as in `e2e`. `e2e` also reports where its wall time
//! went (`History::timing`: steps, waiting for batches, evaluation). `--device cuda` fails when
//! no GPU is visible rather than measuring the CPU. `--no-im2col`: libtorch's convolution in
//! every layer (see `d2l::model::set_cpu_im2col`), to compare with PyTorch kernel for kernel.
//!
//! `step --ab-batch-norm`: the fused BatchNorm kernel on and off in alternate steps (`--steps`
//! pairs after warm-up), each step timed: the medians of each side and of the pairs' ratios,
//! steadier than two runs on a machine whose speed drifts. `step --ab-gemm-weight-grad`: the same
//! for the matrix-product weight gradient of channels-last convolutions (`--channels-last`),
//! where the timing chose it (`d2l::model::set_cpu_gemm_weight_grad`).
//!
//! `e2e --nproc N` (or under `torchrun --no-python --nproc-per-node N`): distributed
//! data-parallel training over N processes at the same global `--batch`; rank 0 prints the line,
//! with `timing.comm_s`, the seconds of the steps spent summing gradients across processes.
use std::time::Instant;

use d2l::data::transforms::*;
use d2l::data::{DataLoader, ImageFolder};
use d2l::model::resnet18;
use d2l::tch::nn::VarStore;
use d2l::tch::{Device, Kind, Tensor};
use d2l::train::*;

struct Args {
    mode: String,
    data: Option<String>,
    crop: u32,
    resize: u32,
    batch: usize,
    epochs: usize,
    steps: usize,
    workers: usize,
    device: Device,
    step: StepOptions,
    /// libtorch's intra-op threads (0: its default, one a core).
    threads: usize,
    im2col: bool,
    host_input: bool,
    /// `--ab-batch-norm` / `--ab-gemm-weight-grad`: the name of the kernel switched in
    /// alternate steps.
    ab: Option<&'static str>,
}

fn parse() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let mode = it
        .next()
        .ok_or("usage: bench_train e2e DATA_DIR [options] | bench_train step [options]")?;
    let mut a = Args {
        data: None,
        crop: 64,
        resize: 72,
        batch: 32,
        epochs: 2,
        steps: 20,
        workers: 2,
        device: Device::Cpu,
        step: StepOptions::default(),
        threads: 0,
        im2col: true,
        host_input: false,
        ab: None,
        mode,
    };
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        let num = |v: String, name: &str| {
            v.parse::<usize>()
                .map_err(|_| format!("{name}: not a number: {v}"))
        };
        match arg.as_str() {
            "--crop" => a.crop = num(value("--crop")?, "--crop")? as u32,
            "--resize" => a.resize = num(value("--resize")?, "--resize")? as u32,
            "--batch" => a.batch = num(value("--batch")?, "--batch")?,
            "--epochs" => a.epochs = num(value("--epochs")?, "--epochs")?,
            "--steps" => a.steps = num(value("--steps")?, "--steps")?,
            "--workers" => a.workers = num(value("--workers")?, "--workers")?,
            "--threads" => a.threads = num(value("--threads")?, "--threads")?,
            "--device" => {
                a.device = match value("--device")?.as_str() {
                    "cpu" => Device::Cpu,
                    "cuda" if d2l::num_gpus() > 0 => Device::Cuda(0),
                    "cuda" => {
                        return Err("--device cuda: libtorch sees no GPU (a CPU-only libtorch, \
                                    or no driver?)"
                            .into())
                    }
                    other => return Err(format!("--device: cpu or cuda, not {other}")),
                }
            }
            "--bf16" => a.step.bf16 = true,
            "--channels-last" => a.step.channels_last = true,
            "--no-im2col" => a.im2col = false,
            "--host-input" => a.host_input = true,
            "--ab-batch-norm" => a.ab = Some("batch-norm"),
            "--ab-gemm-weight-grad" => a.ab = Some("gemm-weight-grad"),
            other if a.data.is_none() && !other.starts_with("--") => {
                a.data = Some(other.to_owned())
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(a)
}

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        d2l::tch::Cuda::synchronize(i as i64);
    }
}

fn main() -> std::process::ExitCode {
    if let Some(launched) = d2l::dist::launch_from_args() {
        return launched.unwrap_or_else(|e| d2l::exit_code(Err(e)));
    }
    d2l::exit_code(run())
}

fn run() -> d2l::Result<()> {
    let start = Instant::now();
    let mut a = parse().map_err(|msg| d2l::Error::InvalidArgument {
        function: "bench_train",
        msg,
    })?;
    let group = d2l::dist::init_process_group()?;
    d2l::dist::quiet_unless_main()?;
    if let (Some(g), Device::Cuda(_)) = (&group, a.device) {
        a.device = Device::Cuda(g.local_rank() % d2l::num_gpus().max(1)); // a GPU a process
    }
    d2l::tch::manual_seed(0);
    if a.threads > 0 {
        d2l::tch::set_num_threads(a.threads as i32);
    }
    d2l::model::set_cpu_im2col(a.im2col);
    // As train_ch13 does (the step-only limit must run under the same allocator settings).
    let kept = d2l::train::keep_freed_memory();
    let vs = VarStore::new(a.device);
    let net = resnet18(&vs.root(), 2);
    // The chapter's optimiser, as the notebook's `fine_tune` builds it: fc at 10x.
    let lr = 5e-5;
    let params_1x = net
        .named_parameters()
        .into_iter()
        .filter(|(name, _)| name != "fc.weight" && name != "fc.bias")
        .map(|(_, param)| param)
        .collect();
    let mut trainer = SGD::new(
        [
            ParamGroup::new(params_1x),
            ParamGroup::new(net.fc.parameters()).lr(lr * 10.0),
        ],
        lr,
        0.001,
    )?;
    if a.step.channels_last {
        convert_channels_last(&net)?;
    }
    let json = match a.mode.as_str() {
        "step" => {
            let on = if a.host_input { Device::Cpu } else { a.device };
            let mut x = Tensor::randn(
                [a.batch as i64, 3, a.crop as i64, a.crop as i64],
                (Kind::Float, on),
            );
            let mut y = Tensor::randint(2, [a.batch as i64], (Kind::Int64, on));
            if a.host_input && a.device.is_cuda() {
                (x, y) = (x.f_pin_memory(a.device)?, y.f_pin_memory(a.device)?);
            }
            let mut dp = DataParallel::new(&net, &[a.device])?;
            for _ in 0..3 {
                train_batch_ch13(&mut dp, &x, &y, &cross_entropy, &mut trainer, &a.step)?;
            }
            sync(a.device);
            if let Some(ab) = a.ab {
                let switch = |on: bool| match ab {
                    "batch-norm" => d2l::model::set_cpu_fast_batch_norm(on),
                    _ => d2l::model::set_cpu_gemm_weight_grad(on),
                };
                let mut secs = [Vec::new(), Vec::new()]; // [kernel on, off]
                for i in 0..2 * (a.steps + 1) {
                    let on = i % 2 == 0;
                    switch(on);
                    let t = Instant::now();
                    train_batch_ch13(&mut dp, &x, &y, &cross_entropy, &mut trainer, &a.step)?;
                    sync(a.device);
                    if i >= 2 {
                        secs[usize::from(!on)].push(t.elapsed().as_secs_f64());
                    }
                }
                switch(true);
                let median = |v: &[f64]| {
                    let mut v = v.to_vec();
                    v.sort_by(f64::total_cmp);
                    v[v.len() / 2]
                };
                let ratios: Vec<f64> = secs[1]
                    .iter()
                    .zip(&secs[0])
                    .map(|(off, on)| off / on)
                    .collect();
                println!(
                    "{}",
                    serde_json::json!({
                        "impl": "rust", "mode": format!("step-ab-{ab}"), "batch": a.batch, "crop": a.crop,
                        "channels_last": a.step.channels_last,
                        "kernel_s": secs[0], "libtorch_s": secs[1],
                        "kernel_median_s": median(&secs[0]), "libtorch_median_s": median(&secs[1]),
                        "median_pair_speedup": median(&ratios),
                    })
                );
                return Ok(());
            }
            let t = Instant::now();
            for _ in 0..a.steps {
                train_batch_ch13(&mut dp, &x, &y, &cross_entropy, &mut trainer, &a.step)?;
            }
            sync(a.device);
            let secs = t.elapsed().as_secs_f64();
            serde_json::json!({
                "impl": "rust", "mode": "step", "batch": a.batch, "crop": a.crop, "steps": a.steps,
                "images_per_s": (a.steps * a.batch) as f64 / secs,
                "bf16": a.step.bf16, "channels_last": a.step.channels_last, "im2col": a.im2col,
                "host_input": a.host_input, "device": format!("{:?}", a.device),
                "peak_rss_mib": peak_rss_mib(),
                "conv_autotune": d2l::model::conv_autotune(),
                "keep_freed_memory": kept,
                "conv_choices": d2l::model::conv_choices(),
                "tuning": tuning(false),
            })
        }
        "e2e" => {
            let data = a.data.clone().ok_or_else(|| d2l::Error::InvalidArgument {
                function: "bench_train",
                msg: "e2e needs DATA_DIR".into(),
            })?;
            let data = std::path::Path::new(&data);
            let normalize = Normalize::imagenet();
            let train_augs = Compose::new()
                .then(RandomResizedCrop::new(a.crop))
                .then(RandomHorizontalFlip::default())
                .then(ToTensor)
                .then(normalize.clone());
            let test_augs = Compose::new()
                .then(Resize::new(a.resize, a.resize))
                .then(CenterCrop::new(a.crop))
                .then(ToTensor)
                .then(normalize);
            let pin = a.device.is_cuda();
            let train_iter =
                DataLoader::new(ImageFolder::new(data.join("train"))?, train_augs, a.batch)?
                    .shuffle(true)
                    .num_workers(a.workers)
                    .pin_memory(pin);
            let test_iter =
                DataLoader::new(ImageFolder::new(data.join("test"))?, test_augs, a.batch)?
                    .num_workers(a.workers)
                    .pin_memory(pin);
            let t = Instant::now();
            let first = train_iter.iter().next().transpose()?;
            let first_batch_s = t.elapsed().as_secs_f64();
            drop(first);
            let opts = TrainOptions {
                step: a.step.clone(),
                no_figure: true,
                quiet: true,
                ..TrainOptions::default()
            };
            let devices = d2l::Devices(vec![a.device]);
            let t = Instant::now();
            let h = train_ch13_with(
                &net,
                &train_iter,
                &test_iter,
                cross_entropy,
                &mut trainer,
                a.epochs,
                &devices,
                &opts,
            )?;
            sync(a.device);
            let wall = t.elapsed().as_secs_f64();
            let images = train_iter.dataset().len();
            serde_json::json!({
                "impl": "rust", "mode": "e2e", "batch": a.batch, "crop": a.crop, "epochs": a.epochs,
                "workers": a.workers, "train_images": images, "test_images": test_iter.dataset().len(),
                "d2l_examples_per_s": h.examples_per_sec,
                "epoch_wall_s": wall / a.epochs as f64,
                "e2e_images_per_s": (images * a.epochs) as f64 / wall,
                "first_batch_s": first_batch_s,
                "peak_rss_mib": peak_rss_mib(),
                "process_s": start.elapsed().as_secs_f64(),
                "test_acc": h.test_acc,
                "timing": h.timing,
                "processes": group.as_ref().map_or(1, |g| g.world_size()),
                "threads": d2l::tch::get_num_threads(),
                "bf16": a.step.bf16, "channels_last": a.step.channels_last, "im2col": a.im2col,
                "device": format!("{:?}", a.device),
                "conv_autotune": d2l::model::conv_autotune(),
                "keep_freed_memory": kept,
                "conv_choices": d2l::model::conv_choices(),
                "layout_trial": h.layout_trial,
                "tuning": tuning(h.layout_trial.as_ref().is_some_and(|t| t.cached)),
            })
        }
        other => {
            return Err(d2l::Error::InvalidArgument {
                function: "bench_train",
                msg: format!("mode: e2e or step, not {other}"),
            })
        }
    };
    println!("{json}");
    Ok(())
}

/// What the run took from the tuning cache (d2l::tuning) and what it timed itself.
fn tuning(layout_cached: bool) -> serde_json::Value {
    let choices = d2l::model::conv_choices();
    let cached = choices.iter().filter(|c| c.cached).count();
    serde_json::json!({
        "cache": d2l::tuning::tuning_cache(), "dir": d2l::tuning::tuning_dir(),
        "layout_cached": layout_cached, "conv_cached": cached, "conv_measured": choices.len() - cached,
    })
}
