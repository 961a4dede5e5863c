//! Archive bombs are refused with the default bounds, before they fill the disk, and nothing of
//! them is kept: a ratio bomb, a bomb whose header lies about its size, entries sharing their
//! data, nested archives, a file-count bomb, the same for tar.gz; genuine archives of JPEGs pass.
mod common;

use std::io::Write;
use std::path::Path;

use common::{all_files_below, files_below, is_lock_file};
use d2l::data::{extract_with, ExtractLimits};

const MIB: u64 = 1 << 20;

/// Writes a zip whose entries are `(name, bytes of zeros)`, deflated, streamed in 1 MiB pieces.
fn zip_of_zeros(path: &Path, entries: &[(&str, u64)]) {
    let mut zip = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated)
        .large_file(true);
    let zeros = vec![0u8; MIB as usize];
    for (name, size) in entries {
        zip.start_file(*name, opts).unwrap();
        let mut left = *size;
        while left > 0 {
            let n = left.min(MIB);
            zip.write_all(&zeros[..n as usize]).unwrap();
            left -= n;
        }
    }
    zip.finish().unwrap();
}

/// A tar.gz of `(name, bytes of zeros)` entries.
fn tar_gz_of_zeros(path: &Path, entries: &[(&str, u64)]) {
    let gz =
        flate2::write::GzEncoder::new(std::fs::File::create(path).unwrap(), Default::default());
    let mut tar = tar::Builder::new(gz);
    for (name, size) in entries {
        let mut header = tar::Header::new_gnu();
        header.set_size(*size);
        header.set_mode(0o644);
        header.set_cksum();
        tar.append_data(&mut header, name, std::io::repeat(0).take_bytes(*size))
            .unwrap();
    }
    tar.into_inner().unwrap().finish().unwrap();
}

trait TakeBytes: std::io::Read + Sized {
    fn take_bytes(self, n: u64) -> std::io::Take<Self> {
        self.take(n)
    }
}
impl<R: std::io::Read> TakeBytes for R {}

/// What is in `dir` besides `keep` and the lock files: must be nothing after a refusal.
fn leftovers(dir: &Path, keep: &str) -> Vec<String> {
    all_files_below(dir)
        .into_iter()
        .filter(|f| f != keep && !is_lock_file(f))
        .chain(
            std::fs::read_dir(dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|f| f != keep && !is_lock_file(f)),
        )
        .collect()
}

fn refused(result: d2l::Result<std::path::PathBuf>) -> (String, Option<&'static str>) {
    match result {
        Err(e @ d2l::Error::ExtractLimit { .. }) => {
            let setting = match &e {
                d2l::Error::ExtractLimit { setting, .. } => *setting,
                _ => None,
            };
            (e.to_string(), setting)
        }
        other => panic!("expected an ExtractLimit error, got {other:?}"),
    }
}

#[test]
fn a_ratio_bomb_is_refused_by_default_and_a_second_call_refuses_again() {
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("hotdog.zip");
    // The bomb: about 1 MiB holding a 1 GiB entry with a photo's name.
    zip_of_zeros(&archive, &[("hotdog/train/hotdog/0.jpg", 1 << 30)]);
    let packed = std::fs::metadata(&archive).unwrap().len();
    assert!(packed < 2 * MIB, "{packed}");
    for _ in 0..2 {
        let (err, setting) = refused(extract_with(&archive, ExtractLimits::default()));
        assert_eq!(setting, Some("D2L_MAX_EXTRACT_RATIO"), "{err}");
        assert!(
            err.contains("\"hotdog/train/hotdog/0.jpg\"")
                && err.contains("to 1073741824")
                && err.contains("more than 100x")
                && err.contains("nothing was kept"),
            "{err}"
        );
        assert!(leftovers(dir.path(), "hotdog.zip").is_empty());
    }
}

