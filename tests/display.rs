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
    let png = d2l::show_images(&imgs, 2, 8, None, 1.4).unwrap();
    assert_eq!(png.size(), (1120, 280));
    let grid = decode(&png);
    // Cell (row 1, col 7) holds image 15 at its centre; corners of cells stay white.
    assert_eq!(grid.get_pixel(7 * 140 + 70, 140 + 70).0, [225, 80, 200]);
    assert_eq!(grid.get_pixel(1, 1).0, [255, 255, 255]);
    let err = d2l::show_images(&imgs, 2, 7, None, 1.4)
        .unwrap_err()
        .to_string();
    assert!(err.contains("16 images do not fit a 2 x 7 grid"), "{err}");
}

fn count(
    img: &image::RgbImage,
    rect: (u32, u32, u32, u32),
    pred: impl Fn([u8; 3]) -> bool,
) -> usize {
    let (x0, y0, x1, y1) = rect;
    (y0..y1)
        .flat_map(|y| (x0..x1).map(move |x| (x, y)))
        .filter(|&(x, y)| pred(img.get_pixel(x, y).0))
        .count()
}

fn dark(p: [u8; 3]) -> bool {
    p.iter().all(|&c| c < 90)
}

#[test]
fn show_images_draws_titles_above_the_images_with_the_embedded_font() {
    let imgs: Vec<image::RgbImage> = (0..4u32)
        .map(|k| image::RgbImage::from_pixel(60 + 20 * k, 80, image::Rgb([40, 160, 40])))
        .collect();
    let titles: Vec<String> = ["hotdog / hotdog", "not-hotdog / hotdog", "a", "b"]
        .map(String::from)
        .to_vec();
    let png = d2l::show_images(&imgs, 1, 4, Some(&titles), 1.4).unwrap();
    assert_eq!(png.size(), (560, 140));
    let grid = decode(&png);
    // Black text in the title band of the first cell, none below it over the image's green.
    let title_band = count(&grid, (0, 0, 140, 22), dark);
    assert!(
        title_band > 40,
        "only {title_band} dark pixels in the title band"
    );
    assert_eq!(count(&grid, (0, 40, 140, 140), dark), 0);
    // The image moved down to make room and is still centred in the rest of its cell.
    assert_eq!(grid.get_pixel(70, 90).0, [40, 160, 40]);
    let err = d2l::show_images(&imgs, 1, 4, Some(&titles[..3]), 1.4)
        .unwrap_err()
        .to_string();
    assert!(err.contains("3 titles for 4 images"), "{err}");
}

fn chapter_animator() -> d2l::Animator {
    let mut animator = d2l::Animator::new()
        .xlabel("epoch")
        .xlim(1.0, 5.0)
        .ylim(0.0, 1.0)
        .legend(&["train loss", "train acc", "test acc"]);
    for i in 1..=25 {
        let x = i as f64 / 5.0;
        animator.add(x, &[Some(0.9 / x), Some(1.0 - 0.3 / x), None]);
        if i % 5 == 0 {
            animator.add(x, &[None, None, Some(0.8 + 0.02 * x)]);
        }
    }
    animator
}

