//! download / fetch / extract against a server on 127.0.0.1: good files, cached reuse, bad
//! hashes, cut connections, unsafe and truncated archives. Nothing bad is ever left behind.
mod common;

use common::{files_below, sha1_hex, zip_bytes, Reply, Server};
use d2l::data::{extract, fetch, Checksum};

fn hotdog_zip() -> Vec<u8> {
    zip_bytes(&[
        ("hotdog/", b""),
        ("hotdog/train/hotdog/0.jpg", b"a hotdog"),
        ("hotdog/train/not-hotdog/0.jpg", b"a salad"),
        ("hotdog/test/hotdog/1.jpg", b"another hotdog"),
    ])
}

#[test]
fn good_download_is_kept_and_a_second_call_makes_no_request() {
    let server = Server::start();
    let body = hotdog_zip();
    server.route("hotdog.zip", Reply::Body(body.clone()));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hotdog.zip");
    let sum = Checksum::Sha1(sha1_hex(&body));

    fetch(&server.url("hotdog.zip"), &path, &sum).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), body);
    fetch(&server.url("hotdog.zip"), &path, &sum).unwrap();
    assert_eq!(
        server.hits("hotdog.zip"),
        1,
        "the cached file must be reused"
    );
    assert_eq!(files_below(dir.path()), ["hotdog.zip"]);
}

#[test]
fn hash_mismatch_is_an_error_with_both_hashes_and_nothing_is_left() {
    let server = Server::start();
    server.route("hotdog.zip", Reply::Body(b"not the archive".to_vec()));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hotdog.zip");
    let want = "fba480ffa8aa7e0febbb511d181409f899b9baa5";
    let err = fetch(
        &server.url("hotdog.zip"),
        &path,
        &Checksum::Sha1(want.into()),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains(want) && err.contains(&sha1_hex(b"not the archive")),
        "{err}"
    );
    assert!(err.contains(&server.url("hotdog.zip")), "{err}");
    assert!(
        files_below(dir.path()).is_empty(),
        "left behind: {:?}",
        files_below(dir.path())
    );
}

#[test]
fn stale_cached_file_is_replaced_only_by_a_good_download() {
    let server = Server::start();
    let body = hotdog_zip();
    server.route("hotdog.zip", Reply::Body(body.clone()));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hotdog.zip");
    std::fs::write(&path, b"an old, different file").unwrap();
    fetch(
        &server.url("hotdog.zip"),
        &path,
        &Checksum::Sha1(sha1_hex(&body)),
    )
    .unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), body);
}

#[test]
fn cut_connection_mid_body_is_an_error_and_nothing_is_left() {
    let server = Server::start();
    let body = vec![7u8; 200_000];
    server.route(
        "big.zip",
        Reply::Cut {
            body: body.clone(),
            sent: 50_000,
        },
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.zip");
    let err = fetch(
        &server.url("big.zip"),
        &path,
        &Checksum::Sha1(sha1_hex(&body)),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("big.zip"), "{err}");
    assert!(
        files_below(dir.path()).is_empty(),
        "left behind: {:?}",
        files_below(dir.path())
    );
}

#[test]
fn http_errors_name_the_url() {
    let server = Server::start();
    server.route("gone.zip", Reply::Status(404));
    let dir = tempfile::tempdir().unwrap();
    let err = fetch(
        &server.url("gone.zip"),
        &dir.path().join("gone.zip"),
        &Checksum::Sha1("00".into()),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("gone.zip") && err.contains("404"), "{err}");
    assert!(files_below(dir.path()).is_empty());
}

#[test]
fn sha256_prefix_checks_like_torch_hub() {
    let server = Server::start();
    server.route("w.pth", Reply::Body(b"weights".to_vec()));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.pth");
    use sha2::Digest;
    let full: String = sha2::Sha256::digest(b"weights")
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    fetch(
        &server.url("w.pth"),
        &path,
        &Checksum::Sha256Prefix(full[..8].into()),
    )
    .unwrap();
    let other = dir.path().join("x.pth");
    let err = fetch(
        &server.url("w.pth"),
        &other,
        &Checksum::Sha256Prefix("f37072fd".into()),
    )
    .unwrap_err();
    assert!(err.to_string().contains("f37072fd"), "{err}");
    assert!(!other.exists());
}

#[test]
fn zip_extracts_once_to_the_folder_named_like_it() {
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("hotdog.zip");
    std::fs::write(&archive, hotdog_zip()).unwrap();
    let out = extract(&archive).unwrap();
    assert_eq!(out, dir.path().join("hotdog"));
    assert_eq!(
        files_below(&out),
        [
            "test/hotdog/1.jpg",
            "train/hotdog/0.jpg",
            "train/not-hotdog/0.jpg"
        ]
    );
    // A second call does not extract again: a file changed since stays as it is.
    std::fs::write(out.join("train/hotdog/0.jpg"), b"edited").unwrap();
    extract(&archive).unwrap();
    assert_eq!(
        std::fs::read(out.join("train/hotdog/0.jpg")).unwrap(),
        b"edited"
    );
}

#[test]
fn zip_with_parent_dir_entry_is_refused_and_nothing_is_written_outside() {
    let dir = tempfile::tempdir().unwrap();
    let inner = dir.path().join("data");
    std::fs::create_dir(&inner).unwrap();
    let archive = inner.join("evil.zip");
    std::fs::write(
        &archive,
        zip_bytes(&[("evil/ok.txt", b"fine"), ("../escaped.txt", b"bad")]),
    )
    .unwrap();
    let err = extract(&archive).unwrap_err().to_string();
    assert!(
        err.contains("../escaped.txt") && err.contains("evil.zip"),
        "{err}"
    );
    assert!(!dir.path().join("escaped.txt").exists());
    assert_eq!(
        files_below(dir.path()),
        ["data/evil.zip"],
        "nothing extracted, no leftovers"
    );
}

#[test]
fn zip_with_absolute_entry_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("abs.zip");
    std::fs::write(&archive, zip_bytes(&[("/tmp/d2l-absolute.txt", b"bad")])).unwrap();
    let err = extract(&archive).unwrap_err().to_string();
    assert!(err.contains("refusing entry"), "{err}");
    assert!(!std::path::Path::new("/tmp/d2l-absolute.txt").exists());
}

