//! Classify a folder of images with a saved fine-tuned model and write a CSV.
//!
//! ```text
//! cargo run --release --example predict -- CHECKPOINT FOLDER [--out predictions.csv] [--batch 64] [--device cpu|cuda]
//! ```
//!
//! CHECKPOINT is what `save_checkpoint` wrote (`target/fine-tuning/hotdog-resnet18`, or its
//! `.json`/`.safetensors`). Every image file under FOLDER (sub-folders too) is classified; the
//! CSV has `path,label,probability` lines; a progress bar runs on standard error, and a count a
//! label is printed at the end.
use std::collections::BTreeMap;
use std::path::PathBuf;

use d2l::model::{write_predictions_csv, Classifier};
use d2l::tch::Device;

fn main() -> std::process::ExitCode {
    d2l::exit_code(run())
}

const USAGE: &str =
    "usage: predict CHECKPOINT FOLDER [--out predictions.csv] [--batch 64] [--device cpu|cuda]";

fn run() -> d2l::Result<()> {
    let mut positional = Vec::new();
    let (mut out, mut batch, mut device) =
        (PathBuf::from("predictions.csv"), 64usize, d2l::try_gpu(0));
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .ok_or_else(|| d2l::Error::arg("predict", format!("{name} needs a value; {USAGE}")))
        };
        match arg.as_str() {
            "--out" => out = PathBuf::from(value("--out")?),
            "--batch" => {
                let v = value("--batch")?;
                batch = v.parse().ok().filter(|&b| b > 0).ok_or_else(|| {
                    d2l::Error::arg(
                        "predict",
                        format!("--batch {v:?}: give a number of images >= 1"),
                    )
                })?;
            }
            "--device" => {
                device = match value("--device")?.as_str() {
                    "cpu" => Device::Cpu,
                    "cuda" if d2l::num_gpus() > 0 => Device::Cuda(0),
                    other => {
                        return Err(d2l::Error::arg(
                            "predict",
                            format!("--device {other}: cpu, or cuda where libtorch sees a GPU"),
                        ))
                    }
                }
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            other if other.starts_with("--") => {
                return Err(d2l::Error::arg(
                    "predict",
                    format!("unknown option {other}; {USAGE}"),
                ))
            }
            _ => positional.push(PathBuf::from(arg)),
        }
    }
    let [checkpoint, folder] = positional.as_slice() else {
        return Err(d2l::Error::arg(
            "predict",
            format!("give a checkpoint and a folder; {USAGE}"),
        ));
    };
    let classifier = Classifier::load(checkpoint, device)?;
    let rows = classifier.predict_folder(folder, batch, true)?;
    write_predictions_csv(&out, &rows)?;
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for (_, p) in &rows {
        *counts.entry(p.class.as_str()).or_default() += 1;
    }
    let counts: Vec<String> = counts.iter().map(|(c, n)| format!("{c} {n}")).collect();
    println!(
        "{} images: {}; wrote {}",
        rows.len(),
        counts.join(", "),
        out.display()
    );
    Ok(())
}
