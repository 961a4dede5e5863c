//! Processes sharing a cache at the same moment: 2, 4 and 8 real processes call
//! `download_extract("hotdog")`, the weights fetch and the offline source model's training on
//! one empty cache, against a slow server on 127.0.0.1. All succeed, the cache holds one good
//! copy, one process did the work (one request, one training) and no temporary is left.
mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{
    child, child_role, files_below, sha1_hex, temporaries_below, wait_child, zip_bytes, ChildRun,
    Reply, Server,
};

#[test]
fn child_process() {
    child_role();
}

fn run_all(n: usize, make: impl Fn() -> std::process::Command) -> (Vec<ChildRun>, Duration) {
    let start = Instant::now();
    let children: Vec<_> = (0..n)
        .map(|_| {
            make()
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let runs: Vec<ChildRun> = children.into_iter().map(wait_child).collect();
    (runs, start.elapsed())
}

fn all_succeeded(runs: &[ChildRun]) -> String {
    for run in runs {
        assert!(
            run.status.success() && run.result().is_some(),
            "a process failed: {run:?}"
        );
    }
    let results: BTreeSet<&str> = runs.iter().filter_map(|r| r.result()).collect();
    assert_eq!(results.len(), 1, "they disagree: {results:?}");
    results.into_iter().next().unwrap().to_owned()
}

#[test]
fn download_extract_from_2_4_and_8_processes_at_once() {
    let entries: Vec<(String, Vec<u8>)> = (0..40)
        .map(|i| {
            let class = if i % 2 == 0 { "hotdog" } else { "not-hotdog" };
            (
                format!("hotdog/train/{class}/{i}.jpg"),
                vec![i as u8; 3000 + i],
            )
        })
        .collect();
    let refs: Vec<(&str, &[u8])> = entries
        .iter()
        .map(|(n, b)| (n.as_str(), b.as_slice()))
        .collect();
    let body = zip_bytes(&refs);
    let sha = sha1_hex(&body);
    for n in [2, 4, 8] {
        let server = Server::start();
        // About 1.2 s for the body: every process starts while the first one downloads.
        server.route(
            "hotdog.zip",
            Reply::Slow {
                body: body.clone(),
                chunks: 12,
                pause: Duration::from_millis(100),
            },
        );
        let data = tempfile::tempdir().unwrap();
        let (runs, wall) = run_all(n, || {
            let mut cmd = child("download_extract");
            cmd.env("D2L_DATA_DIR", data.path())
                .env("D2L_DATA_URL", &server.base)
                .env("D2L_TEST_SHA1", &sha);
            cmd
        });
        let out = all_succeeded(&runs);
        assert_eq!(out, data.path().join("hotdog").display().to_string());
        assert_eq!(server.hits("hotdog.zip"), 1, "{n} processes: one download");
        let mut want: Vec<String> = entries
            .iter()
            .map(|(name, _)| name.trim_start_matches("hotdog/").to_owned())
            .collect();
        want.sort();
        assert_eq!(files_below(&data.path().join("hotdog")), want);
        for (name, bytes) in &entries {
            assert_eq!(&std::fs::read(data.path().join(name)).unwrap(), bytes);
        }
        assert_eq!(std::fs::read(data.path().join("hotdog.zip")).unwrap(), body);
        assert!(temporaries_below(data.path()).is_empty());
        let waited = runs
            .iter()
            .filter(|r| r.stdout.contains("waiting: another process"))
            .count();
        println!("download_extract, {n} processes: all succeeded in {wall:.1?}, {waited} waited, 1 request");
    }
}

#[test]
fn the_weights_fetch_from_2_4_and_8_processes_at_once() {
    use sha2::Digest;
    let body: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let prefix: String = sha2::Sha256::digest(&body)
        .iter()
        .take(4)
        .map(|b| format!("{b:02x}"))
        .collect();
    let file = format!("resnet18-{prefix}.pth");
    for n in [2, 4, 8] {
        let server = Server::start();
        server.route(
            &file,
            Reply::Slow {
                body: body.clone(),
                chunks: 10,
                pause: Duration::from_millis(100),
            },
        );
        let torch_home = tempfile::tempdir().unwrap();
        let (runs, wall) = run_all(n, || {
            let mut cmd = child("weights");
            cmd.env("TORCH_HOME", torch_home.path())
                .env("D2L_WEIGHTS_URL", &server.base)
                .env("D2L_TEST_FILE", &file)
                .env_remove("D2L_SETTINGS");
            cmd
        });
        let out = all_succeeded(&runs);
        let path = torch_home.path().join("hub/checkpoints").join(&file);
        assert_eq!(out, path.display().to_string());
        assert_eq!(std::fs::read(&path).unwrap(), body);
        assert_eq!(server.hits(&file), 1, "{n} processes: one download");
        assert!(temporaries_below(torch_home.path()).is_empty());
        println!("weights, {n} processes: all succeeded in {wall:.1?}, 1 request");
    }
}

#[test]
fn the_source_models_training_from_2_4_and_8_processes_at_once() {
    for n in [2, 4, 8] {
        let cache = tempfile::tempdir().unwrap();
        let (runs, wall) = run_all(n, || {
            let mut cmd = child("source_model");
            cmd.env("D2L_TEST_CACHE", cache.path());
            cmd
        });
        let out = all_succeeded(&runs);
        let trained = runs
            .iter()
            .filter(|r| r.stdout.contains("source model: epoch 1/"))
            .count();
        assert_eq!(
            trained, 1,
            "{n} processes: one trains, the others wait and load it"
        );
        let weights = out.split(' ').next().unwrap();
        assert!(std::path::Path::new(weights).is_file());
        // One model folder, one data set, nothing else.
        let mut top: Vec<String> = std::fs::read_dir(cache.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| !n.ends_with(".lock"))
            .collect();
        top.sort();
        assert_eq!(top.len(), 2, "{top:?}");
        assert!(
            top[0] == "data" && top[1].starts_with("source-model-"),
            "{top:?}"
        );
        assert!(temporaries_below(cache.path()).is_empty());
        println!("source model, {n} processes: all succeeded in {wall:.1?}, 1 trained");
    }
}
