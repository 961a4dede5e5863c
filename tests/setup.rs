//! The set-up the project depends on: linking without LD_LIBRARY_PATH, and one clear line when
//! the venv is missing or holds the wrong torch.
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn test_binaries_find_libtorch_through_their_rpath() {
    // Use libtorch here, so that the linker keeps it (rustc links with --as-needed).
    assert!(!d2l::try_all_gpus().is_empty());
    let exe = std::env::current_exe().unwrap();
    let out = Command::new("ldd")
        .arg(&exe)
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("libtorch_cpu.so"))
        .expect("linked to libtorch_cpu");
    assert!(
        line.contains("=> /"),
        "not resolved without LD_LIBRARY_PATH: {line}"
    );
    assert!(!text.contains("not found"), "{text}");
}

/// Runs `setup.py --check` against a venv of our choosing; returns (exit code, stderr).
fn setup_check(venv: &Path, home: &Path) -> (i32, String) {
    let out = Command::new("python3")
        .arg(root().join("scripts/setup.py"))
        .args(["--check", "--torch", "cpu"])
        .env("D2L_VENV", venv)
        .env("D2L_HOME", home)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A real but empty venv (no pip, no packages) in `dir`.
fn bare_venv(dir: &Path) -> PathBuf {
    let venv = dir.join("venv");
    let made = Command::new("python3")
        .args(["-m", "venv", "--without-pip"])
        .arg(&venv)
        .status()
        .unwrap();
    assert!(made.success());
    venv
}

#[test]
fn missing_venv_is_one_line_saying_what_to_run() {
    let tmp = tempfile::tempdir().unwrap();
    let (code, err) = setup_check(&tmp.path().join("no-venv"), tmp.path());
    assert_eq!(code, 1);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("no Python venv at") && err.contains("run `python3 scripts/setup.py`"),
        "{err}"
    );
}

#[test]
fn wrong_torch_version_is_one_line_saying_what_to_run() {
    let tmp = tempfile::tempdir().unwrap();
    let venv = bare_venv(tmp.path());
    let site = std::fs::read_dir(venv.join("lib"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let dist = site.join("site-packages/torch-2.10.0.dist-info");
    std::fs::create_dir_all(&dist).unwrap();
    std::fs::write(
        dist.join("METADATA"),
        "Metadata-Version: 2.1\nName: torch\nVersion: 2.10.0\n",
    )
    .unwrap();
    std::fs::write(venv.join("d2l-setup.json"), "{}").unwrap();

    let (code, err) = setup_check(&venv, tmp.path());
    assert_eq!(code, 1);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("has torch 2.10.0, environment.yml pins torch==2.11.0"),
        "{err}"
    );
    assert!(
        err.contains("run `python3 scripts/setup.py --reinstall`"),
        "{err}"
    );
}

#[test]
fn venv_cut_short_is_not_taken_for_a_good_one() {
    let tmp = tempfile::tempdir().unwrap();
    let venv = bare_venv(tmp.path());
    let (code, err) = setup_check(&venv, tmp.path());
    assert_eq!(code, 1);
    assert!(
        err.contains("incomplete") && err.contains("--reinstall"),
        "{err}"
    );
}
