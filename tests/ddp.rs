//! Distributed data-parallel training with real processes (Gloo on 127.0.0.1): 2 and 3 ranks
//! take the same three steps (losses, parameters, running statistics) as one process over the
//! same global batches, compared in float64 within what rounding allows (tests/numerics); and
//! `train_ch13` under a group: rank 0 speaks for all, the numbers are the group's.
mod common;
mod numerics;

use std::path::Path;

use common::{chapter_sgd, ChildRun};
use d2l::model::{resnet18, ResNet};
use d2l::tch::nn::VarStore;
use d2l::tch::{Device, Kind, Tensor};
use d2l::train::*;
use numerics::*;

const STEPS: i64 = 3;

/// The global batch of step `i`: 12 images of 64 px, labels alternating.
fn batch(i: i64) -> (Tensor, Tensor) {
    d2l::tch::manual_seed(100 + i);
    let x = Tensor::randn([12, 3, 64, 64], (Kind::Float, Device::Cpu));
    let y = Tensor::from_slice(&(0..12).map(|k| (k + i) % 2).collect::<Vec<i64>>());
    (x, y)
}

fn is_stat(name: &str) -> bool {
    name.contains("running_")
}

/// Deep copies of the named tensors `keep` accepts, in the net's order.
fn tensors(net: &ResNet, keep: impl Fn(&str) -> bool) -> Vec<Tensor> {
    let named = net.named_tensors();
    copies(named.iter().filter(|(n, _)| keep(n)).map(|(_, t)| t))
}

/// ResNet-18 (2 classes) with the weights in `init`, in `kind`.
fn load(init: &Path, kind: Kind) -> (VarStore, ResNet) {
    let mut vs = VarStore::new(Device::Cpu);
    let net = resnet18(&vs.root(), 2);
    vs.load(init).unwrap();
    if kind == Kind::Double {
        vs.double();
    }
    (vs, net)
}

/// The rank side, per D2L_TEST_ROLE; nothing in a normal run.
#[test]
fn rank_process() {
    let Ok(role) = std::env::var("D2L_TEST_ROLE") else {
        return;
    };
    d2l::tch::set_num_threads(1);
    let out = std::path::PathBuf::from(std::env::var("D2L_TEST_OUT").unwrap());
    let result = (|| -> d2l::Result<String> {
        let group = d2l::dist::init_process_group()?.expect("WORLD_SIZE is set");
        let (rank, world) = (group.rank(), group.world_size());
        match role.as_str() {
            "steps" => {
                let (_vs, net) = load(&out.join("init.safetensors"), Kind::Double);
                let mut opt = chapter_sgd(&net, 0.01, 1e-3, true);
                let mut dp =
                    DataParallel::new(&net, &[Device::Cpu])?.distributed(Some(group.clone()))?;
                let mut losses = Vec::new();
                for i in 0..STEPS {
                    let (x, y) = batch(i);
                    let (xs, ys) = (x.chunk(world as i64, 0), y.chunk(world as i64, 0));
                    let (x, y) = (xs[rank].to_kind(Kind::Double), &ys[rank]);
                    let (l, _) = train_batch_ch13(
                        &mut dp,
                        &x,
                        y,
                        &cross_entropy,
                        &mut opt,
                        &StepOptions::default(),
                    )?;
                    let t = Tensor::from_slice(&[l]);
                    group.all_reduce(&[&t], d2l::dist::ReduceOp::Sum)?;
                    losses.push(t.double_value(&[0]));
                }
                let named = net.named_tensors();
                Tensor::write_safetensors(&named, out.join(format!("rank{rank}.safetensors")))?;
                Ok(format!("{losses:?}"))
            }
            // A global batch of one image: rank 1's share is empty; it joins the sum with zero
            // gradients, and both ranks take the same step.
            "empty_share" => {
                let (_vs, net) = load(&out.join("init.safetensors"), Kind::Double);
                let mut opt = chapter_sgd(&net, 0.01, 1e-3, true);
                let mut dp =
                    DataParallel::new(&net, &[Device::Cpu])?.distributed(Some(group.clone()))?;
                let (x, y) = batch(0);
                let (x, y) = (x.narrow(0, 0, 1).to_kind(Kind::Double), y.narrow(0, 0, 1));
                let (x, y) = if rank == 0 {
                    (x, y)
                } else {
                    (
                        Tensor::zeros([0, 3, 0, 0], (Kind::Double, Device::Cpu)),
                        y.narrow(0, 0, 0),
                    )
                };
                let (l, _) = train_batch_ch13(
                    &mut dp,
                    &x,
                    &y,
                    &cross_entropy,
                    &mut opt,
                    &StepOptions::default(),
                )?;
                let fc = net.fc.weight.shallow_clone();
                let t = fc.sum(Kind::Double);
                Ok(format!("{} {}", l > 0.0, t.double_value(&[])))
            }
            "train_ch13" => {
                let cfg = d2l::data::synthetic::HotdogConfig {
                    train_per_class: 6,
                    test_per_class: 3,
                    min_side: 40,
                    max_side: 60,
                    seed: 2,
                };
                let root = d2l::data::synthetic::make_hotdog_dataset(out.join("data"), &cfg)?;
                let augs = || {
                    use d2l::data::transforms::*;
                    Compose::new()
                        .then(Resize::new(32, 32))
                        .then(ToTensor)
                        .then(Normalize::imagenet())
                };
                let make = |split: &str, shuffle| -> d2l::Result<d2l::DataLoader> {
                    Ok(
                        d2l::DataLoader::new(d2l::ImageFolder::new(root.join(split))?, augs(), 4)?
                            .shuffle(shuffle)
                            .seed(1),
                    )
                };
                let (train, test) = (make("train", true)?, make("test", false)?);
                let (_vs, net) = load(&out.join("init.safetensors"), Kind::Float);
                let mut opt = chapter_sgd(&net, 0.01, 1e-3, true);
                let opts = TrainOptions {
                    no_figure: true,
                    ..Default::default()
                };
                let h = train_ch13_with(
                    &net,
                    &train,
                    &test,
                    cross_entropy,
                    &mut opt,
                    2,
                    &d2l::Devices(vec![Device::Cpu]),
                    &opts,
                )?;
                assert_eq!(
                    train.shard(),
                    (0, 1),
                    "the loaders read whole batches again"
                );
                // Rank 0 writes the checkpoint (with its running statistics); every rank can
                // load it once save_checkpoint returns.
                let classes = vec!["hotdog".to_owned(), "not-hotdog".to_owned()];
                let (weights, _) = d2l::model::save_checkpoint(
                    &net,
                    out.join("ckpt"),
                    &classes,
                    (32, 32),
                    Default::default(),
                )?;
                let clf = d2l::model::Classifier::load(&weights, Device::Cpu)?;
                if rank == 0 {
                    for ((n, saved), (_, mine)) in
                        clf.net().named_tensors().iter().zip(net.named_tensors())
                    {
                        assert!(saved.equal(&mine), "the checkpoint's {n} is not rank 0's");
                    }
                }
                assert!(
                    h.timing.comm_s > 0.0 && h.timing.comm_s < h.timing.step_s,
                    "the collectives' time is part of the steps' time: {:?}",
                    h.timing
                );
                Ok(format!(
                    "{} {} {} {} {}",
                    h.train_loss, h.train_acc, h.test_acc, h.config["train_examples"], h.devices
                ))
            }
            other => panic!("unknown role {other}"),
        }
    })();
    common::report(result);
}

