//! `download_extract("hotdog")` end to end through a mirror on 127.0.0.1 (its own test binary,
//! since it sets process-wide environment variables).
mod common;

use common::{files_below, sha1_hex, zip_bytes, Reply, Server};

#[test]
fn download_extract_uses_data_hub_the_mirror_and_the_data_dir() {
    let server = Server::start();
    let body = zip_bytes(&[
        ("hotdog/train/hotdog/0.jpg", b"x"),
        ("hotdog/test/not-hotdog/1.jpg", b"y"),
    ]);
    server.route("hotdog.zip", Reply::Body(body.clone()));
    let dir = tempfile::tempdir().unwrap();
    std::env::set_var("D2L_DATA_URL", &server.base);
    std::env::set_var("D2L_DATA_DIR", dir.path());

    let builtin = d2l::DATA_HUB.get("hotdog").unwrap();
    assert_eq!(
        builtin.0,
        "http://d2l-data.s3-accelerate.amazonaws.com/hotdog.zip"
    );
    assert_eq!(builtin.1, "fba480ffa8aa7e0febbb511d181409f899b9baa5");

    // The book's line, with the hash of the archive this server holds.
    d2l::DATA_HUB.insert(
        "hotdog",
        format!("{}hotdog.zip", d2l::DATA_URL),
        sha1_hex(&body),
    );
    let data_dir = d2l::download_extract("hotdog").unwrap();
    assert_eq!(data_dir, dir.path().join("hotdog"));
    assert_eq!(
        files_below(&data_dir),
        ["test/not-hotdog/1.jpg", "train/hotdog/0.jpg"]
    );
    d2l::download_extract("hotdog").unwrap();
    assert_eq!(server.hits("hotdog.zip"), 1);

    let err = d2l::download("hotdogs").unwrap_err().to_string();
    assert!(
        err.contains("\"hotdogs\" is not in DATA_HUB") && err.contains("hotdog"),
        "{err}"
    );
    assert_eq!(d2l::data::mirrored(&builtin.0), server.url("hotdog.zip"));
}
