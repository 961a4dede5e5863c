//! Shared test helpers: a small HTTP server on 127.0.0.1 and archives built in temp dirs.
#![allow(dead_code)] // each test file uses a part

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// How the server answers one path.
#[derive(Clone)]
pub enum Reply {
    /// 200 with the body.
    Body(Vec<u8>),
    /// 200 announcing the whole body's length, then only the first `sent` bytes, then close.
    Cut { body: Vec<u8>, sent: usize },
    /// This status, empty body.
    Status(u16),
    /// 200 with the body sent in `chunks` pieces, `pause` apart (a slow server, so that
    /// concurrent clients overlap, or a test can act mid-download).
    Slow {
        body: Vec<u8>,
        chunks: usize,
        pause: std::time::Duration,
    },
}

/// An HTTP/1.1 server on a free loopback port, a thread per connection; it serves until the
/// test ends.
pub struct Server {
    pub base: String,
    routes: Arc<Mutex<HashMap<String, Reply>>>,
    hits: Arc<Mutex<HashMap<String, usize>>>,
    total: Arc<AtomicUsize>,
}

impl Server {
    pub fn start() -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}/", listener.local_addr().unwrap());
        let routes: Arc<Mutex<HashMap<String, Reply>>> = Arc::default();
        let hits: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
        let total = Arc::new(AtomicUsize::new(0));
        let (r, h, t) = (routes.clone(), hits.clone(), total.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let (r, h, t) = (r.clone(), h.clone(), t.clone());
                std::thread::spawn(move || serve(stream, &r, &h, &t));
            }
        });
        Server {
            base,
            routes,
            hits,
            total,
        }
    }

    pub fn route(&self, path: &str, reply: Reply) {
        self.routes.lock().unwrap().insert(path.to_owned(), reply);
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn hits(&self, path: &str) -> usize {
        self.hits.lock().unwrap().get(path).copied().unwrap_or(0)
    }
}

fn serve(
    mut stream: std::net::TcpStream,
    routes: &Mutex<HashMap<String, Reply>>,
    hits: &Mutex<HashMap<String, usize>>,
    total: &AtomicUsize,
) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut request = String::new();
    if reader.read_line(&mut request).is_err() {
        return;
    }
    // Skip the headers.
    let mut line = String::new();
    while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
        line.clear();
    }
    let path = request
        .split_whitespace()
        .nth(1)
        .unwrap_or("/")
        .trim_start_matches('/')
        .to_owned();
    total.fetch_add(1, Ordering::SeqCst);
    *hits.lock().unwrap().entry(path.clone()).or_default() += 1;
    let reply = routes
        .lock()
        .unwrap()
        .get(&path)
        .cloned()
        .unwrap_or(Reply::Status(404));
    let _ = match reply {
        Reply::Body(body) => write_response(&mut stream, 200, &body, body.len()),
        Reply::Cut { body, sent } => write_response(&mut stream, 200, &body[..sent], body.len()),
        Reply::Status(code) => write_response(&mut stream, code, b"", 0),
        Reply::Slow {
            body,
            chunks,
            pause,
        } => (|| {
            write!(
                stream,
                "HTTP/1.1 200 X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            )?;
            for piece in body.chunks(body.len().div_ceil(chunks.max(1)).max(1)) {
                std::thread::sleep(pause);
                stream.write_all(piece)?;
                stream.flush()?;
            }
            Ok(())
        })(),
    };
}

fn write_response(
    stream: &mut impl Write,
    code: u16,
    body: &[u8],
    announced: usize,
) -> std::io::Result<()> {
    write!(
        stream,
        "HTTP/1.1 {code} X\r\nContent-Length: {announced}\r\nConnection: close\r\n\r\n"
    )?;
    stream.write_all(body)?;
    stream.flush()
}

