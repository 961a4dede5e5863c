//! DataLoader: shapes, order, seeded shuffling and augmentation that do not depend on workers.
use d2l::data::synthetic::{make_hotdog_dataset, HotdogConfig};
use d2l::data::transforms::*;
use d2l::data::{DataLoader, ImageFolder};
use d2l::tch::Tensor;

fn tiny_set(dir: &std::path::Path) -> ImageFolder {
    let cfg = HotdogConfig {
        train_per_class: 7,
        test_per_class: 1,
        min_side: 24,
        max_side: 40,
        seed: 5,
    };
    let root = make_hotdog_dataset(dir, &cfg).unwrap();
    ImageFolder::new(root.join("train")).unwrap()
}

fn train_augs() -> Compose {
    Compose::new()
        .then(RandomResizedCrop::new(16))
        .then(RandomHorizontalFlip::new(0.5))
        .then(ToTensor)
        .then(Normalize::imagenet())
}

fn epoch(loader: &DataLoader) -> Vec<(Tensor, Tensor)> {
    loader.iter().map(|b| b.unwrap()).collect()
}

#[test]
fn batches_have_torch_shapes_and_keep_the_last_partial_one() {
    let dir = tempfile::tempdir().unwrap();
    let loader = DataLoader::new(tiny_set(dir.path()), train_augs(), 4).unwrap();
    assert_eq!(loader.len(), 4); // 14 images
    let batches = epoch(&loader);
    let sizes: Vec<i64> = batches.iter().map(|(x, _)| x.size()[0]).collect();
    assert_eq!(sizes, [4, 4, 4, 2]);
    assert_eq!(batches[0].0.size(), [4, 3, 16, 16]);
    assert_eq!(batches[0].0.kind(), d2l::tch::Kind::Float);
    assert_eq!(batches[0].1.kind(), d2l::tch::Kind::Int64);
    // Without shuffling, labels come in folder order: 7 hotdogs (0), then 7 others (1).
    let labels: Vec<i64> = batches
        .iter()
        .flat_map(|(_, y)| Vec::<i64>::try_from(y).unwrap())
        .collect();
    assert_eq!(labels, [0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1]);
}

#[test]
fn the_same_seed_gives_the_same_batches_whatever_the_number_of_workers() {
    let dir = tempfile::tempdir().unwrap();
    let set = tiny_set(dir.path());
    let make = |workers| {
        DataLoader::new(set.clone(), train_augs(), 3)
            .unwrap()
            .shuffle(true)
            .seed(42)
            .num_workers(workers)
    };
    // More workers than samples, and the smallest window ahead, too.
    let (a, b, c, d) = (make(0), make(1), make(3), make(20).prefetch(1));
    for _ in 0..2 {
        let ea = epoch(&a);
        assert_eq!(ea.len(), 5);
        for other in [epoch(&b), epoch(&c), epoch(&d)] {
            assert_eq!(other.len(), 5);
            for ((xa, ya), (xo, yo)) in ea.iter().zip(&other) {
                assert!(xa.equal(xo) && ya.equal(yo));
            }
        }
    }
}

#[test]
fn epochs_reshuffle_and_other_seeds_differ() {
    let dir = tempfile::tempdir().unwrap();
    let set = tiny_set(dir.path());
    let labels = |l: &DataLoader| -> Vec<i64> {
        l.iter()
            .flat_map(|b| Vec::<i64>::try_from(&b.unwrap().1).unwrap())
            .collect()
    };
    let loader = DataLoader::new(set.clone(), train_augs(), 14)
        .unwrap()
        .shuffle(true)
        .seed(1);
    let (e0, e1) = (epoch(&loader), epoch(&loader));
    assert!(!e0[0].0.equal(&e1[0].0), "two epochs gave the same batch");
    let other = DataLoader::new(set.clone(), train_augs(), 14)
        .unwrap()
        .shuffle(true)
        .seed(2);
    assert_ne!(labels(&other), {
        loader.set_epoch(0);
        labels(&loader)
    });
    // Every sample once per epoch.
    let mut l = labels(&other);
    l.sort();
    assert_eq!(l, [0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1]);
}

#[test]
fn a_bad_file_or_transform_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let set = tiny_set(dir.path());
    let victim = set.samples()[5].0.clone();
    std::fs::write(&victim, b"garbage").unwrap();
    let loader = DataLoader::new(set.clone(), train_augs(), 4)
        .unwrap()
        .num_workers(2);
    let results: Vec<_> = loader.iter().collect();
    let err = results[1].as_ref().unwrap_err().to_string();
    assert!(
        err.contains(victim.file_name().unwrap().to_str().unwrap()),
        "{err}"
    );
    assert!(results[0].is_ok() && results[2].is_ok());

    // No fixed size at the end: images of different sizes cannot be stacked.
    let loose = DataLoader::new(
        set.clone().skip_unreadable(),
        Compose::new().then(ToTensor),
        4,
    )
    .unwrap();
    let err = loose.iter().next().unwrap().unwrap_err().to_string();
    assert!(err.contains("fixed-size crop or resize"), "{err}");
    let err = loose.num_workers(3).iter().next().unwrap().unwrap_err();
    assert!(
        err.to_string().contains("fixed-size crop or resize"),
        "{err}"
    );

    let images_only = DataLoader::new(set, Compose::new().then(CenterCrop::new(8)), 2).unwrap();
    let err = images_only.iter().next().unwrap().unwrap_err().to_string();
    assert!(err.contains("must end with ToTensor"), "{err}");
    assert!(DataLoader::new(tiny_set(dir.path()), train_augs(), 0).is_err());
}

