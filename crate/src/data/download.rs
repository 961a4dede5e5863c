//! d2l's `DATA_HUB`, `download` and `download_extract`, made safe: every file is checked after it
//! is fetched, written under a temporary name and renamed only when good; archives are extracted
//! once, refusing entries that would land outside the target folder and archive bombs
//! ([`ExtractLimits`]). Processes sharing the data folder take turns ([`crate::files`]).
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};
use std::sync::{LazyLock, RwLock};
use std::time::{Duration, Instant};

use sha1::{Digest, Sha1};
use sha2::Sha256;

use crate::error::{Error, Result};
use crate::files::{available_bytes, env_nonempty, lock, write_atomically, AtomicDir, AtomicFile};

/// Where the book's data sets live (d2l's `DATA_URL`). `D2L_DATA_URL` replaces it (a mirror).
pub const DATA_URL: &str = "http://d2l-data.s3-accelerate.amazonaws.com/";

/// The chapter's data set: `DATA_HUB["hotdog"]`.
const HOTDOG_SHA1: &str = "fba480ffa8aa7e0febbb511d181409f899b9baa5";

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

pub use crate::files::data_dir;

/// `url` with [`DATA_URL`] replaced by the mirror in `D2L_DATA_URL`, if one is set (an empty
/// value is none).
pub fn mirrored(url: &str) -> String {
    match (env_nonempty("D2L_DATA_URL"), url.strip_prefix(DATA_URL)) {
        (Some(mirror), Some(rest)) => format!("{}/{rest}", mirror.trim_end_matches('/')),
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
    let (url, sha1) = DATA_HUB.get(name).ok_or_else(|| Error::UnknownDataset {
        name: name.to_owned(),
        known: DATA_HUB.names(),
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
/// good file, and nothing is left behind on failure. Processes fetching the same path take
/// turns ([`crate::files::lock`]): one downloads, the others then find the file.
pub fn fetch(url: &str, path: &Path, checksum: &Checksum) -> Result<()> {
    if path.is_file() && checksum.matches(&digest_file(path)?) {
        return Ok(());
    }
    let _lock = lock(path)?;
    if path.is_file() && checksum.matches(&digest_file(path)?) {
        return Ok(());
    }
    println!("Downloading {} from {url}...", path.display());
    let mut tmp = AtomicFile::create(path)?;
    let digest = http_get_to(url, tmp.file(), path)?;
    if !checksum.matches(&digest) {
        return Err(Error::Checksum {
            url: url.to_owned(),
            expected: checksum.expected(),
            actual: checksum.actual(&digest),
        });
    }
    tmp.commit()?;
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
    extract_known(&archive, sha1, ExtractLimits::from_env()?)
}

/// Extracts `archive` (`.zip`, `.tar.gz` or `.tgz`) into its own folder, once; returns the folder
/// named like the archive (`hotdog.zip` -> `hotdog`). The [`ExtractLimits`] in force (from the
/// environment) bound what it may write.
pub fn extract(archive: &Path) -> Result<PathBuf> {
    extract_known(
        archive,
        digest_file(archive)?.sha1,
        ExtractLimits::from_env()?,
    )
}

/// [`extract`] with the given bounds in place of the environment's.
pub fn extract_with(archive: &Path, limits: ExtractLimits) -> Result<PathBuf> {
    extract_known(archive, digest_file(archive)?.sha1, limits)
}

/// Bounds on what extracting an archive may write, so that an archive bomb is refused before it
/// fills the disk. Each has an environment variable; a genuinely larger archive needs it raised.
///
/// - `max_bytes` (`D2L_MAX_EXTRACT_BYTES`, default 4 GiB; `64MiB`, `2GiB` and plain bytes are
///   understood): all entries together.
/// - `max_ratio` (`D2L_MAX_EXTRACT_RATIO`, default 100, as Apache POI's `ZipSecureFile`): how
///   many times its compressed size an entry of a zip may expand to (entries above 1 MiB), and
///   the whole archive (above 64 MiB in all). JPEGs barely compress: `hotdog.zip` is about 1x.
/// - `max_files` (`D2L_MAX_EXTRACT_FILES`, default 1,000,000): entries, files and folders.
///
/// Besides: a zip entry that holds more bytes than its header declares is refused (a bomb's
/// trick to slip past checks of the declared sizes), the disk must have room for what the
/// archive declares before anything is written, and archives inside the archive are written as
/// files, never extracted in turn.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ExtractLimits {
    pub max_bytes: u64,
    pub max_ratio: f64,
    pub max_files: u64,
}

impl Default for ExtractLimits {
    fn default() -> Self {
        ExtractLimits {
            max_bytes: 4 << 30,
            max_ratio: 100.0,
            max_files: 1_000_000,
        }
    }
}

/// Entries up to this size are not held to the ratio (a small file of zeros compresses well).
const ENTRY_RATIO_GRACE: u64 = 1 << 20;
/// Archives expanding to at most this much in all are not held to the ratio.
const TOTAL_RATIO_GRACE: u64 = 64 << 20;
/// What a file or folder costs on disk at least (one block), for the free-space check.
const BLOCK: u64 = 4096;

impl ExtractLimits {
    /// The defaults, with `D2L_MAX_EXTRACT_BYTES`, `D2L_MAX_EXTRACT_RATIO` and
    /// `D2L_MAX_EXTRACT_FILES` applied; a value that does not parse is an error naming it.
    pub fn from_env() -> Result<Self> {
        let mut limits = ExtractLimits::default();
        if let Some(v) = env_nonempty("D2L_MAX_EXTRACT_BYTES") {
            limits.max_bytes = parse_bytes(&v).ok_or_else(|| {
                Error::arg(
                    "D2L_MAX_EXTRACT_BYTES",
                    format!("{v:?} is not a size: give bytes, or a number with KiB, MiB or GiB"),
                )
            })?;
        }
        if let Some(v) = env_nonempty("D2L_MAX_EXTRACT_RATIO") {
            limits.max_ratio = v
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|r| r.is_finite() && *r >= 1.0)
                .ok_or_else(|| {
                    Error::arg(
                        "D2L_MAX_EXTRACT_RATIO",
                        format!("{v:?} is not a ratio: give a number of at least 1, such as 100"),
                    )
                })?;
        }
        if let Some(v) = env_nonempty("D2L_MAX_EXTRACT_FILES") {
            limits.max_files = v.trim().parse().map_err(|_| {
                Error::arg(
                    "D2L_MAX_EXTRACT_FILES",
                    format!("{v:?} is not a count of entries"),
                )
            })?;
        }
        Ok(limits)
    }
}

/// `1234`, `64MiB`, `2 GiB`, `10k`, `1.5G` -> bytes (K, M, G are binary, as `ls -h` reads).
fn parse_bytes(v: &str) -> Option<u64> {
    let v = v.trim();
    let split = v
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    let num: f64 = num.parse().ok()?;
    let scale = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1u64,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return None,
    };
    let bytes = num * scale as f64;
    (bytes.is_finite() && bytes >= 0.0).then_some(bytes as u64)
}

/// [`extract`] of an archive whose SHA-1 is already known (hashing a large archive takes time).
fn extract_known(archive: &Path, sha1: String, limits: ExtractLimits) -> Result<PathBuf> {
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
        return Err(Error::UnsupportedArchive {
            path: archive.to_owned(),
        });
    };
    let base = archive
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let target = base.join(stem);
    let marker = base.join(format!("{name}.extracted"));
    let done = || target.is_dir() && fs::read_to_string(&marker).is_ok_and(|m| m.trim() == sha1);
    if done() {
        return Ok(target);
    }
    // One process extracts; the others wait, then find it done.
    let _lock = lock(&target)?;
    if done() {
        return Ok(target);
    }
    let staging = AtomicDir::create(&target)?;
    let mut out = Extraction {
        archive,
        archive_len: fs::metadata(archive)
            .map_err(|e| Error::io(archive, e))?
            .len(),
        limits,
        into: staging.path(),
        target: &target,
        written: 0,
        entries: 0,
    };
    match kind {
        ArchiveKind::Zip => out.zip()?,
        ArchiveKind::TarGz => out.tar_gz()?,
    }
    // An archive of one top folder named like it (hotdog.zip -> hotdog/...) gives that folder;
    // any other layout is kept whole under the archive's name.
    let single = fs::read_dir(staging.path())
        .map_err(|e| Error::io(staging.path(), e))?
        .count()
        == 1
        && staging.path().join(stem).is_dir();
    // No marker while the folder changes: a kill in between makes the next call extract again.
    match fs::remove_file(&marker) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(Error::io(&marker, e)),
        _ => {}
    }
    staging.commit(single.then_some(Path::new(stem)))?;
    write_atomically(&marker, format!("{sha1}\n").as_bytes())?;
    Ok(target)
}