#[test]
fn animator_draws_the_chapters_curves_to_png_and_svg_of_the_expected_size() {
    let animator = chapter_animator();
    assert_eq!(animator.lines().len(), 3);
    assert_eq!(animator.lines()[2].len(), 5);
    let png = animator.to_png().unwrap();
    assert_eq!(png.size(), (525, 375)); // 3.5 x 2.5 inches at 150 dpi
    let img = decode(&png);
    let all = (0, 0, 525, 375);
    // Each line in its colour: matplotlib's C0 blue, magenta, green.
    let near = |c: [u8; 3]| move |p: [u8; 3]| p.iter().zip(c).all(|(&a, b)| a.abs_diff(b) < 40);
    for (name, colour) in [
        ("blue", [0x1f, 0x77, 0xb4]),
        ("magenta", [191, 0, 191]),
        ("green", [0, 128, 0]),
    ] {
        let n = count(&img, all, near(colour));
        assert!(n > 150, "{name} line: {n} pixels");
    }
    // Text (tick labels, "epoch", the legend) renders without system fonts: dark pixels below
    // the plot area and inside the legend box.
    let text = |p: [u8; 3]| p.iter().all(|&c| c < 128);
    let xlabel = count(&img, (200, 345, 325, 375), text); // "epoch"
    let legend = count(&img, (430, 255, 520, 325), text);
    assert!(
        xlabel > 60 && legend > 150,
        "text pixels: xlabel {xlabel}, legend {legend}"
    );
    let dpi72 = animator.to_png_dpi(72.0).unwrap();
    assert_eq!(dpi72.size(), (252, 180));

    let svg = animator.to_svg().unwrap();
    assert!(
        svg.starts_with("<svg") && svg.contains(r#"width="350" height="250""#),
        "{}",
        &svg[..200]
    );
    for text in ["epoch", "train loss", "train acc", "test acc", "0.2", "1.0"] {
        assert!(svg.contains(text), "{text:?} missing from the SVG");
    }
}

#[test]
fn animator_rejects_bad_formats_and_limits_with_clear_errors() {
    let mut a = d2l::Animator::new().fmts(&["-", "q--"]);
    a.add(1.0, &[Some(0.1), Some(0.2)]);
    let err = a.to_png().unwrap_err().to_string();
    assert!(err.contains("\"q--\"") && err.contains("bgrcmyk"), "{err}");
    let err = d2l::Animator::new()
        .xlim(2.0, 2.0)
        .to_svg()
        .unwrap_err()
        .to_string();
    assert!(err.contains("[2, 2]"), "{err}");
    let err = chapter_animator()
        .save("curves.jpg")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("curves.jpg") && err.contains(".svg or .png"),
        "{err}"
    );
    // No data and no limits still draws an empty frame.
    assert_eq!(d2l::Animator::new().to_png().unwrap().size(), (525, 375));
}

#[test]
fn figures_outside_a_notebook_are_saved_whole_and_their_place_printed() {
    let dir = tempfile::tempdir().unwrap();
    d2l::set_figures_dir(dir.path().join("figs"));
    let path = chapter_animator().show("train").unwrap().unwrap();
    assert_eq!(path, dir.path().join("figs/train.png"));
    assert_eq!(
        decode(&d2l::Png::from_rgb(1, 1, &[0, 0, 0]).unwrap()).dimensions(),
        (1, 1)
    );
    let png = image::open(&path).unwrap();
    assert_eq!((png.width(), png.height()), (525, 375));
    let svg = std::fs::read_to_string(dir.path().join("figs/train.svg")).unwrap();
    assert!(svg.contains("test acc"));
    let grid = d2l::show_images(&[image::RgbImage::new(4, 4)], 1, 1, None, 1.0).unwrap();
    let saved = grid.show("grid").unwrap().unwrap();
    assert_eq!(image::open(saved).unwrap().width(), 100);
    // Only whole files: no temporary file is left next to them.
    let names: Vec<String> = std::fs::read_dir(dir.path().join("figs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.ends_with(".part")), "{names:?}");
    assert_eq!(names.len(), 3, "{names:?}");
    // Visual check of the look, kept in target/ for anyone who wants to see it.
    let out = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    chapter_animator().save(out.join("animator.png")).unwrap();
}

#[test]
fn animator_log_axis_and_legend_corner_refuse_what_matplotlib_refuses() {
    assert!(d2l::Animator::new().xscale("cubic").is_err());
    assert!(d2l::Animator::new().legend_loc("middle").is_err());
    // A log axis cannot start at 0; points at x <= 0 are left out, the rest drawn.
    let zero = d2l::Animator::new().xscale("log").unwrap().xlim(0.0, 1.0);
    assert!(zero.to_png().is_err());
    let mut log = d2l::Animator::new()
        .xscale("log")
        .unwrap()
        .legend_loc("upper left")
        .unwrap();
    for x in [0.0, 1e-6, 1e-4, 1e-2, 1.0] {
        log.add(x, &[Some(x.max(1e-9).log10().abs())]);
    }
    assert_eq!(log.to_png().unwrap().size(), (525, 375));
    assert!(log.to_svg().unwrap().contains("1e-4"));
}
