//! Parity with torchvision 0.26 (PIL path) on golden outputs made by
//! tests/fixtures/transforms/make_goldens.py: geometry exact, resizing within 0.01 mean
//! absolute difference on the 0-1 scale (measured: under 0.001, at most 1/255 per value).
use std::path::{Path, PathBuf};

use d2l::data::transforms::*;
use image::RgbImage;
use rand::SeedableRng;
use serde_json::Value;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/transforms")
}

fn png(name: &str) -> RgbImage {
    image::open(dir().join(name)).unwrap().to_rgb8()
}

fn cases() -> Vec<Value> {
    let text = std::fs::read_to_string(dir().join("cases.json")).unwrap();
    let all: Value = serde_json::from_str(&text).unwrap();
    assert!(all["torchvision"].as_str().unwrap().starts_with("0.26"));
    all["cases"].as_array().unwrap().clone()
}

fn apply(t: &dyn Transform, img: RgbImage) -> RgbImage {
    match t
        .apply(
            Sample::Image(img),
            &mut rand_chacha::ChaCha8Rng::seed_from_u64(0),
        )
        .unwrap()
    {
        Sample::Image(img) => img,
        Sample::Tensor(_) => panic!("an image"),
    }
}

/// (mean, max) absolute difference on the 0-1 scale.
fn diff(a: &RgbImage, b: &RgbImage) -> (f64, f64) {
    assert_eq!(a.dimensions(), b.dimensions());
    let d: Vec<f64> = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(&x, &y)| (x as f64 - y as f64).abs() / 255.0)
        .collect();
    (
        d.iter().sum::<f64>() / d.len() as f64,
        d.iter().cloned().fold(0.0, f64::max),
    )
}

fn size(v: &Value) -> (u32, u32) {
    (v[0].as_u64().unwrap() as u32, v[1].as_u64().unwrap() as u32)
}

#[test]
fn geometric_transforms_match_torchvision_exactly() {
    let mut checked = 0;
    for case in cases() {
        let (op, Some(src)) = (case["op"].as_str().unwrap(), case["source"].as_str()) else {
            continue;
        };
        let want = match case["output"].as_str() {
            Some(out) => png(out),
            None => continue,
        };
        let got = match op {
            "center_crop" => apply(
                &CenterCrop::new(case["crop"].as_u64().unwrap() as u32),
                png(src),
            ),
            "hflip" => apply(&RandomHorizontalFlip::new(1.0), png(src)),
            _ => continue,
        };
        assert_eq!(got, want, "{op} on {src}");
        checked += 1;
    }
    assert_eq!(checked, 6);
}

#[test]
fn resizing_matches_torchvision_within_tolerance() {
    let mut checked = 0;
    for case in cases() {
        let op = case["op"].as_str().unwrap();
        let (src, out) = match (case["source"].as_str(), case["output"].as_str()) {
            (Some(s), Some(o)) => (png(s), png(o)),
            _ => continue,
        };
        let got = match op {
            "resize" => {
                let (h, w) = size(&case["size"]);
                apply(&Resize::new(h, w), src)
            }
            "resize_center_crop" => {
                let (h, w) = size(&case["size"]);
                let crop = case["crop"].as_u64().unwrap() as u32;
                apply(
                    &Compose::new()
                        .then(Resize::new(h, w))
                        .then(CenterCrop::new(crop)),
                    src,
                )
            }
            "resized_crop" => {
                let p: Vec<u32> = case["params"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_u64().unwrap() as u32)
                    .collect();
                resized_crop(&src, p[0], p[1], p[2], p[3], size(&case["size"])).unwrap()
            }
            _ => continue,
        };
        let (mean, max) = diff(&got, &out);
        println!(
            "{:40} mean {mean:.5} max {max:.4}",
            case["output"].as_str().unwrap()
        );
        // Both round the same filtered sums to 8-bit levels (PIL in 22-bit fixed point,
        // fast_image_resize with its own fixed-point coefficients), each within half a level of
        // the exact value: so they differ by at most one level. Where the two sums fall on either
        // side of a rounding boundary they differ by one: a quarter of the values at most here
        // (measured: mean up to 0.23 of a level); half a level on average would mean sums that
        // differ by half a level, a wrong filter or sampling grid, which moves values by several.
        assert!(
            max <= 1.0 / 255.0 + 1e-12,
            "{}: max abs diff {max}",
            case["output"]
        );
        assert!(
            mean <= 0.5 / 255.0,
            "{}: mean abs diff {mean}",
            case["output"]
        );
        checked += 1;
    }
    assert_eq!(checked, 12);
}

#[test]
fn to_tensor_and_normalize_match_torchvision() {
    let case = cases()
        .into_iter()
        .find(|c| c["op"] == "to_tensor_normalize")
        .unwrap();
    let c: Vec<u32> = case["crop"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let img = image::imageops::crop_imm(
        &png(case["source"].as_str().unwrap()),
        c[0],
        c[1],
        c[2] - c[0],
        c[3] - c[1],
    )
    .to_image();
    let pipeline = Compose::new().then(ToTensor).then(Normalize::imagenet());
    let Sample::Tensor(t) = pipeline
        .apply(
            Sample::Image(img),
            &mut rand_chacha::ChaCha8Rng::seed_from_u64(0),
        )
        .unwrap()
    else {
        panic!()
    };
    let want: Vec<f64> = case["values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(t.data.len(), want.len());
    // (x / 255 - mean) / std in float32 on both sides: three roundings of values below 2.7
    // (an ulp there is 2.4e-7), so they agree to 1e-6; a wrong channel's mean or std is off by
    // 0.02 or more.
    for (a, b) in t.data.iter().zip(&want) {
        assert!((*a as f64 - b).abs() < 1e-6, "{a} vs {b}");
    }
}
