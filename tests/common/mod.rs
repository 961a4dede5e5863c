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
}

/// A blocking HTTP/1.1 server on a free loopback port; it serves until the test ends.
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
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut request = String::new();
                if reader.read_line(&mut request).is_err() {
                    continue;
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
                t.fetch_add(1, Ordering::SeqCst);
                *h.lock().unwrap().entry(path.clone()).or_default() += 1;
                let reply = r
                    .lock()
                    .unwrap()
                    .get(&path)
                    .cloned()
                    .unwrap_or(Reply::Status(404));
                let _ = match reply {
                    Reply::Body(body) => write_response(&mut stream, 200, &body, body.len()),
                    Reply::Cut { body, sent } => {
                        write_response(&mut stream, 200, &body[..sent], body.len())
                    }
                    Reply::Status(code) => write_response(&mut stream, code, b"", 0),
                };
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

/// Every file below `dir`, as sorted relative paths.
pub fn files_below(dir: &Path) -> Vec<String> {
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
