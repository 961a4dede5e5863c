//! GENERATED from `notebooks/fine-tuning.ipynb` by `scripts/notebook_to_example.py`: edit the
//! notebook, then run `python3 scripts/notebook_to_example.py` (`scripts/test` fails while the
//! two differ).
//!
//! The notebook outside Jupyter: its code cells in order, in one function that runs in the
//! notebooks' folder, printing the same lines. A cell's value is printed with `{:?}`, as evcxr
//! shows it; figures are saved to files instead of shown.
//!
//! ```text
//! cargo run --release --example fine_tuning
//! D2L_PROFILE=offline cargo run --release --example fine_tuning
//! ```
//! Figures, with each training run's history beside its curves, go to `$D2L_OUT/figures`
//! (default `target/fine-tuning/figures`). Ctrl-C stops after the current step; a second
//! Ctrl-C quits at once.
//!
//! Distributed data-parallel training, each process its share of every batch (the notebook
//! itself stays one process): `--nproc N` runs N processes on this machine, or launch it with
//! PyTorch's launcher, on one machine or several:
//!
//! ```text
//! cargo run --release --example fine_tuning -- --nproc 2
//! torchrun --no-python --nproc-per-node 2 target/release/examples/fine_tuning
//! torchrun --no-python --nnodes 2 --node-rank 0 --master-addr HOST --master-port 29500 //!     --nproc-per-node 8 target/release/examples/fine_tuning
//! ```
//! Rank 0 prints and saves the figures; the result lines are the whole group's.
use std::process::ExitCode;

fn main() -> ExitCode {
    if let Some(launched) = d2l::dist::launch_from_args() {
        return launched.unwrap_or_else(|e| d2l::exit_code(Err(e)));
    }
    d2l::exit_code(run())
}