#[test]
fn many_small_entries_of_zeros_are_refused_by_the_whole_archives_ratio() {
    // Each entry is under the per-entry grace (1 MiB), together 96 MiB from about 100 KiB.
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("spread.zip");
    let names: Vec<String> = (0..96).map(|i| format!("spread/{i}.jpg")).collect();
    let entries: Vec<(&str, u64)> = names.iter().map(|n| (n.as_str(), MIB)).collect();
    zip_of_zeros(&archive, &entries);
    let (err, setting) = refused(extract_with(&archive, ExtractLimits::default()));
    assert_eq!(setting, Some("D2L_MAX_EXTRACT_RATIO"), "{err}");
    assert!(err.contains("declare 100663296 bytes in all"), "{err}");
    assert!(leftovers(dir.path(), "spread.zip").is_empty());
}

/// Rewrites the uncompressed size of every entry, in the local headers and the central
/// directory, to `size`: the archive then lies about how much its entries hold.
fn lie_about_sizes(zip: &mut [u8], size: u32) {
    let mut patched = 0;
    for i in 0..zip.len().saturating_sub(30) {
        let sig = u32::from_le_bytes(zip[i..i + 4].try_into().unwrap());
        let at = match sig {
            0x0403_4b50 => i + 22,
            0x0201_4b50 => i + 24,
            _ => continue,
        };
        zip[at..at + 4].copy_from_slice(&size.to_le_bytes());
        patched += 1;
    }
    assert_eq!(patched, 2, "one local header and one central entry");
}

#[test]
fn a_bomb_whose_header_lies_about_its_size_is_refused_while_it_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("liar.zip");
    zip_of_zeros(&archive, &[("liar/photo.jpg", 64 * MIB)]);
    let mut bytes = std::fs::read(&archive).unwrap();
    // It says 1000 bytes: under every bound checked from the directory.
    lie_about_sizes(&mut bytes, 1000);
    std::fs::write(&archive, &bytes).unwrap();
    let err = extract_with(&archive, ExtractLimits::default()).unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, d2l::Error::ExtractLimit { setting: None, .. })
            && text.contains("\"liar/photo.jpg\"")
            && text.contains("more than the 1000 bytes its header declares"),
        "{text}"
    );
    assert!(leftovers(dir.path(), "liar.zip").is_empty());
}

#[test]
fn nested_archives_are_written_as_files_and_never_opened() {
    let dir = tempfile::tempdir().unwrap();
    let inner = dir.path().join("inner.zip");
    zip_of_zeros(&inner, &[("inner/big.jpg", 1 << 30)]);
    let inner_bytes = std::fs::read(&inner).unwrap();
    let inner_tgz = dir.path().join("inner.tar.gz");
    tar_gz_of_zeros(&inner_tgz, &[("big.jpg", 256 * MIB)]);
    let tgz_bytes = std::fs::read(&inner_tgz).unwrap();
    let outer = dir.path().join("outer.zip");
    std::fs::write(
        &outer,
        common::zip_bytes(&[
            ("outer/inner.zip", &inner_bytes),
            ("outer/deeper/inner.tar.gz", &tgz_bytes),
        ]),
    )
    .unwrap();
    let out = extract_with(&outer, ExtractLimits::default()).unwrap();
    assert_eq!(files_below(&out), ["deeper/inner.tar.gz", "inner.zip"]);
    assert_eq!(std::fs::read(out.join("inner.zip")).unwrap(), inner_bytes);
    assert_eq!(
        std::fs::read(out.join("deeper/inner.tar.gz")).unwrap(),
        tgz_bytes
    );
}

#[test]
fn a_file_count_bomb_is_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("many.zip");
    let names: Vec<String> = (0..2001).map(|i| format!("many/{i}")).collect();
    let entries: Vec<(&str, u64)> = names.iter().map(|n| (n.as_str(), 0)).collect();
    zip_of_zeros(&archive, &entries);
    let limits = ExtractLimits {
        max_files: 2000,
        ..ExtractLimits::default()
    };
    let (err, setting) = refused(extract_with(&archive, limits));
    assert_eq!(setting, Some("D2L_MAX_EXTRACT_FILES"), "{err}");
    assert!(err.contains("2001 entries, more than 2000"), "{err}");
    assert!(leftovers(dir.path(), "many.zip").is_empty());
    // The same archive within the bound extracts.
    let out = extract_with(
        &archive,
        ExtractLimits {
            max_files: 2001,
            ..limits
        },
    )
    .unwrap();
    assert_eq!(files_below(&out).len(), 2001);
}

