//! d2l's `DATA_HUB`, `download` and `download_extract`, made safe: every file is checked after it
//! is fetched, written under a temporary name and renamed only when good, and archives are
//! extracted once, refusing entries that would land outside the target folder.
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};
use std::sync::{LazyLock, RwLock};
use std::time::{Duration, Instant};

use sha1::{Digest, Sha1};
use sha2::Sha256;

use crate::error::{Error, Result};

/// Where the book's data sets live (d2l's `DATA_URL`). `D2L_DATA_URL` replaces it (a mirror).
pub const DATA_URL: &str = "http://d2l-data.s3-accelerate.amazonaws.com/";

/// The chapter's data set: `DATA_HUB["hotdog"]`.
const HOTDOG_SHA1: &str = "fba480ffa8aa7e0febbb511d181409f899b9baa5";

/// Most bytes an archive may expand to (`D2L_MAX_EXTRACT_BYTES` changes it).
const MAX_EXTRACT_BYTES: u64 = 16 << 30;

/// d2l's `DATA_HUB`: data set name -> (URL, SHA-1 of the file). Users add to it like d2l's dict:
///
/// ```
/// d2l::DATA_HUB.insert("hotdog", format!("{}hotdog.zip", d2l::DATA_URL), "fba480ffa8aa7e0febbb511d181409f899b9baa5");
/// assert!(d2l::DATA_HUB.get("hotdog").is_some());
/// ```
pub static DATA_HUB: DataHub = DataHub(LazyLock::new(|| RwLock::new(builtin_hub())));

/// The registry behind [`DATA_HUB`].
pub struct DataHub(LazyLock<RwLock<BTreeMap<String, (String, String)>>>);

impl DataHub {
    /// Registers (or replaces) a data set.
    pub fn insert(&self, name: impl Into<String>, url: impl Into<String>, sha1: impl Into<String>) {
        let mut hub = self.0.write().unwrap_or_else(|e| e.into_inner());
        hub.insert(name.into(), (url.into(), sha1.into().to_ascii_lowercase()));
    }

    /// The URL and SHA-1 registered for `name`.
    pub fn get(&self, name: &str) -> Option<(String, String)> {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    /// The registered names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect()
    }
}

fn builtin_hub() -> BTreeMap<String, (String, String)> {
    let url = format!("{DATA_URL}hotdog.zip");
    BTreeMap::from([("hotdog".to_owned(), (url, HOTDOG_SHA1.to_owned()))])
}

/// The data cache: `D2L_DATA_DIR`, else `../data` as in the book.
pub fn data_dir() -> PathBuf {
    std::env::var_os("D2L_DATA_DIR").map_or_else(|| PathBuf::from("../data"), PathBuf::from)
}

/// `url` with [`DATA_URL`] replaced by the mirror in `D2L_DATA_URL`, if one is set.
pub fn mirrored(url: &str) -> String {
    match (std::env::var("D2L_DATA_URL"), url.strip_prefix(DATA_URL)) {
        (Ok(mirror), Some(rest)) if !mirror.is_empty() => {
            format!("{}/{rest}", mirror.trim_end_matches('/'))
        }
        _ => url.to_owned(),
    }
}

/// What a downloaded file must hash to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Checksum {
    /// The full SHA-1, in hex (d2l's `DATA_HUB`).
    Sha1(String),
    /// A prefix of the SHA-256, in hex (torch.hub's `resnet18-f37072fd.pth` convention).
    Sha256Prefix(String),
}

impl Checksum {
    fn matches(&self, digest: &FileDigest) -> bool {
        match self {
            Checksum::Sha1(h) => digest.sha1.eq_ignore_ascii_case(h),
            Checksum::Sha256Prefix(p) => {
                !p.is_empty() && digest.sha256.starts_with(&p.to_ascii_lowercase())
            }
        }
    }

    fn expected(&self) -> String {
        match self {
            Checksum::Sha1(h) => format!("SHA-1 {h}"),
            Checksum::Sha256Prefix(p) => format!("SHA-256 starting {p}"),
        }
    }

    fn actual(&self, digest: &FileDigest) -> String {
        match self {
            Checksum::Sha1(_) => format!("SHA-1 {}", digest.sha1),
            Checksum::Sha256Prefix(_) => format!("SHA-256 {}", digest.sha256),
        }
    }
}