/// A zip of (name, bytes) entries; a name ending in `/` is a folder.
pub fn zip_bytes(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut buf = std::io::Cursor::new(Vec::new());
    {
        let mut zip = zip::ZipWriter::new(&mut buf);
        let opts = zip::write::SimpleFileOptions::default();
        for (name, bytes) in entries {
            if name.ends_with('/') {
                zip.add_directory(*name, opts).unwrap();
            } else {
                zip.start_file(*name, opts).unwrap();
                zip.write_all(bytes).unwrap();
            }
        }
        zip.finish().unwrap();
    }
    buf.into_inner()
}

pub fn sha1_hex(bytes: &[u8]) -> String {
    use sha1::Digest;
    sha1::Sha1::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Every file below `dir`, as sorted relative paths, but for the cache's lock files
/// (`.<name>.lock`, empty, kept on purpose: see `d2l::files`).
pub fn files_below(dir: &Path) -> Vec<String> {
    all_files_below(dir)
        .into_iter()
        .filter(|f| !is_lock_file(f))
        .collect()
}

/// Whether a relative path names a cache lock file.
pub fn is_lock_file(rel: &str) -> bool {
    let name = rel.rsplit('/').next().unwrap_or(rel);
    name.starts_with('.') && name.ends_with(".lock")
}

/// Every file below `dir`, lock files too.
pub fn all_files_below(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    out.sort();
    out
}

/// The chapter's optimiser as the notebook's `fine_tune` builds it: SGD with weight decay and,
/// with `param_group`, the output layer `fc` in a group of its own at ten times `lr`.
pub fn chapter_sgd(
    net: &d2l::model::ResNet,
    lr: f64,
    weight_decay: f64,
    param_group: bool,
) -> d2l::train::SGD {
    use d2l::train::{ParamGroup, SGD};
    let groups = if param_group {
        let body = net
            .named_parameters()
            .into_iter()
            .filter(|(name, _)| !name.starts_with("fc."))
            .map(|(_, p)| p)
            .collect();
        vec![
            ParamGroup::new(body),
            ParamGroup::new(net.fc.parameters()).lr(lr * 10.0),
        ]
    } else {
        vec![ParamGroup::new(net.parameters())]
    };
    SGD::new(groups, lr, weight_decay).unwrap()
}

/// The chapter's target model as the notebook makes `finetune_net`: ResNet-18 with every weight
/// from `weights`, then a new 2-output `fc` with Xavier-uniform weights.
pub fn fine_tune_net(vs: &d2l::tch::nn::VarStore, weights: &Path) -> d2l::model::ResNet {
    let mut net = d2l::model::resnet18_from(vs, weights).unwrap();
    net.fc = d2l::model::Linear::new(vs, "fc", net.fc.in_features, 2);
    d2l::model::xavier_uniform_(&net.fc.weight).unwrap();
    net
}

/// A command that runs this test binary's `child_process` test as another process playing
/// `role` (see [`child_role`]); the parent sets the role's environment.
pub fn child(role: &str) -> std::process::Command {
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "child_process",
        "--nocapture",
        "--test-threads=1",
        "-q",
    ])
    .env("D2L_TEST_ROLE", role)
    .env_remove("RUST_BACKTRACE");
    cmd
}