fn run() -> d2l::Result<()> {
    d2l::train::install_ctrl_c_handler()?;
    // Under torchrun or --nproc: join the group (train_ch13 then trains across it).
    d2l::dist::init_process_group()?;
    d2l::dist::quiet_unless_main()?;
    let out = std::env::var_os("D2L_OUT").map_or_else(
        || std::path::PathBuf::from("target/fine-tuning"),
        std::path::PathBuf::from,
    );
    let figures = std::path::absolute(out.join("figures")).map_err(|source| d2l::Error::Io {
        path: out.clone(),
        source,
    })?;
    d2l::set_figures_dir(figures);
    let notebooks = concat!(env!("CARGO_MANIFEST_DIR"), "/notebooks");
    std::env::set_current_dir(notebooks).map_err(|source| d2l::Error::Io {
        path: notebooks.into(),
        source,
    })?;

    // %% [markdown]
    // # Fine-Tuning (Dive into Deep Learning §14.2), in Rust
    //
    // Training a large network on a small data set overfits, and collecting a million labelled images is
    // expensive. *Transfer learning* sidesteps both: start from a model trained on a large **source** data
    // set (ImageNet) and adapt it to a small **target** data set. The features a network learns on
    // ImageNet (edges, textures, parts of objects) are useful far beyond ImageNet's classes.
    //
    // **Fine-tuning** does it in four steps:
    //
    // 1. Pre-train a neural network, the *source model*, on the source data set.
    // 2. Make a *target model*: a copy of the source model's design and parameters, all but the output
    //    layer. Those parameters already hold what was learned on the source data; the output layer only
    //    fits the source labels, so it is not copied.
    // 3. Give the target model a new output layer with as many outputs as the target data set has
    //    classes, and initialise it at random.
    // 4. Train the target model on the target data set: the new output layer from scratch, the copied
    //    layers only adjusted, with a smaller learning rate.
    //
    // ## Hot dog recognition
    //
    // We fine-tune a ResNet pre-trained on ImageNet on a small data set of images with and without hot
    // dogs. Each code cell is the Rust twin of the book's cell, with the book's names; the `d2l` crate
    // is the Rust twin of `from d2l import torch as d2l`. `cargo run --release --example fine_tuning`
    // runs the same cells outside Jupyter (the example is generated from this notebook).

    // %%
    use std::path::PathBuf;

    use d2l::data::transforms::{
        CenterCrop, Compose, Normalize, RandomHorizontalFlip, RandomResizedCrop, Resize, ToTensor,
    };
    use d2l::model::{
        resnet18, resnet18_pretrained, save_checkpoint, xavier_uniform_, Classifier, Linear, ResNet,
    };
    use d2l::tch::nn::{ModuleT, VarStore};
    use d2l::tch::{Device, Reduction, Tensor};
    use d2l::train::{train_ch13, CrossEntropyLoss, History, ParamGroup, SGD};
    use d2l::{
        download_extract, show_images, try_all_gpus, try_gpu, DataLoader, ImageFolder, Settings,
    };
    use d2l::{DATA_HUB, DATA_URL};

    // %% [markdown]
    // ### The settings, once
    //
    // The book's values (224 px crops, batch 128, 5 epochs, learning rates 5e-5 and 5e-4) are
    // `Settings::default()`. Where `hotdog.zip` and the ImageNet weights cannot be fetched, an
    // **offline stand-in** takes their place: generated hotdog-like pictures, and a ResNet-18 pre-trained
    // *here* on a generated food data set, at sizes a CPU finishes in minutes. The banner says which;
    // every later cell is the same code either way, and every run and checkpoint records these settings.
    // Set `D2L_PROFILE=book|offline|ci` before starting Jupyter to choose.

    // %%
    let settings = Settings::auto()?;
    println!("{settings}");

    // %% [markdown]
    // ### Obtaining the data set
    //
    // The hot dog data set holds 1400 positive images (hot dogs) and as many negative ones (other foods),
    // 1000 of each class for training and the rest for testing. `download_extract` fetches
    // `hotdog.zip` once, checks its SHA-1 and unpacks it into `../data/hotdog`, with the folders
    // `train` and `test`, each with the sub-folders `hotdog` and `not-hotdog`.

    // %%
    DATA_HUB.insert(
        "hotdog",
        format!("{DATA_URL}hotdog.zip"),
        "fba480ffa8aa7e0febbb511d181409f899b9baa5",
    );
    let data_dir = download_extract("hotdog")?;

    // %% [markdown]
    // Two `ImageFolder` instances read the image files of the training and the test set.

    // %%
    let train_imgs = ImageFolder::new(data_dir.join("train"))?;
    let test_imgs = ImageFolder::new(data_dir.join("test"))?;
    println!(
        "{} training images, {} test images, classes {:?}",
        train_imgs.len(),
        test_imgs.len(),
        train_imgs.classes()
    );

    // %% [markdown]
    // The first 8 positive examples and the last 8 negative ones. Sizes and aspect ratios vary.

    // %%
    let hotdogs: Vec<d2l::image::RgbImage> = (0..8)
        .map(|i| Ok(train_imgs.get(i)?.0))
        .collect::<d2l::Result<_>>()?;
    let not_hotdogs: Vec<d2l::image::RgbImage> = (0..8)
        .map(|i| Ok(train_imgs.get(train_imgs.len() - i - 1)?.0))
        .collect::<d2l::Result<_>>()?;
    show_images(&[hotdogs, not_hotdogs].concat(), 2, 8, None, 1.4)?.show("hotdogs")?;

    // %% [markdown]
    // During training, a random area of random size and aspect ratio is cropped from the image and
    // scaled to 224 x 224, then flipped left-right half the time. For testing, the image is resized to
    // 256 x 256 and the central 224 x 224 area is cropped. Each RGB channel is standardised with
    // ImageNet's means and standard deviations, since the pre-trained model expects that.

    // %%
    // Specify the means and standard deviations of the three RGB channels to standardize each channel
    let normalize = Normalize::new([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]);

    let train_augs = Compose::new()
        .then(RandomResizedCrop::new(settings.crop))
        .then(RandomHorizontalFlip::default())
        .then(ToTensor)
        .then(normalize.clone());

    let test_augs = Compose::new()
        .then(Resize::new(settings.resize, settings.resize))
        .then(CenterCrop::new(settings.crop))
        .then(ToTensor)
        .then(normalize);

    // %% [markdown]
    // ### Defining and initialising the model
    //
    // The source model is a ResNet-18 pre-trained on ImageNet: `resnet18_pretrained` fetches its
    // weights the first time. The pre-trained model holds the feature layers and the output layer
    // `fc`:

    // %%
    let pretrained_vs = VarStore::new(try_gpu(0));
    let pretrained_net = resnet18_pretrained(&pretrained_vs)?;
    println!("{:?}", &pretrained_net.fc);

    // %% [markdown]
    // After the global average pooling, `fc` maps 512 features to ImageNet's 1000 classes. The target
    // model `finetune_net` is defined in the same way, and its parameters are initialised with the
    // pre-trained ones; then its output layer is replaced by a new one with 2 outputs, whose weights are
    // initialised at random (Xavier). The copied parameters are already good, so a small learning rate
    // fine-tunes them; the new layer learns from scratch, at ten times that rate.

    // %%
    let finetune_vs = VarStore::new(try_gpu(0));
    let mut finetune_net = resnet18_pretrained(&finetune_vs)?;
    finetune_net.fc = Linear::new(&finetune_vs, "fc", finetune_net.fc.in_features, 2);
    xavier_uniform_(&finetune_net.fc.weight)?;
    println!("{:?}", &finetune_net.fc);

    // %% [markdown]
    // ### Fine-tuning the model
    //
    // `fine_tune` trains a model with the chapter's recipe and can be called several times. With
    // `use_fine_tune`, the parameters of the output layer learn at ten times the learning rate of the
    // others. The book's function reads `data_dir`, `train_augs` and `test_augs` from the notebook; a
    // Rust function sees only its arguments, so they come in `data`, with the settings for the loaders
    // (worker threads, the shuffle's seed). A line is printed at each point of the curves; the figure
    // appears when training ends.

    // %%
    fn fine_tune(
        net: &ResNet,
        lr: f64,
        batch_size: usize,
        num_epochs: usize,
        use_fine_tune: bool,
        data: &(PathBuf, Compose, Compose, Settings),
    ) -> d2l::Result<History> {
        let (data_dir, train_augs, test_augs, settings) = data;
        let train_dataset = ImageFolder::new(data_dir.join("train"))?;
        let test_dataset = ImageFolder::new(data_dir.join("test"))?;
        let devices = try_all_gpus();
        let train_loader = DataLoader::new(train_dataset, train_augs.clone(), batch_size)?
            .shuffle(true)
            .seed(settings.seed)
            .num_workers(settings.num_workers)
            .pin_memory(devices[0].is_cuda());
        let test_loader = DataLoader::new(test_dataset, test_augs.clone(), batch_size)?
            .num_workers(settings.num_workers)
            .pin_memory(devices[0].is_cuda());
        let criterion = CrossEntropyLoss::new(Reduction::None);
        let mut optimizer = if use_fine_tune {
            // Parameters of feature layers use base learning rate, output layer uses lr * 10
            let base_params = net
                .named_parameters()
                .into_iter()
                .filter(|(name, _)| name != "fc.weight" && name != "fc.bias")
                .map(|(_, param)| param)
                .collect();
            SGD::new(
                [
                    ParamGroup::new(base_params),
                    ParamGroup::new(net.fc.parameters()).lr(lr * 10.0),
                ],
                lr,
                0.001,
            )?
        } else {
            SGD::new([ParamGroup::new(net.parameters())], lr, 0.001)?
        };
        train_ch13(
            net,
            &train_loader,
            &test_loader,
            criterion,
            &mut optimizer,
            num_epochs,
            &devices,
        )
    }

    let data: (PathBuf, Compose, Compose, Settings) = (
        data_dir.clone(),
        train_augs.clone(),
        test_augs.clone(),
        settings.clone(),
    );

    // %% [markdown]
    // A small learning rate, since the copied parameters are already good:

    // %%
    let fine = fine_tune(
        &finetune_net,
        settings.lr,
        settings.batch_size,
        settings.num_epochs,
        true,
        &data,
    )?;

    // %% [markdown]
    // For comparison, the same model with all its parameters initialised at random. The whole model
    // trains from scratch, so it gets a larger learning rate:

    // %%
    let scratch_vs = VarStore::new(try_gpu(0));
    let mut scratch_net = resnet18(&scratch_vs.root(), 1000);
    scratch_net.fc = Linear::new(&scratch_vs, "fc", scratch_net.fc.in_features, 2);
    let scratch = fine_tune(
        &scratch_net,
        settings.scratch_lr,
        settings.batch_size,
        settings.num_epochs,
        false,
        &data,
    )?;

    // %%
    println!(
        "test accuracy: fine-tuned {:.3}, from scratch {:.3}",
        fine.test_acc, scratch.test_acc
    );

    // %% [markdown]
    // The fine-tuned model usually does better in the same number of epochs: its initial parameters
    // already describe images well.
    //
    // ## Summary
    //
    // * Transfer learning moves what a model learned on a source data set to a target data set.
    //   Fine-tuning is a common form of it.
    // * The target model copies the source model's design and parameters except the output layer, and
    //   fine-tunes them on the target data set. The output layer is trained from scratch.
    // * Fine-tuned parameters usually take a smaller learning rate; the output layer a larger one.
    //
    // ## Exercises
    //
    // Each exercise starts from a new copy of `finetune_net`, made as above:

    // %%
    fn new_finetune_net(vs: &VarStore) -> d2l::Result<ResNet> {
        let mut net = resnet18_pretrained(vs)?;
        net.fc = Linear::new(vs, "fc", net.fc.in_features, 2);
        xavier_uniform_(&net.fc.weight)?;
        Ok(net)
    }

    // %% [markdown]
    // **1.** Keep increasing the learning rate of `finetune_net`. What happens to the accuracy?

    // %%
    let vs1 = VarStore::new(try_gpu(0));
    let net1 = new_finetune_net(&vs1)?;
    let larger = fine_tune(
        &net1,
        10.0 * settings.lr,
        settings.batch_size,
        settings.exercise_epochs,
        true,
        &data,
    )?;

    // %% [markdown]
    // **2.** Set the parameters of `finetune_net`, all but the new output layer, to those of the source
    // model and do not update them during training. What happens to the accuracy?

    // %%
    let vs2 = VarStore::new(try_gpu(0));
    let net2 = new_finetune_net(&vs2)?;
    for (name, param) in net2.named_parameters() {
        if !name.starts_with("fc.") {
            let _ = param.set_requires_grad(false);
        }
    }
    let frozen = fine_tune(
        &net2,
        settings.lr,
        settings.batch_size,
        settings.exercise_epochs,
        true,
        &data,
    )?;

    // %% [markdown]
    // **3.** ImageNet already has a "hotdog" class: row 934 of the pre-trained output layer. Start the
    // new layer's hot-dog output from it (offline: the generated source set's hot-dog class).

    // %%
    let vs3 = VarStore::new(try_gpu(0));
    let net3 = new_finetune_net(&vs3)?;
    let (hotdog_class, name) = settings.hotdog_class();
    println!("the hot-dog output starts from the source's class {hotdog_class} ({name})");
    d2l::tch::no_grad(|| -> d2l::Result<()> {
        net3.fc
            .weight
            .get(0)
            .f_copy_(&pretrained_net.fc.weight.get(hotdog_class))?;
        net3.fc
            .bias
            .get(0)
            .f_copy_(&pretrained_net.fc.bias.get(hotdog_class))?;
        Ok(())
    })?;
    let from_class = fine_tune(
        &net3,
        settings.lr,
        settings.batch_size,
        settings.exercise_epochs,
        true,
        &data,
    )?;
    println!(
        "exercise test accuracy: larger lr {:.3}, frozen body {:.3}, hot-dog output from the source's class {:.3}",
        larger.test_acc, frozen.test_acc, from_class.test_acc
    );

    // %% [markdown]
    // **4.** The first 8 hot dogs and the last 8 other foods of the test set, with the fine-tuned
    // model's prediction above the true label.

    // %%
    let samples: Vec<(d2l::image::RgbImage, i64)> = (0..8)
        .chain((1..=8).map(|i| test_imgs.len() - i))
        .map(|i| test_imgs.get(i))
        .collect::<d2l::Result<_>>()?;
    let xs = samples
        .iter()
        .map(|(img, _)| test_augs.tensor(img))
        .collect::<d2l::Result<Vec<_>>>()?;
    let y_hat = d2l::tch::no_grad(|| {
        finetune_net.forward_t(&Tensor::stack(&xs, 0).to_device(try_gpu(0)), false)
    });
    let preds = Vec::<i64>::try_from(y_hat.argmax(-1, false).to_device(Device::Cpu))?;
    let classes = test_imgs.classes().to_vec();
    let titles: Vec<String> = samples
        .iter()
        .zip(&preds)
        .map(|((_, y), pred)| {
            format!(
                "{}\ntrue: {}",
                classes[*pred as usize], classes[*y as usize]
            )
        })
        .collect();
    let imgs: Vec<d2l::image::RgbImage> = samples.into_iter().map(|(img, _)| img).collect();
    show_images(&imgs, 2, 8, Some(&titles), 1.6)?.show("predictions")?;

    // %% [markdown]
    // Keep the fine-tuned model (its checkpoint records the settings it was trained with), then classify
    // one test image with the saved copy.

    // %%
    let (weights, _) = save_checkpoint(
        &finetune_net,
        "../target/fine-tuning/hotdog-resnet18",
        train_imgs.classes(),
        (settings.resize, settings.crop),
        [("test_acc".to_owned(), format!("{:.3}", fine.test_acc))].into(),
    )?;
    let classifier = Classifier::load(&weights, try_gpu(0))?;
    let (image, label) = test_imgs.samples()[0].clone();
    println!(
        "{} -> {} (true: {})",
        image.display(),
        classifier.predict(&image)?,
        test_imgs.classes()[label as usize]
    );

    // %% [markdown]
    // ## Beyond the book
    //
    // What a practitioner reaches for after the chapter, as fastai offers it: find a learning rate
    // before training, look at the mistakes after, unfreeze gradually, and ship the model. The loaders
    // and the chapter's optimiser (two groups, the output layer at ten times the rate: `chapter_sgd`)
    // are the same as in `fine_tune`.
    //
    // ### Finding the learning rate
    //
    // The *LR range test* (fastai's `lr_find`) trains for 100 steps while the learning rate grows
    // exponentially from 1e-7 to 10, records the smoothed loss, and suggests a rate where the loss
    // falls fastest over the longest stretch (fastai's `valley`). Afterwards the model is put back as
    // it was. Compare the suggestion with the chapter's rate and with exercise 1's larger one:

    // %%
    use d2l::model::{export_torchscript, write_predictions_csv};
    use d2l::train::{
        chapter_sgd, fine_tune_gradual, lr_find, ClassificationInterpretation, LrFindOptions,
        TrainOptions,
    };

    let devices = try_all_gpus();
    let train_loader = DataLoader::new(
        ImageFolder::new(data_dir.join("train"))?,
        train_augs.clone(),
        settings.batch_size,
    )?
    .shuffle(true)
    .seed(settings.seed)
    .num_workers(settings.num_workers);
    let test_loader = DataLoader::new(
        ImageFolder::new(data_dir.join("test"))?,
        test_augs.clone(),
        settings.batch_size,
    )?
    .num_workers(settings.num_workers);
    let vs_lr = VarStore::new(try_gpu(0));
    let net_lr = new_finetune_net(&vs_lr)?;
    let criterion = CrossEntropyLoss::new(Reduction::None);
    let found = lr_find(
        &net_lr,
        &train_loader,
        criterion,
        |lr| chapter_sgd(&net_lr, lr),
        &devices,
        &LrFindOptions::default(),
    )?;
    println!(
        "lr_find suggests {:.1e} (steepest {:.1e}, minimum / 10 {:.1e}); the chapter uses {:.0e}, exercise 1 {:.0e}",
        found.suggestion(), found.steep, found.minimum, settings.lr, 10.0 * settings.lr
    );
    found.figure()?.show("lr_find")?;

    // %% [markdown]
    // ### Looking at the mistakes
    //
    // Which test images does the fine-tuned model get wrong, and how sure is it? The confusion matrix
    // counts true classes (rows) against predictions (columns):

    // %%
    let interp = ClassificationInterpretation::from_net(&finetune_net, &test_loader, try_gpu(0))?;
    println!(
        "accuracy {:.3}; most confused (true, predicted, images): {:?}",
        interp.accuracy(),
        interp.most_confused(1)
    );
    interp.plot_confusion_matrix()?.show("confusion_matrix")?;

    // %% [markdown]
    // The test images with the highest loss, each titled *predicted/true* over *loss / probability of
    // the prediction*: a confident mistake has a high loss and a high probability.

    // %%
    interp.plot_top_losses(8, 4)?.show("top_losses")?;

    // %% [markdown]
    // ### Gradual unfreezing
    //
    // fastai's `fine_tune` first trains the new output layer alone with the copied body frozen
    // (BatchNorm layers still adapt), then unfreezes everything. The same number of epochs as the
    // chapter's recipe, on the same data, with the same optimiser:

    // %%
    let vs_g = VarStore::new(try_gpu(0));
    let net_g = new_finetune_net(&vs_g)?;
    let mut trainer = chapter_sgd(&net_g, settings.lr)?;
    let unfrozen_epochs = settings.num_epochs.saturating_sub(1).max(1);
    let gradual = fine_tune_gradual(
        &net_g,
        &train_loader,
        &test_loader,
        criterion,
        &mut trainer,
        1,
        unfrozen_epochs,
        &devices,
        &TrainOptions::default(),
    )?;
    println!(
        "test accuracy: chapter's recipe {:.3} ({} epochs), gradual unfreezing {:.3} (1 frozen + {} epochs)",
        fine.test_acc, fine.num_epochs, gradual.test_acc, unfrozen_epochs
    );

    // %% [markdown]
    // ### Surviving an interrupted run
    //
    // Interrupting an evcxr kernel ends it, and every variable with it. With a checkpoint path,
    // `train_ch13` writes the training state at the end of each epoch (weights, BatchNorm statistics,
    // the optimiser's momentum buffers, the loader's epoch, the history so far); run the cells again
    // and training resumes after the last saved epoch, with the history an uninterrupted run gives.
    // A finished run's checkpoint returns its history at once; delete the files to train afresh.

    // %%
    let vs_c = VarStore::new(try_gpu(0));
    let net_c = new_finetune_net(&vs_c)?;
    let mut trainer_c = chapter_sgd(&net_c, settings.lr)?;
    let resumable_opts = TrainOptions {
        checkpoint: Some(format!("../target/fine-tuning/{}-resumable", settings.profile).into()),
        ..Default::default()
    };
    let resumable = d2l::train::train_ch13_with(
        &net_c,
        &train_loader,
        &test_loader,
        criterion,
        &mut trainer_c,
        settings.exercise_epochs,
        &devices,
        &resumable_opts,
    )?;
    println!(
        "resumable run: test acc {:.3} after {} epochs",
        resumable.test_acc, resumable.num_epochs
    );

    // %% [markdown]
    // ### Shipping the model
    //
    // TorchScript that PyTorch loads without this crate (`torch.jit.load("hotdog-resnet18.pt")`,
    // logits out), and the saved checkpoint classifying a whole folder into a CSV (`path,label,probability`)
    // with a progress bar; `cargo run --release --example predict -- CHECKPOINT FOLDER` does the same
    // from the command line.

    // %%
    export_torchscript(
        &finetune_net,
        "../target/fine-tuning/hotdog-resnet18.pt",
        settings.crop,
    )?;
    let rows = classifier.predict_folder(data_dir.join("test"), settings.batch_size, true)?;
    write_predictions_csv("../target/fine-tuning/predictions.csv", &rows)?;
    let right = rows
        .iter()
        .filter(|(path, p)| path.parent().and_then(|d| d.file_name()) == Some(p.class.as_ref()))
        .count();
    println!(
        "{} test images classified, {right} right; wrote ../target/fine-tuning/predictions.csv",
        rows.len()
    );

    Ok(())
}
