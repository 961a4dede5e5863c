//! ImageFolder with torchvision's semantics, on fixture trees made in temp dirs.
use std::path::Path;

use d2l::data::ImageFolder;

fn write_image(path: &Path, w: u32, h: u32, rgb: [u8; 3]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let img = image::RgbImage::from_pixel(w, h, image::Rgb(rgb));
    let format = image::ImageFormat::from_path(path).unwrap_or(image::ImageFormat::Png);
    img.save_with_format(path, format).unwrap();
}

fn names(folder: &ImageFolder) -> Vec<(String, i64)> {
    folder
        .samples()
        .iter()
        .map(|(p, l)| {
            (
                p.strip_prefix(folder.root())
                    .unwrap()
                    .to_string_lossy()
                    .into_owned(),
                *l,
            )
        })
        .collect()
}

#[test]
fn classes_are_sorted_folders_and_files_are_walked_in_torchvision_order() {
    let dir = tempfile::tempdir().unwrap();
    let r = dir.path();
    write_image(&r.join("not-hotdog/b.png"), 4, 3, [0, 0, 255]);
    write_image(&r.join("hotdog/a.jpg"), 5, 5, [255, 0, 0]);
    write_image(&r.join("hotdog/B.JPG"), 5, 5, [255, 0, 0]);
    write_image(&r.join("hotdog/sub/c.png"), 2, 2, [1, 2, 3]);
    std::fs::write(r.join("hotdog/notes.txt"), "not an image").unwrap();
    std::fs::write(r.join("hotdog/.DS_Store"), "junk").unwrap();

    let folder = ImageFolder::new(r).unwrap();
    assert_eq!(folder.classes(), ["hotdog", "not-hotdog"]);
    assert_eq!(folder.class_to_idx()["not-hotdog"], 1);
    assert_eq!(
        names(&folder),
        [
            ("hotdog/B.JPG".to_owned(), 0),
            ("hotdog/a.jpg".to_owned(), 0),
            ("hotdog/sub/c.png".to_owned(), 0),
            ("not-hotdog/b.png".to_owned(), 1),
        ]
    );
    let (img, label) = folder.get(3).unwrap();
    assert_eq!((img.width(), img.height(), label), (4, 3, 1));
    assert_eq!(img.get_pixel(0, 0).0, [0, 0, 255]);
    // train_data[-1] is the last sample, train_data[-2] the one before.
    assert_eq!(folder.get_rev(0).unwrap().0.dimensions(), (4, 3));
    assert_eq!(folder.get_rev(1).unwrap().0.dimensions(), (2, 2));
    assert!(folder
        .get_rev(4)
        .unwrap_err()
        .to_string()
        .contains("-5 is out of range for 4"));
    assert!(folder
        .get(4)
        .unwrap_err()
        .to_string()
        .contains("index 4 is out of range for 4"));
}

#[test]
fn every_torchvision_extension_is_read_and_converted_to_rgb() {
    let dir = tempfile::tempdir().unwrap();
    for ext in ["png", "jpeg", "bmp", "tif", "tiff", "webp", "ppm"] {
        write_image(
            &dir.path().join(format!("c/img.{ext}")),
            3,
            2,
            [10, 200, 30],
        );
    }
    // A grey PGM and an RGBA PNG become RGB.
    let grey = image::GrayImage::from_pixel(3, 2, image::Luma([77]));
    grey.save(dir.path().join("c/grey.pgm")).unwrap();
    let rgba = image::RgbaImage::from_pixel(3, 2, image::Rgba([1, 2, 3, 4]));
    rgba.save(dir.path().join("c/alpha.png")).unwrap();

    let folder = ImageFolder::new(dir.path()).unwrap();
    assert_eq!(folder.len(), 9);
    for i in 0..folder.len() {
        let (img, _) = folder.get(i).unwrap();
        assert_eq!(img.dimensions(), (3, 2), "{:?}", folder.samples()[i].0);
    }
    let grey_index = folder
        .samples()
        .iter()
        .position(|(p, _)| p.ends_with("grey.pgm"))
        .unwrap();
    assert_eq!(
        folder.get(grey_index).unwrap().0.get_pixel(0, 0).0,
        [77, 77, 77]
    );
}