#[test]
fn the_default_file_count_bound_refuses_a_million_and_one_empty_entries() {
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("million.zip");
    let names: Vec<String> = (0..1_000_001).map(|i| format!("m/{i}")).collect();
    let entries: Vec<(&str, u64)> = names.iter().map(|n| (n.as_str(), 0)).collect();
    // Streamed (no seeking back after each entry): a million entries in a second or so.
    let mut zip = zip::ZipWriter::new_stream(std::io::BufWriter::new(
        std::fs::File::create(&archive).unwrap(),
    ));
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, _) in &entries {
        zip.start_file(*name, opts).unwrap();
    }
    zip.finish().unwrap().into_inner().flush().unwrap();
    let (err, setting) = refused(extract_with(&archive, ExtractLimits::default()));
    assert_eq!(setting, Some("D2L_MAX_EXTRACT_FILES"), "{err}");
    assert!(err.contains("1000001 entries, more than 1000000"), "{err}");
    assert!(leftovers(dir.path(), "million.zip").is_empty());
}

#[test]
fn tar_gz_bombs_are_refused_the_same_way() {
    let dir = tempfile::tempdir().unwrap();
    // Ratio: 256 MiB of zeros from about 256 KiB, refused from its header, before writing.
    let bomb = dir.path().join("bomb.tar.gz");
    tar_gz_of_zeros(&bomb, &[("bomb/a.jpg", 256 * MIB)]);
    let (err, setting) = refused(extract_with(&bomb, ExtractLimits::default()));
    assert_eq!(setting, Some("D2L_MAX_EXTRACT_RATIO"), "{err}");
    assert!(
        err.contains("\"bomb/a.jpg\"") && err.contains("expands past 100x"),
        "{err}"
    );

    // Spread over many entries under any per-entry check: the running total stops it.
    let spread = dir.path().join("spread.tar.gz");
    let names: Vec<String> = (0..100).map(|i| format!("spread/{i}.jpg")).collect();
    let entries: Vec<(&str, u64)> = names.iter().map(|n| (n.as_str(), MIB)).collect();
    tar_gz_of_zeros(&spread, &entries);
    let (err, _) = refused(extract_with(&spread, ExtractLimits::default()));
    assert!(err.contains("expands past 100x"), "{err}");

    // Count.
    let many = dir.path().join("many.tar.gz");
    let names: Vec<String> = (0..101).map(|i| format!("many/{i}")).collect();
    let entries: Vec<(&str, u64)> = names.iter().map(|n| (n.as_str(), 0)).collect();
    tar_gz_of_zeros(&many, &entries);
    let limits = ExtractLimits {
        max_files: 100,
        ..ExtractLimits::default()
    };
    let (err, setting) = refused(extract_with(&many, limits));
    assert_eq!(setting, Some("D2L_MAX_EXTRACT_FILES"), "{err}");

    // Total bytes.
    let big = dir.path().join("big.tar.gz");
    tar_gz_of_zeros(&big, &[("big/a", 3 * MIB)]);
    let limits = ExtractLimits {
        max_bytes: 2 * MIB,
        ..ExtractLimits::default()
    };
    let (err, setting) = refused(extract_with(&big, limits));
    assert_eq!(setting, Some("D2L_MAX_EXTRACT_BYTES"), "{err}");

    // gzip's trailer lying about the expanded size changes nothing: the bounds hold as the
    // bytes come.
    let mut bytes = std::fs::read(&bomb).unwrap();
    let n = bytes.len();
    bytes[n - 4..].copy_from_slice(&10u32.to_le_bytes());
    let liar = dir.path().join("liar.tar.gz");
    std::fs::write(&liar, bytes).unwrap();
    let (err, _) = refused(extract_with(&liar, ExtractLimits::default()));
    assert!(err.contains("expands past 100x"), "{err}");

    let keep = [
        "bomb.tar.gz",
        "spread.tar.gz",
        "many.tar.gz",
        "big.tar.gz",
        "liar.tar.gz",
    ];
    let left: Vec<String> = all_files_below(dir.path())
        .into_iter()
        .filter(|f| !keep.contains(&f.as_str()) && !is_lock_file(f))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn a_tar_header_that_understates_its_data_writes_no_more_than_it_declares() {
    // A tar entry is exactly its header's size long: the bytes past it are read as the next
    // header, so an understating header cannot make an entry larger than it says.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("short.tar.gz");
    let mut tar = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(1000);
    header.set_mode(0o644);
    header.set_cksum();
    tar.append_data(&mut header, "short/a.jpg", &[7u8; 1000][..])
        .unwrap();
    let mut raw = tar.into_inner().unwrap();
    // 64 KiB of extra data (zeros: read as the end of the archive) after the entry.
    raw.splice(1536..1536, std::iter::repeat_n(0u8, 64 << 10));
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), Default::default());
    gz.write_all(&raw).unwrap();
    std::fs::write(&path, gz.finish().unwrap()).unwrap();
    let out = extract_with(&path, ExtractLimits::default()).unwrap();
    assert_eq!(std::fs::read(out.join("a.jpg")).unwrap(), vec![7u8; 1000]);
}

