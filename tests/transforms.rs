//! Transforms with torchvision's semantics: parameters, offsets, values.
use d2l::data::transforms::*;
use image::RgbImage;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn gradient(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([(x * 255 / w.max(2)) as u8, (y * 255 / h.max(2)) as u8, 100])
    })
}

#[test]
fn random_resized_crop_params_stay_inside_the_image_and_in_range() {
    let t = RandomResizedCrop::new(224);
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for (h, w) in [(500, 375), (100, 600), (224, 224), (37, 1000)] {
        for _ in 0..500 {
            let (top, left, ch, cw) = t.get_params(h, w, &mut rng);
            assert!(
                ch > 0 && cw > 0 && top + ch <= h && left + cw <= w,
                "{h}x{w}: {top} {left} {ch} {cw}"
            );
        }
    }
    // Accepted crops cover 8-100% of the area at ratios 3/4-4/3 (up to rounding).
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    for _ in 0..500 {
        let (_, _, ch, cw) = t.get_params(1000, 1000, &mut rng);
        let (area, ratio) = ((ch * cw) as f64 / 1e6, cw as f64 / ch as f64);
        assert!((0.079..=1.0).contains(&area), "area {area}");
        assert!((0.74..=1.34).contains(&ratio), "ratio {ratio}");
    }
}

#[test]
fn random_resized_crop_falls_back_to_a_central_crop_clamped_to_the_ratio() {
    // A 1000x10 strip: no crop of ratio <= 4/3 with area >= 8% fits in ten tries.
    let t = RandomResizedCrop::new(8);
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    // width/height = 100 > 4/3: h = height, w = round(10 * 4/3) = 13, centred.
    assert_eq!(
        t.get_params(10, 1000, &mut rng),
        (0, (1000 - 13) / 2, 10, 13)
    );
    // Tall: w = width, h = round(10 / (3/4)) = 13.
    assert_eq!(
        t.get_params(1000, 10, &mut rng),
        ((1000 - 13) / 2, 0, 13, 10)
    );
}

#[test]
fn random_resized_crop_output_has_the_size_asked() {
    let t = RandomResizedCrop::new(32);
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let out = t.apply(Sample::Image(gradient(90, 50)), &mut rng).unwrap();
    let Sample::Image(img) = out else {
        panic!("an image")
    };
    assert_eq!(img.dimensions(), (32, 32));
}

fn center_crop(img: &RgbImage, size: u32) -> RgbImage {
    let rng = &mut ChaCha8Rng::seed_from_u64(0);
    match CenterCrop::new(size)
        .apply(Sample::Image(img.clone()), rng)
        .unwrap()
    {
        Sample::Image(out) => out,
        Sample::Tensor(_) => panic!("an image"),
    }
}

#[test]
fn center_crop_uses_pythons_rounding_and_pads_small_images() {
    let img = gradient(256, 256);
    assert_eq!(
        center_crop(&img, 224).get_pixel(0, 0),
        img.get_pixel(16, 16)
    );
    // (225 - 224) / 2 = 0.5 rounds to 0 in Python (half to even).
    let img = gradient(225, 225);
    assert_eq!(center_crop(&img, 224).get_pixel(0, 0), img.get_pixel(0, 0));
    // (227 - 224) / 2 = 1.5 rounds to 2.
    let img = gradient(227, 227);
    assert_eq!(center_crop(&img, 224).get_pixel(0, 0), img.get_pixel(2, 2));
    // Smaller than the crop: padded with black around the centred image.
    let out = center_crop(&RgbImage::from_pixel(2, 2, image::Rgb([9, 9, 9])), 4);
    assert_eq!(out.get_pixel(0, 0).0, [0, 0, 0]);
    assert_eq!(out.get_pixel(1, 1).0, [9, 9, 9]);
}

#[test]
fn to_tensor_then_normalize_gives_chw_floats() {
    let img = RgbImage::from_fn(2, 1, |x, _| {
        if x == 0 {
            image::Rgb([255, 0, 51])
        } else {
            image::Rgb([0, 255, 102])
        }
    });
    let pipeline = Compose::new()
        .then(ToTensor)
        .then(Normalize::new([0.5, 0.5, 0.5], [0.5, 0.25, 0.1]));
    let Sample::Tensor(t) = pipeline
        .apply(Sample::Image(img), &mut ChaCha8Rng::seed_from_u64(0))
        .unwrap()
    else {
        panic!()
    };
    assert_eq!((t.height, t.width), (1, 2));
    let expect = [1.0, -1.0, -2.0, 2.0, (0.2 - 0.5) / 0.1, (0.4 - 0.5) / 0.1];
    // Exact values against three float32 roundings (x / 255, - mean, / std): at most about
    // 13 u = 8e-7 where std is 0.1; a swapped channel or mean is off by 0.5 or more.
    for (a, b) in t.data.iter().zip(expect) {
        assert!((a - b).abs() < 1e-5, "{:?}", t.data);
    }
}

#[test]
fn flip_probability_is_respected_and_flips_rows() {
    let img = gradient(5, 2);
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let Sample::Image(out) = RandomHorizontalFlip::new(1.0)
        .apply(Sample::Image(img.clone()), &mut rng)
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(out.get_pixel(0, 1), img.get_pixel(4, 1));
    let Sample::Image(out) = RandomHorizontalFlip::new(0.0)
        .apply(Sample::Image(img.clone()), &mut rng)
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(out, img);
    let flips = (0..1000)
        .filter(|_| {
            let Sample::Image(o) = RandomHorizontalFlip::new(0.5)
                .apply(Sample::Image(img.clone()), &mut rng)
                .unwrap()
            else {
                panic!()
            };
            o != img
        })
        .count();
    assert!((430..570).contains(&flips), "{flips}");
}

#[test]
fn transforms_in_the_wrong_order_say_how_to_fix_it() {
    let pipeline = Compose::new().then(ToTensor).then(CenterCrop::new(2));
    let err = pipeline
        .apply(
            Sample::Image(gradient(4, 4)),
            &mut ChaCha8Rng::seed_from_u64(0),
        )
        .unwrap_err();
    assert!(err.to_string().contains("put it before ToTensor"), "{err}");
    let err = Normalize::imagenet()
        .apply(
            Sample::Image(gradient(4, 4)),
            &mut ChaCha8Rng::seed_from_u64(0),
        )
        .unwrap_err();
    assert!(err.to_string().contains("put ToTensor before it"), "{err}");
}
