//! Faults that must not leave a bad cache: `kill -9` during a download, an extraction, the
//! source model's training and a checkpoint write (real processes, killed mid-way), and a full
//! disk during an extraction and a checkpoint write (a small tmpfs where the machine lets a test
//! mount one, and a file-size limit, which every Linux has). Nothing half-made is taken for
//! good; the next call recovers by itself and removes the dead run's temporaries.
mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    child, child_role, files_below, sha1_hex, temporaries_below, wait_child, zip_bytes, ChildRun,
    Reply, Server,
};

#[test]
fn child_process() {
    child_role();
}

/// Polls until `ready` holds (every millisecond, up to `limit`).
fn wait_for(limit: Duration, mut ready: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if ready() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    false
}

/// Sends SIGKILL and reaps the child; asserts that it was the kill that ended it.
fn kill_9(mut child: std::process::Child, when: &str) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    let status = child.wait().unwrap();
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "the child ended by itself before the kill {when}: {status:?}"
    );
}

fn run(mut cmd: Command) -> ChildRun {
    wait_child(
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    )
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn hotdog_entries(n: usize, size: usize) -> Vec<(String, Vec<u8>)> {
    (0..n)
        .map(|i| {
            let class = if i % 2 == 0 { "hotdog" } else { "not-hotdog" };
            (
                format!("hotdog/train/{class}/{i}.jpg"),
                vec![(i % 251) as u8; size],
            )
        })
        .collect()
}

fn zip_of(entries: &[(String, Vec<u8>)]) -> Vec<u8> {
    let refs: Vec<(&str, &[u8])> = entries
        .iter()
        .map(|(n, b)| (n.as_str(), b.as_slice()))
        .collect();
    zip_bytes(&refs)
}

#[test]
fn kill_9_during_a_download_then_the_next_call_recovers_and_cleans_up() {
    let entries = hotdog_entries(10, 5000);
    let body = zip_of(&entries);
    let sha = sha1_hex(&body);
    let server = Server::start();
    // Slow: 20 s for the whole body; the kill comes once the first bytes are on disk.
    server.route(
        "hotdog.zip",
        Reply::Slow {
            body: body.clone(),
            chunks: 200,
            pause: Duration::from_millis(100),
        },
    );
    let data = tempfile::tempdir().unwrap();
    let make = || {
        let mut cmd = child("download_extract");
        cmd.env("D2L_DATA_DIR", data.path())
            .env("D2L_DATA_URL", &server.base)
            .env("D2L_TEST_SHA1", &sha)
            .stdout(Stdio::null());
        cmd
    };
    let victim = make().spawn().unwrap();
    let part = || {
        temporaries_below(data.path())
            .into_iter()
            .find(|t| t.starts_with(".hotdog.zip.") && t.ends_with(".part"))
    };
    let seen = wait_for(Duration::from_secs(30), || {
        part().is_some_and(|p| std::fs::metadata(data.path().join(p)).is_ok_and(|m| m.len() > 0))
    });
    assert!(seen, "no download temporary appeared");
    kill_9(victim, "during the download");
    // What the dead run left: its temporary, and nothing that looks like the real thing.
    assert!(part().is_some());
    assert!(!data.path().join("hotdog.zip").exists() && !data.path().join("hotdog").exists());

    server.route("hotdog.zip", Reply::Body(body.clone()));
    let next = run(make_with_output(make()));
    assert!(next.status.success(), "{next:?}");
    assert_eq!(std::fs::read(data.path().join("hotdog.zip")).unwrap(), body);
    assert_eq!(
        files_below(&data.path().join("hotdog")).len(),
        entries.len()
    );
    assert_eq!(temporaries_below(data.path()), Vec::<String>::new());
}

fn make_with_output(mut cmd: Command) -> Command {
    cmd.stdout(Stdio::piped());
    cmd
}

#[test]
fn kill_9_during_an_extraction_then_the_next_call_recovers_and_cleans_up() {
    // Thousands of small entries: the extraction takes long enough to be caught mid-way.
    let entries = hotdog_entries(6000, 2000);
    let body = zip_of(&entries);
    let data = tempfile::tempdir().unwrap();
    // The archive is in the cache already (its hash matches): the run goes straight to extracting.
    std::fs::write(data.path().join("hotdog.zip"), &body).unwrap();
    let make = || {
        let mut cmd = child("download_extract");
        cmd.env("D2L_DATA_DIR", data.path())
            .env("D2L_DATA_URL", "http://127.0.0.1:9/")
            .env("D2L_TEST_SHA1", sha1_hex(&body));
        cmd
    };
    let victim = make().stdout(Stdio::null()).spawn().unwrap();
    let staging = || {
        temporaries_below(data.path())
            .into_iter()
            .find(|t| t.starts_with(".hotdog.") && t.ends_with(".staging"))
    };
    // Killed once the staging folder holds part of the files.
    let seen = wait_for(Duration::from_secs(60), || {
        staging().is_some_and(|s| files_below(&data.path().join(s)).len() > 100)
    });
    assert!(seen, "no extraction in progress was seen");
    kill_9(victim, "during the extraction");
    assert!(staging().is_some());
    assert!(
        !data.path().join("hotdog").exists() && !data.path().join("hotdog.zip.extracted").exists(),
        "{:?}",
        names_in(data.path())
    );

    let next = run(make());
    assert!(next.status.success(), "{next:?}");
    let out = PathBuf::from(next.result().unwrap());
    assert_eq!(files_below(&out).len(), entries.len());
    for (name, bytes) in entries.iter().step_by(500) {
        assert_eq!(&std::fs::read(data.path().join(name)).unwrap(), bytes);
    }
    assert_eq!(temporaries_below(data.path()), Vec::<String>::new());
}

#[test]
fn kill_9_during_the_source_models_training_then_the_next_call_trains_it() {
    let cache = tempfile::tempdir().unwrap();
    let make = || {
        let mut cmd = child("source_model");
        cmd.env("D2L_TEST_CACHE", cache.path());
        cmd
    };
    let mut victim = make().stdout(Stdio::piped()).spawn().unwrap();
    // Killed as soon as it reports its first epoch: training, nothing of the model saved yet.
    let mut lines = BufReader::new(victim.stdout.take().unwrap()).lines();
    let started = lines.any(|l| l.is_ok_and(|l| l.contains("source model: epoch 1/")));
    assert!(started, "the source model's training did not start");
    kill_9(victim, "during training");
    let models = || {
        names_in(cache.path())
            .into_iter()
            .filter(|n| n.starts_with("source-model-") && !n.ends_with(".lock"))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        models(),
        Vec::<String>::new(),
        "a model was kept from a killed run"
    );

    let next = run(make());
    assert!(next.status.success(), "{next:?}");
    assert!(
        next.stdout.contains("source model: epoch 1/"),
        "it must train again"
    );
    assert_eq!(models().len(), 1);
    assert_eq!(temporaries_below(cache.path()), Vec::<String>::new());
    // And the one after loads it.
    let third = run(make());
    assert!(third.status.success() && !third.stdout.contains("source model: epoch"));
    assert_eq!(third.result(), next.result());
}

#[test]
fn kill_9_during_a_checkpoint_write_never_gives_a_mismatched_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let stem = dir.path().join("hotdog-resnet18");
    let make = || {
        let mut cmd = child("checkpoint");
        cmd.env("D2L_TEST_STEM", &stem);
        cmd
    };
    let mut victim = make()
        .env("D2L_TEST_LOOP", "1")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // After a first complete save, killed while a later one is being written.
    let mut lines = BufReader::new(victim.stdout.take().unwrap()).lines();
    assert!(lines.any(|l| l.is_ok_and(|l| l.starts_with("SAVED 0"))));
    std::thread::spawn(move || lines.for_each(drop));
    let writing = wait_for(Duration::from_secs(60), || {
        !temporaries_below(dir.path()).is_empty()
    });
    assert!(writing, "no checkpoint write in progress was seen");
    kill_9(victim, "during a checkpoint write");
    assert!(!temporaries_below(dir.path()).is_empty());
    // What is there loads as one consistent save, or is refused as two saves' halves.
    match d2l::model::Classifier::load(&stem, d2l::tch::Device::Cpu) {
        Ok(clf) => assert_eq!(clf.config().classes.len(), 2),
        Err(e) => assert!(e.to_string().contains("not from one save"), "{e}"),
    }
    let next = run(make());
    assert!(next.status.success(), "{next:?}");
    d2l::model::Classifier::load(&stem, d2l::tch::Device::Cpu).unwrap();
    assert_eq!(temporaries_below(dir.path()), Vec::<String>::new());
    assert_eq!(
        names_in(dir.path()),
        ["hotdog-resnet18.json", "hotdog-resnet18.safetensors"]
    );
}