/// What a child's run said: its `RESULT` lines, its `ERROR` line, its exit status.
#[derive(Debug)]
pub struct ChildRun {
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl ChildRun {
    pub fn result(&self) -> Option<&str> {
        self.stdout.lines().find_map(|l| l.strip_prefix("RESULT "))
    }
    pub fn error(&self) -> Option<&str> {
        self.stdout.lines().find_map(|l| l.strip_prefix("ERROR "))
    }
    /// What the child found left in `D2L_TEST_LIST_DIR` after its error.
    pub fn left(&self) -> Option<&str> {
        self.stdout.lines().find_map(|l| l.strip_prefix("LEFT "))
    }
}

pub fn wait_child(child: std::process::Child) -> ChildRun {
    let out = child.wait_with_output().unwrap();
    ChildRun {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The variant of a d2l error, as its Debug output starts.
pub fn variant(e: &d2l::Error) -> String {
    format!("{e:?}")
        .split(|c: char| !c.is_alphanumeric())
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// The tiny source model the cache tests train (seconds).
pub fn tiny_source() -> d2l::model::SourceModelConfig {
    d2l::model::SourceModelConfig {
        data: d2l::data::synthetic::SourceConfig {
            train_per_class: 3,
            test_per_class: 1,
            min_side: 24,
            max_side: 40,
            seed: 1,
        },
        image_size: 32,
        epochs: 2,
        batch_size: 8,
        ..Default::default()
    }
}

/// The child side: does what `D2L_TEST_ROLE` says, prints `RESULT <what>` or `ERROR <variant>:
/// <message>` (exit status 1). Does nothing when the variable is unset (a normal test run).
pub fn child_role() {
    let Ok(role) = std::env::var("D2L_TEST_ROLE") else {
        return;
    };
    let var = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} unset"));
    let result: d2l::Result<String> = match role.as_str() {
        "download_extract" => {
            d2l::DATA_HUB.insert(
                "hotdog",
                format!("{}hotdog.zip", d2l::DATA_URL),
                var("D2L_TEST_SHA1"),
            );
            d2l::download_extract("hotdog").map(|p| p.display().to_string())
        }
        "weights" => {
            d2l::model::weights_file(&var("D2L_TEST_FILE")).map(|p| p.display().to_string())
        }
        "extract" => {
            d2l::data::extract(Path::new(&var("D2L_TEST_ARCHIVE"))).map(|p| p.display().to_string())
        }
        "source_model" => d2l::model::pretrain_source_model(
            var("D2L_TEST_CACHE"),
            &tiny_source(),
            d2l::tch::Device::Cpu,
        )
        .map(|m| format!("{} {}", m.weights.display(), m.test_acc)),
        "checkpoint" => {
            // With D2L_TEST_LOOP, saves again and again, each time with other weights.
            let vs = d2l::tch::nn::VarStore::new(d2l::tch::Device::Cpu);
            let net = d2l::model::resnet18(&vs.root(), 2);
            let classes = vec!["hotdog".to_owned(), "not-hotdog".to_owned()];
            let stem = var("D2L_TEST_STEM");
            let mut i = 0;
            loop {
                d2l::tch::no_grad(|| {
                    let _ = net.fc.bias.shallow_clone().fill_(i as f64);
                });
                let saved = d2l::model::save_checkpoint(
                    &net,
                    &stem,
                    &classes,
                    (40, 32),
                    Default::default(),
                );
                match saved {
                    Ok(_) if std::env::var_os("D2L_TEST_LOOP").is_some() => {
                        println!("SAVED {i}");
                        i += 1;
                    }
                    other => break other.map(|(w, _)| w.display().to_string()),
                }
            }
        }
        other => panic!("unknown role {other}"),
    };
    report(result);
}

/// The temporaries (`.<name>.<pid>.<random>.part|staging`, and the old `.part` names) below
/// `dir`, at any depth.
pub fn temporaries_below(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            if name.ends_with(".part") || name.ends_with(".staging") {
                out.push(p.strip_prefix(dir).unwrap().to_string_lossy().into_owned());
            } else if p.is_dir() {
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}

/// A free TCP port on 127.0.0.1 (free when asked; a rendezvous takes it soon after).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A command that runs this test binary's `rank_process` test as rank `rank` of `world` playing
/// `role`, with torchrun's variables (master on 127.0.0.1:`port`) and a collective timeout.
pub fn rank_command(
    role: &str,
    port: u16,
    rank: usize,
    world: usize,
    timeout_s: u32,
) -> std::process::Command {
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "rank_process",
        "--nocapture",
        "--test-threads=1",
        "-q",
    ])
    .env("D2L_TEST_ROLE", role)
    .env("MASTER_ADDR", "127.0.0.1")
    .env("MASTER_PORT", port.to_string())
    .env("RANK", rank.to_string())
    .env("LOCAL_RANK", rank.to_string())
    .env("WORLD_SIZE", world.to_string())
    .env("D2L_DIST_TIMEOUT", timeout_s.to_string())
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped());
    cmd
}

/// A child's or rank's answer: `RESULT <what>`, or `ERROR <variant>: <message>` and exit status
/// 1, after `LEFT <files>` when `D2L_TEST_LIST_DIR` names a folder to list (for a parent that
/// cannot look, as with a tmpfs of a mount namespace that ends with this process).
pub fn report(result: d2l::Result<String>) {
    match result {
        Ok(what) => println!("RESULT {what}"),
        Err(e) => {
            println!("ERROR {}: {e}", variant(&e));
            if let Ok(dir) = std::env::var("D2L_TEST_LIST_DIR") {
                let mut left = all_files_below(Path::new(&dir));
                left.retain(|f| !is_lock_file(f));
                let mut dirs: Vec<String> = std::fs::read_dir(&dir)
                    .unwrap()
                    .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .filter(|n| Path::new(&dir).join(n).is_dir())
                    .collect();
                left.append(&mut dirs);
                println!("LEFT {}", left.join(","));
            }
            std::process::exit(1);
        }
    }
}

/// 12 training and 4 test images, cropped or resized to `side` px, in batches of 4: a
/// shuffled training loader and an ordered test loader.
pub fn tiny_loaders(dir: &Path, side: u32) -> (d2l::DataLoader, d2l::DataLoader) {
    tiny_loaders_with(dir, side, 6)
}

/// One epoch of the chapter's training (`chapter_sgd`, the summed loss, `train_ch13_with`, no
/// figure, quiet) on `tiny_loaders_with(dir, 16, 16)`: 32 images of 16 px in batches of 4, 8
/// steps, enough for the whole layout trial.
pub fn train_tiny_epoch(
    dir: &Path,
) -> (
    d2l::train::History,
    d2l::tch::nn::VarStore,
    d2l::model::ResNet,
) {
    use d2l::train::{chapter_sgd, cross_entropy, train_ch13_with, TrainOptions};
    let (train_iter, test_iter) = tiny_loaders_with(dir, 16, 16);
    let vs = d2l::tch::nn::VarStore::new(d2l::tch::Device::Cpu);
    let net = d2l::model::resnet18(&vs.root(), 2);
    let mut trainer = chapter_sgd(&net, 1e-3).unwrap();
    let opts = TrainOptions {
        no_figure: true,
        quiet: true,
        ..TrainOptions::default()
    };
    let devices = d2l::Devices(vec![d2l::tch::Device::Cpu]);
    let h = train_ch13_with(
        &net,
        &train_iter,
        &test_iter,
        cross_entropy,
        &mut trainer,
        1,
        &devices,
        &opts,
    )
    .unwrap();
    (h, vs, net)
}

/// [`tiny_loaders`] with `train_per_class` training images a class.
pub fn tiny_loaders_with(
    dir: &Path,
    side: u32,
    train_per_class: usize,
) -> (d2l::DataLoader, d2l::DataLoader) {
    use d2l::data::synthetic::{make_hotdog_dataset, HotdogConfig};
    use d2l::data::transforms::{Compose, Normalize, RandomResizedCrop, Resize, ToTensor};
    use d2l::{DataLoader, ImageFolder};
    let cfg = HotdogConfig {
        train_per_class,
        test_per_class: 2,
        min_side: 24,
        max_side: 40,
        seed: 2,
    };
    let root = make_hotdog_dataset(dir, &cfg).unwrap();
    let augs = Compose::new()
        .then(RandomResizedCrop::new(side))
        .then(ToTensor)
        .then(Normalize::imagenet());
    let test_augs = Compose::new()
        .then(Resize::new(side, side))
        .then(ToTensor)
        .then(Normalize::imagenet());
    let train_iter = DataLoader::new(ImageFolder::new(root.join("train")).unwrap(), augs, 4)
        .unwrap()
        .shuffle(true);
    let test_iter =
        DataLoader::new(ImageFolder::new(root.join("test")).unwrap(), test_augs, 4).unwrap();
    (train_iter, test_iter)
}