struct FileDigest {
    sha1: String,
    sha256: String,
}

/// Hashes a stream in chunks (SHA-1 and SHA-256 in one pass).
struct Hasher {
    sha1: Sha1,
    sha256: Sha256,
}

impl Hasher {
    fn new() -> Self {
        Hasher {
            sha1: Sha1::new(),
            sha256: Sha256::new(),
        }
    }
    fn update(&mut self, bytes: &[u8]) {
        self.sha1.update(bytes);
        self.sha256.update(bytes);
    }
    fn finish(self) -> FileDigest {
        FileDigest {
            sha1: hex(&self.sha1.finalize()),
            sha256: hex(&self.sha256.finalize()),
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn digest_file(path: &Path) -> Result<FileDigest> {
    let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            return Ok(hasher.finish());
        }
        hasher.update(&buf[..n]);
    }
}

/// Downloads a `DATA_HUB` data set into [`data_dir`] and returns the file's path (d2l's
/// `download`). A cached file whose SHA-1 matches is reused without a request.
pub fn download(name: &str) -> Result<PathBuf> {
    download_checked(name).map(|(path, _)| path)
}

/// [`download`], also giving the SHA-1 the file was checked against.
fn download_checked(name: &str) -> Result<(PathBuf, String)> {
    let (url, sha1) = DATA_HUB.get(name).ok_or_else(|| {
        Error::Invalid(format!(
            "{name:?} is not in DATA_HUB (it has {:?}): add it with d2l::DATA_HUB.insert(name, url, sha1)",
            DATA_HUB.names()
        ))
    })?;
    let file_name = url
        .rsplit('/')
        .next()
        .filter(|n| !n.is_empty())
        .unwrap_or(name);
    let path = data_dir().join(file_name);
    fetch(&mirrored(&url), &path, &Checksum::Sha1(sha1.clone()))?;
    Ok((path, sha1))
}

/// Makes `path` hold the file at `url` with the given checksum. A file already there that
/// matches is kept; otherwise the body goes to a temporary file in the same folder, is checked,
/// and is renamed into place only if it matches: a cut or corrupt download is never taken for a
/// good file, and nothing is left behind on failure.
pub fn fetch(url: &str, path: &Path, checksum: &Checksum) -> Result<()> {
    if path.is_file() && checksum.matches(&digest_file(path)?) {
        return Ok(());
    }
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    println!("Downloading {} from {url}...", path.display());

    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(
            ".{}.",
            path.file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("download")
        ))
        .suffix(".part")
        .tempfile_in(dir)
        .map_err(|e| Error::io(dir, e))?;
    let tmp_path = tmp.path().to_owned();
    let digest = http_get_to(url, tmp.as_file_mut(), &tmp_path)?;
    if !checksum.matches(&digest) {
        return Err(Error::Checksum {
            url: url.to_owned(),
            expected: checksum.expected(),
            actual: checksum.actual(&digest),
        });
    }
    tmp.as_file()
        .sync_all()
        .map_err(|e| Error::io(tmp.path(), e))?;
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    Ok(())
}

/// GETs `url` into `out`, hashing as it goes; fails on any HTTP error or a short body.
fn http_get_to(url: &str, out: &mut File, out_path: &Path) -> Result<FileDigest> {
    let fail = |msg: String| Error::Download {
        url: url.to_owned(),
        msg,
    };
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_connect(Some(Duration::from_secs(30)))
        .timeout_recv_body(Some(Duration::from_secs(120)))
        .build()
        .into();
    let response = agent.get(url).call().map_err(|e| fail(e.to_string()))?;
    let total = response
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut body = response.into_body().into_reader();
    let mut hasher = Hasher::new();
    let mut progress = Progress::new(total);
    let mut buf = vec![0u8; 1 << 16];
    let mut received = 0u64;
    loop {
        let n = body
            .read(&mut buf)
            .map_err(|e| fail(format!("{e} after {received} bytes")))?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n])
            .map_err(|e| Error::io(out_path, e))?;
        hasher.update(&buf[..n]);
        received += n as u64;
        progress.update(received);
    }
    progress.finish(received);
    if let Some(total) = total.filter(|&t| t != received) {
        return Err(fail(format!(
            "the connection closed after {received} of {total} bytes"
        )));
    }
    Ok(hasher.finish())
}