#[test]
fn corrupt_and_empty_files_are_errors_naming_the_file_or_can_be_skipped() {
    let dir = tempfile::tempdir().unwrap();
    write_image(&dir.path().join("hotdog/good.png"), 2, 2, [1, 1, 1]);
    std::fs::write(
        dir.path().join("hotdog/broken.jpg"),
        b"\xff\xd8\xff\xe0 this is no jpeg",
    )
    .unwrap();
    std::fs::write(dir.path().join("hotdog/empty.jpg"), b"").unwrap();

    let folder = ImageFolder::new(dir.path()).unwrap();
    assert_eq!(folder.len(), 3);
    let broken = folder
        .samples()
        .iter()
        .position(|(p, _)| p.ends_with("broken.jpg"))
        .unwrap();
    let err = folder.get(broken).unwrap_err().to_string();
    assert!(
        err.contains("broken.jpg") && err.contains("cannot decode"),
        "{err}"
    );
    let empty = folder
        .samples()
        .iter()
        .position(|(p, _)| p.ends_with("empty.jpg"))
        .unwrap();
    assert!(folder
        .get(empty)
        .unwrap_err()
        .to_string()
        .contains("empty.jpg"));

    let kept = folder.skip_unreadable();
    assert_eq!(kept.len(), 1);
    assert_eq!(kept.skipped().len(), 2);
    assert!(kept.get(0).is_ok());
}

#[test]
fn folders_without_classes_or_images_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let err = ImageFolder::new(dir.path()).unwrap_err().to_string();
    assert!(err.contains("no class folders"), "{err}");

    std::fs::create_dir(dir.path().join("hotdog")).unwrap();
    write_image(&dir.path().join("not-hotdog/a.png"), 1, 1, [0, 0, 0]);
    std::fs::write(dir.path().join("hotdog/readme.md"), "x").unwrap();
    let err = ImageFolder::new(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("[\"hotdog\"]") && err.contains(".jpg"),
        "{err}"
    );

    let err = ImageFolder::new(dir.path().join("missing"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing"), "{err}");
}

/// A one-row 16-bit PNG of `values` in `channels` channels (alpha, where there is one, full).
fn png16(values: &[u16], channels: u8) -> Vec<u8> {
    use image::{ImageBuffer, Luma, LumaA, Rgb, Rgba};
    let w = values.len() as u32;
    let mut bytes = std::io::Cursor::new(Vec::new());
    let fmt = image::ImageFormat::Png;
    match channels {
        1 => ImageBuffer::<Luma<u16>, _>::from_fn(w, 1, |x, _| Luma([values[x as usize]]))
            .write_to(&mut bytes, fmt),
        2 => ImageBuffer::<LumaA<u16>, _>::from_fn(w, 1, |x, _| LumaA([values[x as usize], 65535]))
            .write_to(&mut bytes, fmt),
        3 => ImageBuffer::<Rgb<u16>, _>::from_fn(w, 1, |x, _| Rgb([values[x as usize]; 3]))
            .write_to(&mut bytes, fmt),
        _ => ImageBuffer::<Rgba<u16>, _>::from_fn(w, 1, |x, _| {
            let v = values[x as usize];
            Rgba([v, v, v, 65535])
        })
        .write_to(&mut bytes, fmt),
    }
    .unwrap();
    bytes.into_inner()
}

#[test]
fn sixteen_bit_pngs_decode_to_what_pil_gives_torchvision() {
    // What Pillow 13.0.0's Image.open(png).convert('RGB') gives for these 16-bit values,
    // measured: grayscale clips at 255, the other colour types keep the high byte.
    let values = [0u16, 255, 256, 1000, 30000, 65535];
    let want_gray = [0u8, 255, 255, 255, 255, 255];
    let want_high = [0u8, 0, 1, 3, 117, 255];
    for (channels, want) in [
        (1, want_gray),
        (2, want_high),
        (3, want_high),
        (4, want_high),
    ] {
        let img = d2l::data::decode_rgb(&png16(&values, channels)).unwrap();
        let got: Vec<[u8; 3]> = img.pixels().map(|p| p.0).collect();
        let want: Vec<[u8; 3]> = want.iter().map(|&v| [v; 3]).collect();
        assert_eq!(got, want, "{channels} channels");
    }
}
