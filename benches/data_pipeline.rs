//! `cargo bench`: the data pipeline's parts (decode, the chapter's training augmentation, a loader
//! epoch with one thread and with all cores) on the generated hotdog-like JPEGs. The comparison
//! with PyTorch lives in `bench/compare.py` and `bench/data_pipeline.py`.
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use d2l::data::synthetic::{make_hotdog_dataset, HotdogConfig};
use d2l::data::transforms::*;
use d2l::data::{decode_rgb, DataLoader, ImageFolder};
use rand::SeedableRng;

fn train_augs(size: u32) -> Compose {
    Compose::new()
        .then(RandomResizedCrop::new(size))
        .then(RandomHorizontalFlip::new(0.5))
        .then(ToTensor)
        .then(Normalize::imagenet())
}

fn pipeline(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let cfg = HotdogConfig {
        train_per_class: 32,
        test_per_class: 1,
        ..HotdogConfig::default()
    };
    let root = make_hotdog_dataset(dir.path(), &cfg).expect("generated data");
    let set = ImageFolder::new(root.join("train")).expect("image folder");
    let files: Vec<Vec<u8>> = set
        .samples()
        .iter()
        .map(|(p, _)| std::fs::read(p).expect("jpeg"))
        .collect();
    let images: Vec<_> = files
        .iter()
        .map(|b| decode_rgb(b).expect("decodes"))
        .collect();

    let mut g = c.benchmark_group("data");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(4))
        .warm_up_time(Duration::from_secs(1));
    g.throughput(Throughput::Elements(files.len() as u64));
    g.bench_function("decode jpeg (160-480 px)", |b| {
        b.iter(|| {
            files
                .iter()
                .map(|f| decode_rgb(f).expect("decodes").width())
                .sum::<u32>()
        })
    });
    for size in [224u32, 64] {
        let augs = train_augs(size);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        g.bench_function(
            format!("RandomResizedCrop({size}) + flip + ToTensor + Normalize"),
            |b| {
                b.iter(|| {
                    for img in &images {
                        augs.apply(Sample::Image(img.clone()), &mut rng)
                            .expect("augments");
                    }
                })
            },
        );
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    for workers in [0, cores] {
        let loader = DataLoader::new(set.clone(), train_augs(224), 32)
            .expect("loader")
            .shuffle(true)
            .num_workers(workers);
        g.bench_function(format!("loader epoch, 224 px, {workers} workers"), |b| {
            b.iter(|| {
                loader
                    .iter()
                    .map(|batch| batch.expect("batch").1.size()[0])
                    .sum::<i64>()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, pipeline);
criterion_main!(benches);