/// Download progress as plain lines (bytes, percentage, rate): they read the same in a terminal,
/// in a notebook's text stream and in its HTML export. At most one line every few seconds.
struct Progress {
    total: Option<u64>,
    start: Instant,
    last: Instant,
}

impl Progress {
    const EVERY: Duration = Duration::from_secs(5);

    fn new(total: Option<u64>) -> Self {
        let now = Instant::now();
        Progress {
            total,
            start: now,
            last: now,
        }
    }

    fn line(&self, received: u64) -> String {
        let secs = self.start.elapsed().as_secs_f64().max(1e-3);
        let rate = received as f64 / secs / 1e6;
        match self.total {
            Some(t) if t > 0 => format!(
                "  {:.1} / {:.1} MB ({:.0}%), {rate:.1} MB/s",
                received as f64 / 1e6,
                t as f64 / 1e6,
                100.0 * received as f64 / t as f64
            ),
            _ => format!("  {:.1} MB, {rate:.1} MB/s", received as f64 / 1e6),
        }
    }

    fn update(&mut self, received: u64) {
        if self.last.elapsed() >= Self::EVERY {
            self.last = Instant::now();
            println!("{}", self.line(received));
        }
    }

    fn finish(&self, received: u64) {
        if self.start.elapsed() >= Self::EVERY {
            println!("{}", self.line(received));
        }
    }
}

/// Downloads and extracts a zip or tar.gz data set; returns the extracted folder (d2l's
/// `download_extract`: `../data/hotdog` for `"hotdog"`). Extracts once: a marker beside the
/// archive records its SHA-1, and a later call with the same archive does nothing. Where the
/// offline stand-in is in force ([`Settings::auto`](crate::Settings::auto)), `"hotdog"` is its
/// generated set instead.
pub fn download_extract(name: &str) -> Result<PathBuf> {
    if let Some(stand_in) = crate::offline::data_set(name) {
        return stand_in;
    }
    let (archive, sha1) = download_checked(name)?;
    extract_known(&archive, sha1)
}

/// Extracts `archive` (`.zip`, `.tar.gz` or `.tgz`) into its own folder, once; returns the folder
/// named like the archive (`hotdog.zip` -> `hotdog`).
pub fn extract(archive: &Path) -> Result<PathBuf> {
    extract_known(archive, digest_file(archive)?.sha1)
}

/// [`extract`] of an archive whose SHA-1 is already known (hashing a large archive takes time).
fn extract_known(archive: &Path, sha1: String) -> Result<PathBuf> {
    let name = archive
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let (stem, kind) = if let Some(stem) = name.strip_suffix(".zip") {
        (stem, ArchiveKind::Zip)
    } else if let Some(stem) = name
        .strip_suffix(".tar.gz")
        .or_else(|| name.strip_suffix(".tgz"))
    {
        (stem, ArchiveKind::TarGz)
    } else {
        return Err(Error::Invalid(format!(
            "{}: only zip and tar.gz archives can be extracted",
            archive.display()
        )));
    };
    let base = archive
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let target = base.join(stem);
    let marker = base.join(format!("{name}.extracted"));
    if target.is_dir() && fs::read_to_string(&marker).is_ok_and(|m| m.trim() == sha1) {
        return Ok(target);
    }

    // Extract into a fresh folder beside the target, then move the result into place.
    let staging = tempfile::Builder::new()
        .prefix(&format!(".{stem}.extracting."))
        .tempdir_in(base)
        .map_err(|e| Error::io(base, e))?;
    let limit = std::env::var("D2L_MAX_EXTRACT_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(MAX_EXTRACT_BYTES);
    let mut budget = Budget {
        archive,
        left: limit,
        limit,
    };
    match kind {
        ArchiveKind::Zip => extract_zip(archive, staging.path(), &mut budget)?,
        ArchiveKind::TarGz => extract_tar_gz(archive, staging.path(), &mut budget)?,
    }
    // An archive of one top folder named like it (hotdog.zip -> hotdog/...) gives that folder;
    // any other layout is kept whole under the archive's name.
    let inner = staging.path().join(stem);
    let single = fs::read_dir(staging.path())
        .map_err(|e| Error::io(staging.path(), e))?
        .count()
        == 1
        && inner.is_dir();
    let _ = fs::remove_file(&marker);
    if target.exists() {
        fs::remove_dir_all(&target).map_err(|e| Error::io(&target, e))?;
    }
    if single {
        fs::rename(&inner, &target).map_err(|e| Error::io(&target, e))?;
    } else {
        let kept = staging.keep();
        fs::rename(&kept, &target).map_err(|e| Error::io(&target, e))?;
    }
    fs::write(&marker, format!("{sha1}\n")).map_err(|e| Error::io(&marker, e))?;
    Ok(target)
}

enum ArchiveKind {
    Zip,
    TarGz,
}

/// Bytes an extraction may still write.
struct Budget<'a> {
    archive: &'a Path,
    left: u64,
    limit: u64,
}

