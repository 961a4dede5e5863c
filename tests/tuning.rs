//! The tuning cache: what a CPU training run chose by timing (its memory layout, the path of each
//! convolution shape) is kept on disk, and a later process on the same machine and kernel set
//! takes it without timing; another kernel set times afresh; an unreadable file is said once and
//! replaced; `D2L_TUNING_CACHE=0` leaves the disk alone.
mod common;

use std::path::Path;

use common::{child, train_tiny_epoch, wait_child};
use d2l::train::*;
use serde_json::{json, Value};

/// The child: `D2L_TEST_RUNS` trainings in one process; prints each run's layout trial and
/// config entry, the convolution choices and the cache file's path as one JSON line.
#[test]
fn child_process() {
    if std::env::var("D2L_TEST_ROLE").as_deref() != Ok("tuning") {
        return;
    }
    let data = std::env::var("D2L_TEST_DATA").unwrap();
    let runs: usize = std::env::var("D2L_TEST_RUNS").unwrap().parse().unwrap();
    let runs: Vec<Value> = (0..runs)
        .map(|_| {
            let (h, _vs, _net) = train_tiny_epoch(Path::new(&data));
            json!({"trial": h.layout_trial, "config": h.config["channels_last"]})
        })
        .collect();
    let conv: Vec<bool> = d2l::model::conv_choices()
        .iter()
        .map(|c| c.cached)
        .collect();
    let out = json!({"runs": runs, "conv_cached": conv, "file": d2l::tuning::tuning_file()});
    println!("RESULT {out}");
}

/// Runs the child with the cache in `cache` and `env` set; its JSON and its stderr.
fn run(cache: &Path, data: &Path, runs: usize, env: &[(&str, &str)]) -> (Value, String) {
    let mut cmd = child("tuning");
    cmd.env("D2L_TUNING_DIR", cache)
        .env("D2L_TEST_DATA", data)
        .env("D2L_TEST_RUNS", runs.to_string());
    for var in [
        "D2L_TUNING_CACHE",
        "D2L_CONV_AUTOTUNE",
        "D2L_LAYOUT_AUTOTUNE",
        "ATEN_CPU_CAPABILITY",
    ] {
        cmd.env_remove(var);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = wait_child(
        cmd.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    assert!(out.status.success(), "{out:?}");
    let result = out.result().unwrap_or_else(|| panic!("{out:?}"));
    (serde_json::from_str(result).unwrap(), out.stderr)
}

fn trial(v: &Value, run: usize) -> LayoutTrial {
    serde_json::from_value(v["runs"][run]["trial"].clone()).unwrap()
}

fn conv_cached(v: &Value) -> Vec<bool> {
    serde_json::from_value(v["conv_cached"].clone()).unwrap()
}

fn files(dir: &Path) -> Vec<String> {
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".json"))
        .collect();
    names.sort();
    names
}

#[test]
fn timed_choices_are_kept_and_a_later_process_takes_them() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("tuning");
    let data = tmp.path().join("data");

    // The first process times both layouts and the convolutions; its second run takes the
    // layout from the cache at once (the same choice, the first run's times).
    let (first, _) = run(&cache, &data, 2, &[]);
    let timed = trial(&first, 0);
    assert!(!timed.cached && timed.channels_last.is_some(), "{timed:?}");
    assert!(!timed.nchw_s.is_empty(), "{timed:?}");
    assert!(first["runs"][0]["config"]
        .as_str()
        .unwrap()
        .ends_with("(timed)"));
    let again = trial(&first, 1);
    assert!(again.cached, "{again:?}");
    assert_eq!(
        LayoutTrial {
            cached: false,
            ..again
        },
        timed
    );
    let cl = timed.channels_last.unwrap();
    assert_eq!(first["runs"][1]["config"], format!("{cl} (cached timing)"));
    let measured = conv_cached(&first);
    assert!(
        !measured.is_empty() && measured.iter().all(|&c| !c),
        "{measured:?}"
    );

    // The file: this machine's key, every measured convolution, the layout with its times.
    let file = first["file"].as_str().unwrap();
    assert!(Path::new(file).starts_with(&cache), "{file}");
    assert_eq!(files(&cache).len(), 1);
    let kept: Value = serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
    let machine = &kept["machine"];
    assert!(!machine["cpu"].as_str().unwrap().is_empty(), "{machine}");
    assert_eq!(machine["threads"], d2l::tch::get_num_threads());
    assert_eq!(kept["conv"].as_array().unwrap().len(), measured.len());
    let layouts = kept["layout"].as_array().unwrap();
    assert_eq!(layouts.len(), 1);
    assert_eq!(layouts[0]["input"], json!([4, 3, 16, 16]));
    assert_eq!(
        serde_json::from_value::<LayoutTrial>(layouts[0]["trial"].clone()).unwrap(),
        timed
    );

    // A new process: nothing is timed.
    let (second, _) = run(&cache, &data, 1, &[]);
    let t = trial(&second, 0);
    assert!(t.cached && t.channels_last == Some(cl), "{t:?}");
    let cached = conv_cached(&second);
    assert_eq!(cached.len(), measured.len());
    assert!(cached.iter().all(|&c| c), "{cached:?}");
    let before = std::fs::read(file).unwrap();

    // With the cache off: timed again, and the file is left as it was.
    let (off, _) = run(&cache, &data, 1, &[("D2L_TUNING_CACHE", "0")]);
    assert!(!trial(&off, 0).cached);
    assert!(conv_cached(&off).iter().all(|&c| !c));
    assert_eq!(std::fs::read(file).unwrap(), before);

    // Another kernel set is another machine: timed, in a file of its own.
    let (other, _) = run(&cache, &data, 1, &[("ATEN_CPU_CAPABILITY", "default")]);
    assert!(!trial(&other, 0).cached);
    assert!(conv_cached(&other).iter().all(|&c| !c));
    assert_ne!(other["file"], first["file"]);
    assert_eq!(files(&cache).len(), 2);
    assert_eq!(std::fs::read(file).unwrap(), before);

    // An unreadable file: said once, timed again, and replaced by a good one.
    std::fs::write(file, "{ half a file").unwrap();
    let (broken, stderr) = run(&cache, &data, 1, &[]);
    assert!(!trial(&broken, 0).cached);
    assert!(conv_cached(&broken).iter().all(|&c| !c));
    assert_eq!(
        stderr.matches("not a tuning cache file").count(),
        1,
        "{stderr}"
    );
    assert!(stderr.contains(file), "{stderr}");
    let replaced: Value = serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
    assert_eq!(replaced["layout"].as_array().unwrap().len(), 1);
    assert_eq!(replaced["conv"].as_array().unwrap().len(), measured.len());
}
