//! Images from tensors: PNG encoding, saving, and the evcxr display protocol.
use d2l::tch::{Device, Kind, Tensor};

fn decode(png: &d2l::Png) -> image::RgbImage {
    image::load_from_memory_with_format(png.bytes(), image::ImageFormat::Png)
        .expect("valid PNG")
        .to_rgb8()
}

#[test]
fn float_tensor_becomes_png_with_the_same_pixels() {
    let img = d2l::gradient_image(8, 16, Device::Cpu); // [3, 8, 16]
    let png = d2l::Png::from_tensor(&img).unwrap();
    assert_eq!(png.size(), (16, 8));
    let rgb = decode(&png);
    assert_eq!(rgb.dimensions(), (16, 8));
    assert_eq!(rgb.get_pixel(0, 0).0, [0, 0, 255]);
    assert_eq!(rgb.get_pixel(15, 7).0, [255, 255, 0]);
    // Rounded like (x * 255).round(): column 5 of 16 is 5/15.
    assert_eq!(rgb.get_pixel(5, 0).0, [85, 0, 170]);
}

#[test]
fn u8_and_grey_tensors_are_accepted_and_out_of_range_floats_clamped() {
    let grey = Tensor::from_slice(&[0u8, 128, 255, 7]).reshape([1, 2, 2]);
    let rgb = decode(&d2l::Png::from_tensor(&grey).unwrap());
    assert_eq!(rgb.get_pixel(1, 0).0, [128, 128, 128]);
    let wild = Tensor::from_slice(&[-3.0f32, 0.5, 9.0]).reshape([3, 1, 1]);
    let rgb = decode(&d2l::Png::from_tensor(&wild).unwrap());
    assert_eq!(rgb.get_pixel(0, 0).0, [0, 128, 255]);
}

#[test]
fn wrong_shapes_and_kinds_are_clear_errors() {
    let flat = Tensor::zeros([4, 4], (Kind::Float, Device::Cpu));
    let err = d2l::Png::from_tensor(&flat).unwrap_err().to_string();
    assert!(err.contains("[3, h, w]") && err.contains("[4, 4]"), "{err}");
    let bools = Tensor::zeros([3, 2, 2], (Kind::Bool, Device::Cpu));
    let err = d2l::Png::from_tensor(&bools).unwrap_err().to_string();
    assert!(err.contains("Bool"), "{err}");
    let err = d2l::Png::from_rgb(2, 2, &[0; 11]).unwrap_err().to_string();
    assert!(err.contains("12 bytes, got 11"), "{err}");
}

#[test]
fn save_creates_directories_and_names_the_path_on_error() {
    let dir = tempfile::tempdir().unwrap();
    let png = d2l::Png::from_rgb(1, 1, &[1, 2, 3]).unwrap();
    let path = dir.path().join("a/b/c.png");
    png.save(&path).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), png.bytes());
    let blocked = dir.path().join("a/b/c.png/d.png");
    let err = png.save(&blocked).unwrap_err().to_string();
    assert!(err.contains("c.png"), "{err}");
}

#[test]
fn show_images_makes_the_chapters_grid() {
    // 16 images of different sizes and aspect ratios, as the chapter shows.
    let imgs: Vec<image::RgbImage> = (0..16u32)
        .map(|k| {
            image::RgbImage::from_pixel(
                50 + 30 * (k % 5),
                40 + 25 * (k % 7),
                image::Rgb([(k * 15) as u8, 80, 200]),
            )
        })
        .collect();
    let png = d2l::show_images(&imgs, 2, 8, 1.4).unwrap();
    assert_eq!(png.size(), (1120, 280));
    let grid = decode(&png);
    // Cell (row 1, col 7) holds image 15 at its centre; corners of cells stay white.
    assert_eq!(grid.get_pixel(7 * 140 + 70, 140 + 70).0, [225, 80, 200]);
    assert_eq!(grid.get_pixel(1, 1).0, [255, 255, 255]);
    let err = d2l::show_images(&imgs, 2, 7, 1.4).unwrap_err().to_string();
    assert!(err.contains("16 images do not fit a 2 x 7 grid"), "{err}");
}