impl Budget<'_> {
    /// Copies one entry, failing once the archive has expanded past the limit.
    fn copy(&mut self, entry: &str, from: &mut impl Read, to: &Path) -> Result<()> {
        let mut file = File::create(to).map_err(|e| Error::io(to, e))?;
        let mut limited = from.take(self.left + 1);
        let n = io::copy(&mut limited, &mut file).map_err(|e| self.corrupt(entry, e))?;
        if n > self.left {
            return Err(Error::Archive {
                path: self.archive.to_owned(),
                msg: format!(
                    "expands past {} bytes at {entry:?} (raise D2L_MAX_EXTRACT_BYTES if it is genuine)",
                    self.limit
                ),
            });
        }
        self.left -= n;
        Ok(())
    }

    fn corrupt(&self, entry: &str, e: impl std::fmt::Display) -> Error {
        Error::Archive {
            path: self.archive.to_owned(),
            msg: format!("{entry:?}: {e} (delete the file to download it again)"),
        }
    }
}

/// The path an entry may be written to: relative, with no `..`, no root and no prefix.
fn safe_relative(archive: &Path, entry: &str) -> Result<PathBuf> {
    let path = Path::new(entry);
    let ok = !entry.is_empty()
        && path
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
    if ok {
        Ok(path.to_owned())
    } else {
        Err(Error::UnsafeEntry {
            archive: archive.to_owned(),
            entry: entry.to_owned(),
        })
    }
}

fn extract_zip(archive: &Path, into: &Path, budget: &mut Budget) -> Result<()> {
    let file = File::open(archive).map_err(|e| Error::io(archive, e))?;
    let mut zip =
        zip::ZipArchive::new(file).map_err(|e| budget.corrupt("(central directory)", e))?;
    for i in 0..zip.len() {
        let mut entry = zip
            .by_index(i)
            .map_err(|e| budget.corrupt(&format!("entry {i}"), e))?;
        let name = entry
            .name()
            .map_err(|e| budget.corrupt(&format!("entry {i}"), e))?
            .into_owned();
        let rel = safe_relative(archive, &name)?;
        if entry.is_symlink() {
            // A link could point anywhere: data sets have no reason to hold one.
            return Err(Error::UnsafeEntry {
                archive: archive.to_owned(),
                entry: name,
            });
        }
        let out = into.join(&rel);
        if entry.is_dir() {
            fs::create_dir_all(&out).map_err(|e| Error::io(&out, e))?;
            continue;
        }
        if let Some(dir) = out.parent() {
            fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        budget.copy(&name, &mut entry, &out)?;
    }
    Ok(())
}

fn extract_tar_gz(archive: &Path, into: &Path, budget: &mut Budget) -> Result<()> {
    let file = File::open(archive).map_err(|e| Error::io(archive, e))?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(io::BufReader::new(file)));
    let entries = tar.entries().map_err(|e| budget.corrupt("(header)", e))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| budget.corrupt("(header)", e))?;
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let rel = safe_relative(archive, &name)?;
        let out = into.join(&rel);
        match entry.header().entry_type() {
            tar::EntryType::Directory => {
                fs::create_dir_all(&out).map_err(|e| Error::io(&out, e))?;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                if let Some(dir) = out.parent() {
                    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
                }
                budget.copy(&name, &mut entry, &out)?;
            }
            // pax/GNU metadata headers carry no file.
            tar::EntryType::XGlobalHeader | tar::EntryType::XHeader => {}
            _ => {
                return Err(Error::UnsafeEntry {
                    archive: archive.to_owned(),
                    entry: name,
                })
            }
        }
    }
    Ok(())
}
