//! `notebooks/fine-tuning.ipynb` outside Jupyter: d2l §14.2 "Fine-Tuning", the same calls in
//! the same order, printing the same lines and saving the figures to files.
//!
//! ```text
//! cargo run --release --example fine_tuning            # profile chosen automatically
//! D2L_PROFILE=offline cargo run --release --example fine_tuning
//! ```
//! Figures, the checkpoint and `results.json` go to `target/fine-tuning/` (or `$D2L_OUT`).
//! Ctrl-C stops after the current step; a second Ctrl-C quits at once.
use std::path::PathBuf;
use std::process::ExitCode;

use d2l::chapter::{prediction_grid, train_fine_tuning, Profile};
use d2l::model::{
    freeze_body, init_head_from_class, resnet18, resnet18_fine_tune, save_checkpoint, Classifier,
};
use d2l::tch::nn::VarStore;
use d2l::{show_images, ImageFolder, Result, DATA_HUB, DATA_URL};

fn main() -> ExitCode {
    d2l::exit_code(run())
}

fn run() -> Result<()> {
    d2l::train::install_ctrl_c_handler()?;
    let out = std::env::var_os("D2L_OUT")
        .map_or_else(|| PathBuf::from("target/fine-tuning"), PathBuf::from);
    d2l::set_figures_dir(out.join("figures"));

    // Which settings run, on what data, from which source model.
    let profile = Profile::auto()?;
    println!("{profile}");

    // Obtaining the dataset.
    DATA_HUB.insert(
        "hotdog",
        format!("{DATA_URL}hotdog.zip"),
        "fba480ffa8aa7e0febbb511d181409f899b9baa5",
    );
    let data_dir = profile.hotdog_dir()?;
    let train_imgs = ImageFolder::new(data_dir.join("train"))?;
    let test_imgs = ImageFolder::new(data_dir.join("test"))?;
    println!(
        "{} training and {} test images, classes {:?}",
        train_imgs.len(),
        test_imgs.len(),
        train_imgs.classes()
    );

    // The first 8 hotdogs and the last 8 not-hotdogs.
    let hotdogs = (0..8)
        .map(|i| Ok(train_imgs.get(i)?.0))
        .collect::<Result<Vec<_>>>()?;
    let not_hotdogs = (0..8)
        .map(|i| Ok(train_imgs.get_rev(i)?.0))
        .collect::<Result<Vec<_>>>()?;
    show_images(&[hotdogs, not_hotdogs].concat(), 2, 8, None, 1.4)?.show("hotdogs")?;

    // The pre-trained model and its output layer.
    let source = profile.source_model()?;
    println!("{}", source.describe);
    let device = profile.device();
    let pretrained_vs = VarStore::new(device);
    let pretrained_net = source.pretrained_net(&pretrained_vs)?;
    println!("{}", pretrained_net.fc);

    // The target model: the source body, a new 2-class output layer (Xavier).
    let finetune_vs = VarStore::new(device);
    let finetune_net = resnet18_fine_tune(&finetune_vs, &source.weights, 2)?;
    println!("{}", finetune_net.fc);

    // Fine-tuning, the output layer at 10x the learning rate.
    let fine = train_fine_tuning(
        &finetune_net,
        &finetune_vs,
        &profile,
        5e-5,
        true,
        profile.num_epochs,
    )?;

    // The same model from scratch, one learning rate for all.
    let scratch_vs = VarStore::new(device);
    let scratch_net = resnet18(&scratch_vs.root(), 2);
    let scratch = train_fine_tuning(
        &scratch_net,
        &scratch_vs,
        &profile,
        5e-4,
        false,
        profile.num_epochs,
    )?;
    println!(
        "summary: fine-tuned test acc {:.3}, from scratch {:.3}",
        fine.test_acc, scratch.test_acc
    );

    // Exercise 1: a larger learning rate for the fine-tuned model.
    let vs1 = VarStore::new(device);
    let net1 = resnet18_fine_tune(&vs1, &source.weights, 2)?;
    let larger = train_fine_tuning(&net1, &vs1, &profile, 5e-4, true, profile.exercise_epochs)?;

    // Exercise 2: freeze the pre-trained body, train only the output layer.
    let vs2 = VarStore::new(device);
    let net2 = resnet18_fine_tune(&vs2, &source.weights, 2)?;
    freeze_body(&vs2);
    let frozen = train_fine_tuning(&net2, &vs2, &profile, 5e-5, true, profile.exercise_epochs)?;

    // Exercise 3: start the "hotdog" output from the source class closest to it.
    let vs3 = VarStore::new(device);
    let mut net3 = resnet18_fine_tune(&vs3, &source.weights, 2)?;
    let (class, name) = &source.hotdog_class;
    println!("hotdog output starts from source class {class} ({name})");
    init_head_from_class(&mut net3, &source.state_dict()?, *class, 0)?;
    let from_class = train_fine_tuning(&net3, &vs3, &profile, 5e-5, true, profile.exercise_epochs)?;

    // Exercise 4: test images with the fine-tuned model's predictions.
    prediction_grid(&finetune_net, &profile, 16)?.show("predictions")?;

    // Keep the fine-tuned model, and classify one image with the saved copy.
    let notes = [
        ("profile", profile.name.as_str().to_owned()),
        ("test_acc", format!("{:.3}", fine.test_acc)),
    ]
    .map(|(k, v)| (k.to_owned(), v))
    .into();
    let (weights, _) = save_checkpoint(
        &finetune_net,
        out.join("hotdog-resnet18"),
        train_imgs.classes(),
        (profile.resize, profile.crop),
        notes,
    )?;
    let classifier = Classifier::load(&weights, device)?;
    let (path, label) = &test_imgs.samples()[0];
    let p = classifier.predict(path)?;
    println!(
        "saved {}; {} -> {p} (true: {})",
        weights.display(),
        path.display(),
        test_imgs.classes()[*label as usize]
    );

    let results = serde_json::json!({
        "profile": profile.name.as_str(),
        "fine_tuned": fine, "scratch": scratch,
        "exercise_larger_lr": larger, "exercise_frozen_body": frozen, "exercise_head_from_class": from_class,
    });
    let path = out.join("results.json");
    std::fs::create_dir_all(&out)
        .map_err(|e| d2l::Error::Invalid(format!("{}: {e}", out.display())))?;
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&results).expect("histories serialise"),
    )
    .map_err(|e| d2l::Error::Invalid(format!("{}: {e}", path.display())))?;
    println!("results: {}", path.display());
    Ok(())
}