fn run_ranks(role: &str, world: usize, out: &Path) -> Vec<ChildRun> {
    let port = common::free_port();
    let children: Vec<_> = (0..world)
        .map(|rank| {
            common::rank_command(role, port, rank, world, 120)
                .env("D2L_TEST_OUT", out)
                .spawn()
                .unwrap()
        })
        .collect();
    let runs: Vec<ChildRun> = children.into_iter().map(common::wait_child).collect();
    for run in &runs {
        assert!(run.status.success() && run.result().is_some(), "{run:?}");
    }
    runs
}

#[test]
fn two_and_three_ranks_take_the_steps_one_process_takes() {
    let out = tempfile::tempdir().unwrap();
    d2l::tch::manual_seed(0);
    let vs = VarStore::new(Device::Cpu);
    let net = resnet18(&vs.root(), 2);
    vs.save(out.path().join("init.safetensors")).unwrap();
    let init = out.path().join("init.safetensors");
    let (stats0, params0) = (tensors(&net, is_stat), tensors(&net, |n| !is_stat(n)));
    for world in [2usize, 3] {
        // One process over the same global batches: DataParallel over `world` CPU "devices"
        // (each a chunk, as each rank), in float32 and in float64.
        let devices = vec![Device::Cpu; world];
        let (_a, net32) = load(&init, Kind::Float);
        let (_b, net64) = load(&init, Kind::Double);
        let (mut o32, mut o64) = (
            chapter_sgd(&net32, 0.01, 1e-3, true),
            chapter_sgd(&net64, 0.01, 1e-3, true),
        );
        let mut dp32 = DataParallel::new(&net32, &devices).unwrap();
        let mut dp64 = DataParallel::new(&net64, &devices).unwrap();
        let (mut losses32, mut losses64) = (Vec::new(), Vec::new());
        for i in 0..STEPS {
            let (x, y) = batch(i);
            let default = StepOptions::default();
            losses32.push(
                train_batch_ch13(&mut dp32, &x, &y, &cross_entropy, &mut o32, &default)
                    .unwrap()
                    .0,
            );
            let x64 = x.to_kind(Kind::Double);
            losses64.push(
                train_batch_ch13(&mut dp64, &x64, &y, &cross_entropy, &mut o64, &default)
                    .unwrap()
                    .0,
            );
        }
        drop((dp32, dp64));

        let runs = run_ranks("steps", world, out.path());
        let ddp_losses: Vec<f64> = serde_json::from_str(runs[0].result().unwrap()).unwrap();
        for run in &runs[1..] {
            assert_eq!(
                run.result(),
                runs[0].result(),
                "every rank reports the group's losses"
            );
        }
        for i in 0..STEPS as usize {
            let trusted = rel(losses32[i], losses64[i]);
            assert_f64_as_close(
                &format!("{world} ranks, step {i}: loss"),
                rel(ddp_losses[i], losses64[i]),
                trusted,
            );
        }
        // Parameters and running statistics after three steps, rank 0 against one process;
        // every rank holds the same parameters, to the bit.
        // In the net's order (a safetensors file keeps its own).
        let read = |rank: usize| -> Vec<(String, Tensor)> {
            let path = out.path().join(format!("rank{rank}.safetensors"));
            let mut by_name: std::collections::HashMap<String, Tensor> =
                Tensor::read_safetensors(path)
                    .unwrap()
                    .into_iter()
                    .collect();
            net.named_tensors()
                .into_iter()
                .map(|(n, _)| {
                    let t = by_name
                        .remove(&n)
                        .unwrap_or_else(|| panic!("{n} is not saved"));
                    (n, t)
                })
                .collect()
        };
        let rank0 = read(0);
        for rank in 1..world {
            for ((n, a), (_, b)) in rank0.iter().zip(&read(rank)) {
                if !is_stat(n) {
                    assert!(
                        a.equal(b),
                        "{world} ranks: rank {rank}'s {n} differs from rank 0's"
                    );
                }
            }
        }
        for (what, keep, start) in [
            (
                "parameters",
                (|n: &str| !is_stat(n)) as fn(&str) -> bool,
                &params0,
            ),
            ("running statistics", is_stat, &stats0),
        ] {
            let ddp: Vec<Tensor> = rank0
                .iter()
                .filter(|(n, _)| keep(n))
                .map(|(_, t)| t.shallow_clone())
                .collect();
            let want = steps(&tensors(&net64, keep), start);
            let trusted = rel_dist(&steps(&tensors(&net32, keep), start), &want);
            assert_f64_as_close(
                &format!("{world} ranks, 3 steps: {what}"),
                rel_dist(&steps(&ddp, start), &want),
                trusted,
            );
        }
    }
}