#[test]
fn dropping_an_epoch_early_stops_its_workers() {
    let dir = tempfile::tempdir().unwrap();
    let set = tiny_set(dir.path());
    // In another thread, so that a drop that hangs fails the test instead of hanging it; the
    // loader comes back for a whole epoch after.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let loader = DataLoader::new(set, train_augs(), 1)
            .unwrap()
            .num_workers(2)
            .prefetch(1);
        let mut it = loader.iter();
        let first = it.next().map(|b| b.is_ok());
        drop(it);
        let _ = tx.send((first, loader));
    });
    let (first, loader) = rx
        .recv_timeout(std::time::Duration::from_secs(120))
        .expect("dropping an epoch after one batch did not return: its workers hang");
    assert_eq!(first, Some(true));
    assert_eq!(epoch(&loader).len(), 14);
}

/// Panics on images of odd width: a stand-in for a transform with a bug.
#[derive(Debug)]
struct PanicsOnOddWidth;

impl Transform for PanicsOnOddWidth {
    fn apply(&self, x: Sample, _rng: &mut dyn rand::RngCore) -> d2l::Result<Sample> {
        if let Sample::Image(img) = &x {
            assert!(img.width() % 2 == 0, "odd width {}", img.width());
        }
        Ok(x)
    }
}

#[test]
fn a_panicking_transform_fails_its_batch_and_the_epoch_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let set = tiny_set(dir.path());
    let augs = Compose::new()
        .then(PanicsOnOddWidth)
        .then(CenterCrop::new(8))
        .then(ToTensor);
    for workers in [0, 3] {
        let loader = DataLoader::new(set.clone(), augs.clone(), 2)
            .unwrap()
            .num_workers(workers);
        let results: Vec<_> = loader.iter().collect();
        assert_eq!(results.len(), 7, "workers {workers}");
        let errors: Vec<String> = results
            .iter()
            .filter_map(|r| r.as_ref().err().map(|e| e.to_string()))
            .collect();
        assert!(
            !errors.is_empty() && errors.len() < 7,
            "workers {workers}: {errors:?}"
        );
        assert!(errors.iter().all(|e| e.contains("panicked")), "{errors:?}");
    }
}

#[test]
fn ranks_read_their_chunks_of_the_same_batches_one_process_reads() {
    // 14 images in batches of 4 (the last of 2): 3 ranks split each as torch.chunk does
    // (2+2+0, the last 1+1+0), with the same samples and augmentations as one process.
    let dir = tempfile::tempdir().unwrap();
    let set = tiny_set(dir.path());
    let make = |workers| {
        DataLoader::new(set.clone(), train_augs(), 4)
            .unwrap()
            .shuffle(true)
            .seed(7)
            .num_workers(workers)
    };
    let whole = epoch(&make(0));
    for world in [2usize, 3] {
        for workers in [0, 2] {
            let shares: Vec<Vec<(Tensor, Tensor)>> = (0..world)
                .map(|rank| {
                    let loader = make(workers);
                    loader.set_shard(rank, world).unwrap();
                    assert_eq!(loader.len(), 4);
                    epoch(&loader)
                })
                .collect();
            for (b, (x, y)) in whole.iter().enumerate() {
                let xs: Vec<&Tensor> = shares
                    .iter()
                    .map(|s| &s[b].0)
                    .filter(|t| t.size()[0] > 0)
                    .collect();
                let ys: Vec<&Tensor> = shares
                    .iter()
                    .map(|s| &s[b].1)
                    .filter(|t| t.size()[0] > 0)
                    .collect();
                let want: Vec<i64> = x
                    .chunk(world as i64, 0)
                    .iter()
                    .map(|c| c.size()[0])
                    .collect();
                let got: Vec<i64> = xs.iter().map(|t| t.size()[0]).collect();
                assert_eq!(got, want, "{world} ranks, batch {b}: torch.chunk's sizes");
                assert!(
                    Tensor::cat(&xs, 0).equal(x),
                    "{world} ranks, {workers} workers, batch {b}"
                );
                assert!(Tensor::cat(&ys, 0).equal(y));
            }
        }
    }
    assert!(make(0).set_shard(2, 2).is_err());
}