#[test]
fn truncated_zip_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("hotdog.zip");
    let bytes = hotdog_zip();
    std::fs::write(&archive, &bytes[..bytes.len() / 2]).unwrap();
    let err = extract(&archive).unwrap_err().to_string();
    assert!(err.contains("hotdog.zip"), "{err}");
    assert_eq!(files_below(dir.path()), ["hotdog.zip"]);
}

#[test]
fn extraction_past_the_size_bound_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("bomb.zip");
    let zeros = vec![0u8; 1 << 20];
    std::fs::write(
        &archive,
        zip_bytes(&[("bomb/a", &zeros), ("bomb/b", &zeros)]),
    )
    .unwrap();
    // The bound is read from the environment; this test file's other tests don't extract this.
    std::env::set_var("D2L_MAX_EXTRACT_BYTES", "1500000");
    let result = extract(&archive);
    std::env::remove_var("D2L_MAX_EXTRACT_BYTES");
    let err = result.unwrap_err().to_string();
    assert!(
        err.contains("declare 2097152 bytes in all, more than 1500000")
            && err.contains("set D2L_MAX_EXTRACT_BYTES higher"),
        "{err}"
    );
    assert_eq!(files_below(dir.path()), ["bomb.zip"]);
}

#[test]
fn tar_gz_extracts_and_refuses_escaping_entries() {
    let dir = tempfile::tempdir().unwrap();
    let make = |name: &str, entries: &[(&str, &[u8])]| {
        let path = dir.path().join(name);
        let gz = flate2::write::GzEncoder::new(
            std::fs::File::create(&path).unwrap(),
            Default::default(),
        );
        let mut tar = tar::Builder::new(gz);
        for (entry, bytes) in entries {
            let mut header = tar::Header::new_gnu();
            header.set_size(bytes.len() as u64);
            header.set_mode(0o644);
            // set_path refuses `..`; write the raw name as a hostile archive would.
            let raw = &mut header.as_old_mut().name;
            raw[..entry.len()].copy_from_slice(entry.as_bytes());
            header.set_cksum();
            tar.append(&header, *bytes).unwrap();
        }
        tar.into_inner().unwrap().finish().unwrap();
        path
    };
    let good = make("set.tar.gz", &[("set/a.txt", b"a"), ("set/b/c.txt", b"c")]);
    let out = extract(&good).unwrap();
    assert_eq!(files_below(&out), ["a.txt", "b/c.txt"]);
    let evil = make("evil.tar.gz", &[("../../x.txt", b"x")]);
    let err = extract(&evil).unwrap_err().to_string();
    assert!(err.contains("../../x.txt"), "{err}");
}

#[test]
fn zip_with_symlink_pointing_out_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("links.zip");
    let mut buf = std::io::Cursor::new(Vec::new());
    {
        let mut zip = zip::ZipWriter::new(&mut buf);
        let opts = zip::write::SimpleFileOptions::default();
        zip.add_symlink("links/passwd", "/etc/passwd", opts)
            .unwrap();
        zip.finish().unwrap();
    }
    std::fs::write(&archive, buf.into_inner()).unwrap();
    let err = extract(&archive).unwrap_err().to_string();
    assert!(
        err.contains("links/passwd") && err.contains("outside the target folder"),
        "{err}"
    );
    assert_eq!(files_below(dir.path()), ["links.zip"]);
}

#[test]
fn error_messages_read_well() {
    let server = Server::start();
    server.route(
        "cut.zip",
        Reply::Cut {
            body: vec![1; 1000],
            sent: 10,
        },
    );
    let dir = tempfile::tempdir().unwrap();
    let err = fetch(
        &server.url("cut.zip"),
        &dir.path().join("cut.zip"),
        &Checksum::Sha1("ab".into()),
    )
    .unwrap_err();
    let text = err.to_string();
    assert!(
        text.starts_with(&format!("downloading {}: ", server.url("cut.zip"))),
        "{text}"
    );
    assert!(text.contains("10"), "{text}");
}