#[test]
fn train_ch13_under_two_ranks_speaks_once_for_the_group() {
    let out = tempfile::tempdir().unwrap();
    d2l::tch::manual_seed(0);
    let vs = VarStore::new(Device::Cpu);
    let _net = resnet18(&vs.root(), 2);
    vs.save(out.path().join("init.safetensors")).unwrap();
    let runs = run_ranks("train_ch13", 2, out.path());
    assert_eq!(
        runs[0].result(),
        runs[1].result(),
        "both ranks return the group's history"
    );
    let result = runs[0].result().unwrap();
    assert!(
        result.ends_with(" 12 [device(type='cpu')] x 2 processes"),
        "{result}"
    );
    let lines =
        |run: &ChildRun, what: &str| run.stdout.lines().filter(|l| l.contains(what)).count();
    assert_eq!(
        lines(
            &runs[0],
            "examples/sec on [device(type='cpu')] x 2 processes"
        ),
        1,
        "{}",
        runs[0].stdout
    );
    assert_eq!(lines(&runs[0], "epoch 2/2: test acc"), 1);
    assert_eq!(lines(&runs[1], "examples/sec"), 0, "{}", runs[1].stdout);
    assert_eq!(lines(&runs[1], "epoch"), 0, "{}", runs[1].stdout);
}

#[test]
fn a_rank_with_an_empty_share_joins_the_step() {
    let out = tempfile::tempdir().unwrap();
    d2l::tch::manual_seed(0);
    let vs = VarStore::new(Device::Cpu);
    let _net = resnet18(&vs.root(), 2);
    vs.save(out.path().join("init.safetensors")).unwrap();
    let runs = run_ranks("empty_share", 2, out.path());
    let (r0, r1) = (runs[0].result().unwrap(), runs[1].result().unwrap());
    assert!(
        r0.starts_with("true ") && r1.starts_with("false "),
        "{r0} / {r1}"
    );
    // The same step on both ranks: the output layer's weights agree to the bit.
    assert_eq!(r0.split(' ').nth(1), r1.split(' ').nth(1));
}
