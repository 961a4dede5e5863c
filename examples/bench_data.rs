//! Data pipeline throughput, the Rust side of `bench/data_pipeline.py`: read an image folder
//! through decode + RandomResizedCrop(224) + RandomHorizontalFlip + ToTensor + Normalize in
//! batches, and print one JSON line with images per second.
//!
//! ```text
//! cargo run --release --example bench_data -- make DIR [PER_CLASS] [TEST]   # hotdog-like set
//! # (TEST: test images a class, PER_CLASS/4 unless given)
//! cargo run --release --example bench_data -- run DIR WORKERS [BATCH] [EPOCHS] [SIZE]
//! ```
use std::time::Instant;

use d2l::data::synthetic::{make_hotdog_dataset, HotdogConfig};
use d2l::data::transforms::*;
use d2l::data::{DataLoader, ImageFolder};

fn main() -> std::process::ExitCode {
    d2l::exit_code(run())
}

fn run() -> d2l::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg =
        |i: usize, default: usize| args.get(i).and_then(|v| v.parse().ok()).unwrap_or(default);
    match args.first().map(String::as_str) {
        Some("make") => {
            let per_class = arg(2, 1000);
            let cfg = HotdogConfig {
                train_per_class: per_class,
                test_per_class: arg(3, per_class / 4),
                ..Default::default()
            };
            let root = make_hotdog_dataset(&args[1], &cfg)?;
            println!("{}", root.display());
        }
        Some("run") => {
            let (workers, batch, epochs, size) = (arg(2, 0), arg(3, 32), arg(4, 1), arg(5, 224));
            let train_augs = Compose::new()
                .then(RandomResizedCrop::new(size as u32))
                .then(RandomHorizontalFlip::new(0.5))
                .then(ToTensor)
                .then(Normalize::imagenet());
            let set = ImageFolder::new(&args[1])?;
            let images = set.len() * epochs;
            let loader = DataLoader::new(set, train_augs, batch)?
                .shuffle(true)
                .seed(0)
                .num_workers(workers);
            let start = Instant::now();
            let mut first_batch = None;
            for _ in 0..epochs {
                for batch in &loader {
                    let _ = batch?;
                    first_batch.get_or_insert_with(|| start.elapsed().as_secs_f64());
                }
            }
            let secs = start.elapsed().as_secs_f64();
            println!(
                "{{\"impl\": \"rust\", \"workers\": {workers}, \"batch\": {batch}, \"images\": {images}, \
                 \"seconds\": {secs:.3}, \"images_per_s\": {:.1}, \"first_batch_s\": {:.3}}}",
                images as f64 / secs,
                first_batch.unwrap_or(secs)
            );
        }
        _ => {
            eprintln!("usage: bench_data make DIR [PER_CLASS] [TEST] | bench_data run DIR WORKERS [BATCH] [EPOCHS] [SIZE]");
            std::process::exit(2);
        }
    }
    Ok(())
}
