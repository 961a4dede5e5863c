//! The offline data sets: layout, determinism, learnable content, and the full download path
//! through a zip served on 127.0.0.1.
mod common;

use common::{files_below, sha1_hex, Reply, Server};
use d2l::data::synthetic::*;
use d2l::data::ImageFolder;

fn tiny() -> HotdogConfig {
    HotdogConfig {
        train_per_class: 3,
        test_per_class: 2,
        min_side: 30,
        max_side: 70,
        seed: 9,
    }
}

#[test]
fn hotdog_set_has_the_real_layout_and_varied_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let root = make_hotdog_dataset(dir.path(), &tiny()).unwrap();
    assert_eq!(root, dir.path().join("hotdog"));
    let train = ImageFolder::new(root.join("train")).unwrap();
    let test = ImageFolder::new(root.join("test")).unwrap();
    assert_eq!(train.classes(), ["hotdog", "not-hotdog"]);
    assert_eq!((train.len(), test.len()), (6, 4));
    let sizes: std::collections::BTreeSet<_> = (0..6)
        .map(|i| train.get(i).unwrap().0.dimensions())
        .collect();
    assert!(sizes.len() > 3, "sizes should vary: {sizes:?}");
    for (w, h) in sizes {
        assert!((30..=70).contains(&w) && (30..=70).contains(&h));
    }
    let defaults = HotdogConfig::default();
    assert_eq!(
        (defaults.train_per_class, defaults.test_per_class),
        (1000, 400)
    );
}

#[test]
fn the_same_seed_makes_the_same_bytes_and_a_second_call_is_free() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let ra = make_hotdog_dataset(a.path(), &tiny()).unwrap();
    let rb = make_hotdog_dataset(b.path(), &tiny()).unwrap();
    let files = files_below(&ra);
    assert_eq!(files, files_below(&rb));
    for f in &files {
        assert_eq!(
            std::fs::read(ra.join(f)).unwrap(),
            std::fs::read(rb.join(f)).unwrap(),
            "{f}"
        );
    }
    let before = std::fs::metadata(ra.join("train/hotdog/0000.jpg"))
        .unwrap()
        .modified()
        .unwrap();
    make_hotdog_dataset(a.path(), &tiny()).unwrap();
    assert_eq!(
        before,
        std::fs::metadata(ra.join("train/hotdog/0000.jpg"))
            .unwrap()
            .modified()
            .unwrap()
    );
    // Another seed: another set, made in place of the old one.
    let other = HotdogConfig { seed: 10, ..tiny() };
    make_hotdog_dataset(a.path(), &other).unwrap();
    assert_ne!(
        std::fs::read(ra.join("train/hotdog/0000.jpg")).unwrap(),
        std::fs::read(rb.join("train/hotdog/0000.jpg")).unwrap()
    );
    assert_eq!(
        files_below(a.path()).len(),
        files.len(),
        "no staging folders left"
    );
}

#[test]
fn hotdogs_show_a_sausage_in_a_bun_and_the_other_class_mostly_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = HotdogConfig {
        train_per_class: 60,
        test_per_class: 1,
        min_side: 48,
        max_side: 64,
        seed: 3,
    };
    let set =
        ImageFolder::new(make_hotdog_dataset(dir.path(), &cfg).unwrap().join("train")).unwrap();
    let near = |p: &image::Rgb<u8>, c: [i32; 3]| {
        (0..3).map(|i| (p[i] as i32 - c[i]).pow(2)).sum::<i32>() < 50 * 50
    };
    // A sausage and a bun: both colours present, each on at least 1% of the picture.
    let sausage_in_bun = |img: &image::RgbImage| {
        let n = (img.width() * img.height()) as usize / 100;
        img.pixels().filter(|p| near(p, [170, 62, 40])).count() > n
            && img.pixels().filter(|p| near(p, [214, 164, 96])).count() > n
    };
    let rate = |label: i64| {
        let v: Vec<bool> = (0..set.len())
            .filter(|&i| set.samples()[i].1 == label)
            .map(|i| sausage_in_bun(&set.get(i).unwrap().0))
            .collect();
        v.iter().filter(|&&b| b).count() as f64 / v.len() as f64
    };
    let (hotdog, other) = (rate(0), rate(1));
    assert!(
        hotdog > 0.9 && other < 0.3,
        "sausage-in-bun rate: hotdog {hotdog}, other {other}"
    );
}

#[test]
fn source_set_has_ten_food_classes() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = SourceConfig {
        train_per_class: 2,
        test_per_class: 1,
        min_side: 32,
        max_side: 40,
        seed: 1,
    };
    let root = make_source_dataset(dir.path(), &cfg).unwrap();
    let train = ImageFolder::new(root.join("train")).unwrap();
    assert_eq!(train.classes(), SOURCE_CLASSES);
    assert_eq!(train.len(), 22);
    // A hot-dog class, as ImageNet has; the hotdog set's negatives are the other foods only.
    assert!(SOURCE_CLASSES.contains(&"hotdog") && !OTHER_FOODS.contains(&"hotdog"));
}

#[test]
fn packed_zip_goes_through_download_extract_from_a_local_server() {
    let dir = tempfile::tempdir().unwrap();
    let made = make_hotdog_dataset(dir.path().join("made"), &tiny()).unwrap();
    let zip = dir.path().join("hotdog.zip");
    pack_zip(&made, &zip).unwrap();
    let again = dir.path().join("again.zip");
    pack_zip(&made, &again).unwrap();
    let bytes = std::fs::read(&zip).unwrap();
    assert_eq!(
        bytes,
        std::fs::read(&again).unwrap(),
        "packing is deterministic"
    );

    let server = Server::start();
    server.route("hotdog.zip", Reply::Body(bytes.clone()));
    let cache = dir.path().join("cache");
    d2l::data::fetch(
        &server.url("hotdog.zip"),
        &cache.join("hotdog.zip"),
        &d2l::data::Checksum::Sha1(sha1_hex(&bytes)),
    )
    .unwrap();
    let data_dir = d2l::data::extract(&cache.join("hotdog.zip")).unwrap();
    let mut expected = files_below(&made);
    expected.retain(|f| !f.starts_with(".d2l"));
    let mut got = files_below(&data_dir);
    got.retain(|f| !f.starts_with(".d2l"));
    assert_eq!(got, expected);
    assert_eq!(ImageFolder::new(data_dir.join("train")).unwrap().len(), 6);
}