#[test]
fn a_genuine_archive_of_jpegs_is_far_inside_the_bounds() {
    // Photos barely compress: a deflated zip of the generated hotdog-like JPEGs expands ~1x.
    let dir = tempfile::tempdir().unwrap();
    let cfg = d2l::data::synthetic::HotdogConfig {
        train_per_class: 6,
        test_per_class: 2,
        min_side: 48,
        max_side: 96,
        seed: 3,
    };
    let set = d2l::data::synthetic::make_hotdog_dataset(dir.path().join("made"), &cfg).unwrap();
    let archive = dir.path().join("hotdog.zip");
    let mut zip = zip::ZipWriter::new(std::fs::File::create(&archive).unwrap());
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    let mut raw = 0u64;
    for rel in files_below(&set) {
        let bytes = std::fs::read(set.join(&rel)).unwrap();
        raw += bytes.len() as u64;
        zip.start_file(format!("hotdog/{rel}"), opts).unwrap();
        zip.write_all(&bytes).unwrap();
    }
    zip.finish().unwrap();
    let packed = std::fs::metadata(&archive).unwrap().len();
    let ratio = raw as f64 / packed as f64;
    assert!(ratio < 1.5, "JPEGs expand {ratio:.2}x");
    let out = extract_with(&archive, ExtractLimits::default()).unwrap();
    assert_eq!(files_below(&out), files_below(&set));
}

#[test]
fn the_bounds_come_from_the_environment_and_a_bad_value_is_named() {
    // The only test in this binary that sets these variables; the others pass their bounds.
    std::env::set_var("D2L_MAX_EXTRACT_BYTES", "64MiB");
    std::env::set_var("D2L_MAX_EXTRACT_RATIO", "20");
    std::env::set_var("D2L_MAX_EXTRACT_FILES", "5000");
    let limits = ExtractLimits::from_env().unwrap();
    assert_eq!(
        limits,
        ExtractLimits {
            max_bytes: 64 * MIB,
            max_ratio: 20.0,
            max_files: 5000
        }
    );
    std::env::set_var("D2L_MAX_EXTRACT_RATIO", "lots");
    let err = ExtractLimits::from_env().unwrap_err().to_string();
    assert!(
        err.contains("D2L_MAX_EXTRACT_RATIO") && err.contains("\"lots\""),
        "{err}"
    );
    for var in [
        "D2L_MAX_EXTRACT_BYTES",
        "D2L_MAX_EXTRACT_RATIO",
        "D2L_MAX_EXTRACT_FILES",
    ] {
        std::env::set_var(var, "");
    }
    assert_eq!(ExtractLimits::from_env().unwrap(), ExtractLimits::default());
    assert_eq!(
        ExtractLimits::default(),
        ExtractLimits {
            max_bytes: 4 << 30,
            max_ratio: 100.0,
            max_files: 1_000_000
        }
    );
}