enum ArchiveKind {
    Zip,
    TarGz,
}

/// One extraction in progress: where it writes, and what it has written against its bounds.
struct Extraction<'a> {
    archive: &'a Path,
    archive_len: u64,
    limits: ExtractLimits,
    into: &'a Path,
    /// The folder being made (errors name it, not the temporary `into`).
    target: &'a Path,
    written: u64,
    entries: u64,
}

impl Extraction<'_> {
    fn refuse(&self, entry: Option<&str>, what: String, setting: Option<&'static str>) -> Error {
        Error::ExtractLimit {
            archive: self.archive.to_owned(),
            entry: entry.map(str::to_owned),
            what,
            setting,
        }
    }

    fn lie(&self, entry: &str, declared: u64) -> Error {
        self.refuse(
            Some(entry),
            format!("it holds more than the {declared} bytes its header declares (a bomb's trick; genuine archives do not)"),
            None,
        )
    }

    fn corrupt(&self, entry: &str, e: impl std::fmt::Display) -> Error {
        Error::Archive {
            path: self.archive.to_owned(),
            msg: format!("{entry:?}: {e} (delete the file to download it again)"),
        }
    }

    /// The most the whole archive may expand to by the ratio bound.
    fn ratio_bound(&self) -> u64 {
        ((self.archive_len as f64 * self.limits.max_ratio) as u64).max(TOTAL_RATIO_GRACE)
    }

    /// Counts one more entry against `max_files`.
    fn count_entry(&mut self, entry: &str) -> Result<()> {
        self.entries += 1;
        if self.entries > self.limits.max_files {
            return Err(self.refuse(
                Some(entry),
                format!(
                    "more than {} entries (a file-count bomb?)",
                    self.limits.max_files
                ),
                Some("D2L_MAX_EXTRACT_FILES"),
            ));
        }
        Ok(())
    }

    /// Checks that `declared` more bytes fit the bounds and the disk, before writing them.
    fn admit(&self, entry: &str, declared: u64) -> Result<()> {
        let total = self.written.saturating_add(declared);
        if total > self.limits.max_bytes {
            return Err(self.refuse(
                Some(entry),
                format!("it expands past {} bytes in all", self.limits.max_bytes),
                Some("D2L_MAX_EXTRACT_BYTES"),
            ));
        }
        if total > self.ratio_bound() {
            return Err(self.refuse(
                Some(entry),
                format!(
                    "it expands past {}x its {} compressed bytes",
                    self.limits.max_ratio, self.archive_len
                ),
                Some("D2L_MAX_EXTRACT_RATIO"),
            ));
        }
        self.check_space(declared.saturating_add(BLOCK))
    }

    fn check_space(&self, needed: u64) -> Result<()> {
        match available_bytes(self.into) {
            Some(available) if available < needed => Err(Error::NoSpace {
                path: self.target.to_owned(),
                needed,
                available,
            }),
            _ => Ok(()),
        }
    }

    /// Writes one entry of `declared` bytes from `from` to `to`: exactly that many, or an error
    /// (more is a bomb's lie, fewer a cut archive). Read errors are the archive's, write errors
    /// the disk's.
    fn write_entry(
        &mut self,
        entry: &str,
        declared: u64,
        from: &mut impl Read,
        to: &Path,
    ) -> Result<()> {
        self.admit(entry, declared)?;
        // Errors name the file as it would be in the target folder.
        let shown = self.target.join(to.strip_prefix(self.into).unwrap_or(to));
        let mut file = File::create(to).map_err(|e| Error::io(&shown, e))?;
        let mut buf = vec![0u8; 1 << 16];
        let mut n = 0u64;
        loop {
            let got = match from.read(&mut buf) {
                Ok(0) => break,
                Ok(got) => got,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // The zip reader stops an entry at its declared size itself: the same lie.
                Err(e) if e.to_string().contains("larger than its declared") => {
                    return Err(self.lie(entry, declared))
                }
                Err(e) => return Err(self.corrupt(entry, e)),
            };
            n += got as u64;
            if n > declared {
                return Err(self.lie(entry, declared));
            }
            file.write_all(&buf[..got])
                .map_err(|e| Error::io(&shown, e))?;
        }
        if n < declared {
            return Err(self.corrupt(
                entry,
                format!("{n} bytes where its header declares {declared}"),
            ));
        }
        self.written += n;
        Ok(())
    }

    fn zip(&mut self) -> Result<()> {
        let file = File::open(self.archive).map_err(|e| Error::io(self.archive, e))?;
        let mut zip =
            zip::ZipArchive::new(file).map_err(|e| self.corrupt("(central directory)", e))?;
        self.check_zip_directory(&mut zip)?;
        for i in 0..zip.len() {
            let mut entry = zip
                .by_index(i)
                .map_err(|e| self.corrupt(&format!("entry {i}"), e))?;
            let name = entry
                .name()
                .map_err(|e| self.corrupt(&format!("entry {i}"), e))?
                .into_owned();
            let rel = safe_relative(self.archive, &name)?;
            if entry.is_symlink() {
                // A link could point anywhere: data sets have no reason to hold one.
                return Err(Error::UnsafeEntry {
                    archive: self.archive.to_owned(),
                    entry: name,
                });
            }
            self.count_entry(&name)?;
            let out = self.into.join(&rel);
            if entry.is_dir() {
                fs::create_dir_all(&out).map_err(|e| Error::io(&out, e))?;
                continue;
            }
            if let Some(dir) = out.parent() {
                fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
            }
            let declared = entry.size();
            self.write_entry(&name, declared, &mut entry, &out)?;
        }
        Ok(())
    }

    /// The zip's central directory against the bounds, before anything is written: entry
    /// count, each entry's and the whole archive's expansion, the total, and the disk's room.
    fn check_zip_directory(&self, zip: &mut zip::ZipArchive<File>) -> Result<()> {
        let count = zip.len() as u64;
        if count > self.limits.max_files {
            return Err(self.refuse(
                None,
                format!(
                    "it has {count} entries, more than {} (a file-count bomb?)",
                    self.limits.max_files
                ),
                Some("D2L_MAX_EXTRACT_FILES"),
            ));
        }
        let mut total = 0u64;
        for i in 0..zip.len() {
            let entry = zip
                .by_index_raw(i)
                .map_err(|e| self.corrupt(&format!("entry {i}"), e))?;
            let (size, packed) = (entry.size(), entry.compressed_size());
            let name = entry.name().map(|n| n.into_owned()).unwrap_or_default();
            if size > ENTRY_RATIO_GRACE
                && size as f64 > self.limits.max_ratio * packed.max(1) as f64
            {
                return Err(self.refuse(
                    Some(&name),
                    format!(
                        "it expands {packed} bytes to {size}, {:.0}x, more than {}x",
                        size as f64 / packed.max(1) as f64,
                        self.limits.max_ratio
                    ),
                    Some("D2L_MAX_EXTRACT_RATIO"),
                ));
            }
            total = total.saturating_add(size);
        }
        if total > self.limits.max_bytes {
            return Err(self.refuse(
                None,
                format!(
                    "its entries declare {total} bytes in all, more than {}",
                    self.limits.max_bytes
                ),
                Some("D2L_MAX_EXTRACT_BYTES"),
            ));
        }
        if total > self.ratio_bound() {
            return Err(self.refuse(
                None,
                format!(
                    "its entries declare {total} bytes in all, {:.0}x its {} bytes (entries that share data?), more than {}x",
                    total as f64 / self.archive_len.max(1) as f64,
                    self.archive_len,
                    self.limits.max_ratio
                ),
                Some("D2L_MAX_EXTRACT_RATIO"),
            ));
        }
        self.check_space(total.saturating_add(count.saturating_mul(BLOCK)))
    }

    fn tar_gz(&mut self) -> Result<()> {
        // gzip's trailer holds the expanded size modulo 4 GiB: a first guess for the disk check
        // (it can lie; the bounds below hold as the bytes come).
        self.check_space(gzip_isize(self.archive).unwrap_or(0))?;
        let file = File::open(self.archive).map_err(|e| Error::io(self.archive, e))?;
        let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(io::BufReader::new(file)));
        let entries = tar.entries().map_err(|e| self.corrupt("(header)", e))?;
        for entry in entries {
            let mut entry = entry.map_err(|e| self.corrupt("(header)", e))?;
            let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            let rel = safe_relative(self.archive, &name)?;
            let out = self.into.join(&rel);
            match entry.header().entry_type() {
                tar::EntryType::Directory => {
                    self.count_entry(&name)?;
                    fs::create_dir_all(&out).map_err(|e| Error::io(&out, e))?;
                }
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    self.count_entry(&name)?;
                    if let Some(dir) = out.parent() {
                        fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
                    }
                    let declared = entry.size();
                    self.write_entry(&name, declared, &mut entry, &out)?;
                }
                // pax/GNU metadata headers carry no file.
                tar::EntryType::XGlobalHeader | tar::EntryType::XHeader => {}
                _ => {
                    return Err(Error::UnsafeEntry {
                        archive: self.archive.to_owned(),
                        entry: name,
                    })
                }
            }
        }
        Ok(())
    }
}

/// gzip's ISIZE: the last 4 bytes, the expanded size modulo 2^32.
fn gzip_isize(path: &Path) -> Option<u64> {
    use std::io::{Seek, SeekFrom};
    let mut f = File::open(path).ok()?;
    f.seek(SeekFrom::End(-4)).ok()?;
    let mut b = [0u8; 4];
    f.read_exact(&mut b).ok()?;
    Some(u32::from_le_bytes(b) as u64)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_like_a_person_writes_them() {
        assert_eq!(parse_bytes("1500000"), Some(1_500_000));
        assert_eq!(parse_bytes("64MiB"), Some(64 << 20));
        assert_eq!(parse_bytes("2 GiB"), Some(2 << 30));
        assert_eq!(parse_bytes("10k"), Some(10 << 10));
        assert_eq!(parse_bytes("1.5G"), Some(3 << 29));
        assert_eq!(parse_bytes("lots"), None);
        assert_eq!(parse_bytes("5 parsecs"), None);
    }
}