/// The command under a small tmpfs mounted on `dir` (a mount namespace of its own, through
/// `unshare`), or `None` where this machine does not allow it.
fn in_small_tmpfs(dir: &Path, size: &str, inner: Command) -> Option<Command> {
    let probe = Command::new("unshare")
        .args(["-rm", "sh", "-c"])
        .arg(format!(
            "mount -t tmpfs -o size={size} tmpfs '{}'",
            dir.display()
        ))
        .stderr(Stdio::null())
        .status();
    if !probe.is_ok_and(|s| s.success()) {
        return None;
    }
    let mut cmd = Command::new("unshare");
    cmd.args(["-rm", "sh", "-c"])
        .arg(r#"mount -t tmpfs -o size="$1" tmpfs "$2" && shift 2 && exec "$@""#)
        .args(["sh", size])
        .arg(dir)
        .arg(inner.get_program())
        .args(inner.get_args());
    for (k, v) in inner.get_envs() {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    Some(cmd)
}

/// The command with a file-size limit (`ulimit -f`): writing past it fails with EFBIG, as a full
/// disk does with ENOSPC.
fn with_file_size_limit(mut cmd: Command, bytes: u64) -> Command {
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let lim = libc::rlimit {
                rlim_cur: bytes,
                rlim_max: bytes,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

/// A tar.gz of `n` entries of `size` random bytes whose gzip trailer understates its size, so
/// that the disk check made before extracting passes and the disk fills while writing.
fn tar_gz_that_fills(path: &Path, n: usize, size: usize) {
    use rand::{RngCore, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    for i in 0..n {
        let mut bytes = vec![0u8; size];
        rng.fill_bytes(&mut bytes);
        let mut header = tar::Header::new_gnu();
        header.set_size(size as u64);
        header.set_mode(0o644);
        header.set_cksum();
        tar.append_data(&mut header, format!("full/{i}.jpg"), &bytes[..])
            .unwrap();
    }
    let mut out = tar.into_inner().unwrap().finish().unwrap();
    let n = out.len();
    out[n - 4..].copy_from_slice(&1000u32.to_le_bytes());
    std::fs::File::create(path)
        .unwrap()
        .write_all(&out)
        .unwrap();
}

fn assert_disk_full(run: &ChildRun, what: &str) {
    let error = run
        .error()
        .unwrap_or_else(|| panic!("{what}: no error: {run:?}"));
    assert!(
        error.starts_with("DiskFull:") && error.contains("nothing partial was kept"),
        "{what}: {error}"
    );
}

#[test]
fn a_full_disk_during_extraction_and_checkpoint_writes_is_a_clear_error_with_nothing_partial() {
    let archive_dir = tempfile::tempdir().unwrap();
    let archive = archive_dir.path().join("full.tar.gz");
    // 6 MiB of photos-like bytes in entries of 1 MiB each.
    tar_gz_that_fills(&archive, 6, 1 << 20);

    // A real small disk: a 10 MiB tmpfs holding the 6 MiB archive, where the machine lets a
    // test mount one.
    let mount = tempfile::tempdir().unwrap();
    let mut inner = child("extract");
    inner
        .env("D2L_TEST_ARCHIVE", mount.path().join("full.tar.gz"))
        .env("D2L_TEST_LIST_DIR", mount.path());
    let copy_then = |inner: Command| {
        // Copy the archive in once the tmpfs is mounted, then run the child.
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(r#"cp "$1" "$2" && shift 2 && exec "$@""#)
            .args(["sh"])
            .arg(&archive)
            .arg(mount.path())
            .arg(inner.get_program())
            .args(inner.get_args());
        for (k, v) in inner.get_envs() {
            if let Some(v) = v {
                cmd.env(k, v);
            }
        }
        cmd
    };
    match in_small_tmpfs(mount.path(), "10m", copy_then(inner)) {
        Some(cmd) => {
            let out = run(cmd);
            // The trailer said 1000 bytes, so the check before extracting passed; the check
            // before each entry stops it once the next one no longer fits.
            let error = out.error().unwrap_or_default();
            assert!(
                error.starts_with("NoSpace:")
                    && error.contains("only")
                    && error.contains("nothing was kept"),
                "{out:?}"
            );
            assert_eq!(out.left(), Some("full.tar.gz"), "{out:?}");
            println!("tmpfs: {}", out.error().unwrap());
        }
        None => println!(
            "this machine does not let a test mount a tmpfs: the file-size limit below stands in"
        ),
    }

    // A file-size limit: on any Linux.
    let data = tempfile::tempdir().unwrap();
    let one = data.path().join("one.tar.gz");
    tar_gz_that_fills(&one, 1, 3 << 20);
    let mut cmd = child("extract");
    cmd.env("D2L_TEST_ARCHIVE", &one);
    let out = run(with_file_size_limit(cmd, 2 << 20));
    assert_disk_full(&out, "extraction past the file-size limit");
    assert_eq!(names_in(data.path()), [".one.lock", "one.tar.gz"]);

    let ckpt = tempfile::tempdir().unwrap();
    let stem = ckpt.path().join("model");
    let mut cmd = child("checkpoint");
    cmd.env("D2L_TEST_STEM", &stem);
    let out = run(with_file_size_limit(cmd, 8 << 20));
    assert_disk_full(&out, "checkpoint past the file-size limit");
    assert!(
        out.error().unwrap().contains("model.safetensors"),
        "{out:?}"
    );
    assert_eq!(names_in(ckpt.path()), Vec::<String>::new());
}

#[test]
fn a_checkpoint_on_a_full_tmpfs_is_a_clear_error_with_nothing_partial() {
    let mount = tempfile::tempdir().unwrap();
    let mut inner = child("checkpoint");
    inner
        .env("D2L_TEST_STEM", mount.path().join("model"))
        .env("D2L_TEST_LIST_DIR", mount.path());
    let Some(cmd) = in_small_tmpfs(mount.path(), "16m", inner) else {
        println!(
            "this machine does not let a test mount a tmpfs: the file-size limit test stands in"
        );
        return;
    };
    let out = run(cmd);
    assert_disk_full(&out, "checkpoint on a full tmpfs");
    assert_eq!(out.left(), Some(""), "{out:?}");
    println!("tmpfs: {}", out.error().unwrap());
}
