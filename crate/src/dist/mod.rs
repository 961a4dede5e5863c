//! `torch.distributed` for d2l: processes, on one machine or several, that train one model
//! together. The engine is libtorch's own c10d (a `TCPStore` rendezvous, Gloo on the CPU, NCCL on
//! CUDA), reached through a small C++ shim (`shim.cpp`) that `build.rs` compiles against the
//! installed libtorch.
//!
//! ```no_run
//! // Under `torchrun --nproc-per-node 2 ...` (or with MASTER_ADDR, MASTER_PORT, RANK and
//! // WORLD_SIZE set by hand):
//! let group = d2l::dist::ProcessGroup::from_env()?.expect("not launched by torchrun");
//! let t = d2l::tch::Tensor::from_slice(&[group.rank() as f32 + 1.0]);
//! group.all_reduce(&[&t], d2l::dist::ReduceOp::Sum)?; // 1 + 2 = 3 on both ranks
//! # Ok::<(), d2l::Error>(())
//! ```
//!
//! Every collective waits at most the group's timeout: a rank that died or never came makes the
//! others fail with [`Error::Distributed`] instead of hanging.
use std::ffi::{c_char, c_void, CString};
use std::time::Duration;

use tch::{Device, Tensor};

use crate::error::{Error, Result};
use crate::files::env_nonempty;

/// Which c10d backend a group uses: Gloo (CPU tensors) or NCCL (CUDA tensors).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Gloo,
    Nccl,
}

impl Backend {
    /// NCCL where the tensors live on CUDA and this build has it, else Gloo (what PyTorch picks
    /// for `init_process_group()` without a backend).
    pub fn for_device(device: Device) -> Backend {
        if device.is_cuda() && has_nccl() {
            Backend::Nccl
        } else {
            Backend::Gloo
        }
    }

    fn name(self) -> &'static str {
        match self {
            Backend::Gloo => "gloo",
            Backend::Nccl => "nccl",
        }
    }
}

/// How [`ProcessGroup::all_reduce`] combines the ranks' tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    /// The sum divided by the world size.
    Avg,
    Max,
}

/// How to join a group: torchrun's environment, or given by hand.
#[derive(Clone, Debug, PartialEq)]
pub struct InitOptions {
    /// Where rank 0 serves the rendezvous store (`MASTER_ADDR`).
    pub master_addr: String,
    /// Its port (`MASTER_PORT`).
    pub master_port: u16,
    /// This process's rank, `0..world_size` (`RANK`).
    pub rank: usize,
    /// How many processes train together (`WORLD_SIZE`).
    pub world_size: usize,
    /// This process's rank on its machine (`LOCAL_RANK`): its GPU, where there are GPUs.
    pub local_rank: usize,
    pub backend: Backend,
    /// How long the rendezvous and each collective may wait (`D2L_DIST_TIMEOUT`, seconds;
    /// default 300).
    pub timeout: Duration,
}

const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

impl InitOptions {
    /// torchrun's variables (`MASTER_ADDR`, `MASTER_PORT`, `RANK`, `WORLD_SIZE`, `LOCAL_RANK`);
    /// `None` when `WORLD_SIZE` is not set (not launched for distributed training). A value that
    /// does not parse, or a rank outside the world, is an error naming the variable.
    pub fn from_env() -> Result<Option<InitOptions>> {
        let Some(world) = env_nonempty("WORLD_SIZE") else {
            return Ok(None);
        };
        let bad = |var: &'static str, v: &str, want: &str| {
            Error::arg(var, format!("{v:?} is not {want} (torchrun sets it)"))
        };
        let number = |var: &'static str| -> Result<Option<usize>> {
            env_nonempty(var)
                .map(|v| {
                    v.trim()
                        .parse::<usize>()
                        .map_err(|_| bad(var, &v, "a count"))
                })
                .transpose()
        };
        let world_size = world
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|&w| w >= 1)
            .ok_or_else(|| bad("WORLD_SIZE", &world, "a number of processes, 1 or more"))?;
        let rank = number("RANK")?.ok_or_else(|| {
            Error::arg(
                "RANK",
                "WORLD_SIZE is set but RANK is not (launch with torchrun)",
            )
        })?;
        let local_rank = number("LOCAL_RANK")?.unwrap_or(rank);
        let master_addr = env_nonempty("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into());
        let master_port = match env_nonempty("MASTER_PORT") {
            Some(v) => v
                .trim()
                .parse::<u16>()
                .map_err(|_| bad("MASTER_PORT", &v, "a TCP port"))?,
            None => 29500,
        };
        let timeout = match env_nonempty("D2L_DIST_TIMEOUT") {
            Some(v) => v
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|s| *s > 0.0 && s.is_finite())
                .map(Duration::from_secs_f64)
                .ok_or_else(|| bad("D2L_DIST_TIMEOUT", &v, "a number of seconds"))?,
            None => DEFAULT_TIMEOUT,
        };
        let device = crate::try_gpu(local_rank);
        let opts = InitOptions {
            master_addr,
            master_port,
            rank,
            world_size,
            local_rank,
            backend: Backend::for_device(device),
            timeout,
        };
        opts.check()?;
        Ok(Some(opts))
    }

    fn check(&self) -> Result<()> {
        if self.world_size == 0 || self.rank >= self.world_size {
            return Err(Error::arg(
                "init_process_group",
                format!(
                    "rank {} is outside a world of {} processes (RANK must be below WORLD_SIZE)",
                    self.rank, self.world_size
                ),
            ));
        }
        Ok(())
    }
}

/// One process's membership of a group: the rendezvous store and the backend.
pub struct ProcessGroup {
    ptr: *mut c_void,
    opts: InitOptions,
}

// SAFETY: c10d's process groups are made to be called from any thread (PyTorch's DDP calls them
// from autograd's threads); the pointer is owned and freed once.
unsafe impl Send for ProcessGroup {}
unsafe impl Sync for ProcessGroup {}

#[cfg(d2l_dist)]
mod ffi {
    use super::*;
    extern "C" {
        pub fn d2l_dist_has_nccl() -> i32;
        #[allow(clippy::too_many_arguments)]
        pub fn d2l_dist_init(
            host: *const c_char,
            port: i32,
            rank: i32,
            world_size: i32,
            backend: i32,
            timeout_ms: i64,
            is_server: i32,
            prefix: *const c_char,
            iface: *const c_char,
            bind_host: *const c_char,
            err: *mut c_char,
            err_len: usize,
        ) -> *mut c_void;
        pub fn d2l_dist_free(g: *mut c_void);
        pub fn d2l_dist_all_reduce(
            g: *mut c_void,
            ts: *const *const c_void,
            n: i32,
            op: i32,
            err: *mut c_char,
            err_len: usize,
        ) -> i32;
        pub fn d2l_dist_broadcast(
            g: *mut c_void,
            ts: *const *const c_void,
            n: i32,
            root: i32,
            err: *mut c_char,
            err_len: usize,
        ) -> i32;
        pub fn d2l_dist_barrier(g: *mut c_void, err: *mut c_char, err_len: usize) -> i32;
    }
}

/// Without the shim (no gloo headers at build time): the same functions, failing, so that the
/// code above them is one path; `ProcessGroup::init` says what to install before calling them.
#[cfg(not(d2l_dist))]
#[allow(clippy::too_many_arguments, clippy::missing_safety_doc)]
mod ffi {
    use super::*;
    pub unsafe fn d2l_dist_has_nccl() -> i32 {
        0
    }
    pub unsafe fn d2l_dist_init(
        _: *const c_char,
        _: i32,
        _: i32,
        _: i32,
        _: i32,
        _: i64,
        _: i32,
        _: *const c_char,
        _: *const c_char,
        _: *const c_char,
        _: *mut c_char,
        _: usize,
    ) -> *mut c_void {
        std::ptr::null_mut()
    }
    pub unsafe fn d2l_dist_free(_: *mut c_void) {}
    pub unsafe fn d2l_dist_all_reduce(
        _: *mut c_void,
        _: *const *const c_void,
        _: i32,
        _: i32,
        _: *mut c_char,
        _: usize,
    ) -> i32 {
        1
    }
    pub unsafe fn d2l_dist_broadcast(
        _: *mut c_void,
        _: *const *const c_void,
        _: i32,
        _: i32,
        _: *mut c_char,
        _: usize,
    ) -> i32 {
        1
    }
    pub unsafe fn d2l_dist_barrier(_: *mut c_void, _: *mut c_char, _: usize) -> i32 {
        1
    }
}

/// Whether this build of d2l has `d2l::dist` (gloo's headers were there when it was built).
pub fn is_available() -> bool {
    cfg!(d2l_dist)
}

/// Whether this build can use NCCL (built against the CUDA libtorch with NCCL's header).
pub fn has_nccl() -> bool {
    // SAFETY: a constant query.
    unsafe { ffi::d2l_dist_has_nccl() != 0 }
}

/// A buffer for the shim's error text.
struct ErrBuf([u8; 2048]);

impl ErrBuf {
    fn new() -> Self {
        ErrBuf([0; 2048])
    }
    fn ptr(&mut self) -> (*mut c_char, usize) {
        (self.0.as_mut_ptr().cast(), self.0.len())
    }
    fn text(&self) -> String {
        let end = self.0.iter().position(|&b| b == 0).unwrap_or(self.0.len());
        String::from_utf8_lossy(&self.0[..end]).trim().to_owned()
    }
}

fn unavailable() -> Error {
    Error::Unsupported {
        what:
            "d2l::dist (torch.distributed) is not in this build: gloo's headers were missing when \
               d2l was built; install them (apt install libgloo-dev, or python3 scripts/setup.py) \
               and rebuild"
                .into(),
    }
}

impl ProcessGroup {
    /// Joins the group torchrun describes ([`InitOptions::from_env`]); `None` when not launched
    /// for distributed training.
    pub fn from_env() -> Result<Option<ProcessGroup>> {
        InitOptions::from_env()?.map(ProcessGroup::init).transpose()
    }

    /// Joins a group (PyTorch's `init_process_group`): rank 0 serves the store at
    /// `master_addr:master_port`, every rank connects to it, then the backend connects the ranks
    /// to each other. Waits at most `timeout` for all `world_size` ranks.
    pub fn init(opts: InitOptions) -> Result<ProcessGroup> {
        opts.check()?;
        if !is_available() {
            return Err(unavailable());
        }
        let cstr = |what: &str, s: &str| {
            CString::new(s).map_err(|_| {
                Error::arg("init_process_group", format!("{what} {s:?} has a NUL byte"))
            })
        };
        let host = cstr("MASTER_ADDR", &opts.master_addr)?;
        // Gloo binds where GLOO_SOCKET_IFNAME says (as in PyTorch); on one machine, to the
        // loopback address the master is on; else to this machine's hostname's address.
        let iface = cstr(
            "GLOO_SOCKET_IFNAME",
            &env_nonempty("GLOO_SOCKET_IFNAME").unwrap_or_default(),
        )?;
        let local = is_loopback(&opts.master_addr);
        let bind = cstr("bind address", if local { "127.0.0.1" } else { "" })?;
        // Under torchrun, its agent serves the store on MASTER_PORT already (PyTorch's
        // ranks then connect as clients); the restart count keeps each attempt's keys apart.
        let agent_store = env_nonempty("TORCHELASTIC_USE_AGENT_STORE")
            .is_some_and(|v| v.eq_ignore_ascii_case("true"));
        let is_server = opts.rank == 0 && !agent_store;
        let attempt = env_nonempty("TORCHELASTIC_RESTART_COUNT").unwrap_or_else(|| "0".into());
        let prefix = cstr(
            "TORCHELASTIC_RESTART_COUNT",
            &format!("d2l/attempt_{attempt}"),
        )?;
        let mut err = ErrBuf::new();
        let (e, n) = err.ptr();
        // SAFETY: NUL-terminated strings and an error buffer of the given length; the
        // returned pointer is owned by the ProcessGroup and freed in Drop.
        let ptr = unsafe {
            ffi::d2l_dist_init(
                host.as_ptr(),
                opts.master_port as i32,
                opts.rank as i32,
                opts.world_size as i32,
                matches!(opts.backend, Backend::Nccl) as i32,
                opts.timeout.as_millis() as i64,
                is_server as i32,
                prefix.as_ptr(),
                iface.as_ptr(),
                bind.as_ptr(),
                e,
                n,
            )
        };
        if ptr.is_null() {
            return Err(Error::Distributed {
                what: format!(
                    "init_process_group (rank {} of {}, {}, master {}:{}, timeout {:?})",
                    opts.rank,
                    opts.world_size,
                    opts.backend.name(),
                    opts.master_addr,
                    opts.master_port,
                    opts.timeout
                ),
                msg: format!(
                    "{}; check that MASTER_ADDR:MASTER_PORT is reachable from every rank, that all \
                     WORLD_SIZE ranks started, and that the port is free",
                    err.text()
                ),
            });
        }
        Ok(ProcessGroup { ptr, opts })
    }

    pub fn rank(&self) -> usize {
        self.opts.rank
    }

    pub fn world_size(&self) -> usize {
        self.opts.world_size
    }

    pub fn local_rank(&self) -> usize {
        self.opts.local_rank
    }

    pub fn backend(&self) -> Backend {
        self.opts.backend
    }

    pub fn options(&self) -> &InitOptions {
        &self.opts
    }

    /// Combines each tensor across the ranks, in place (every rank gets the result).
    pub fn all_reduce(&self, tensors: &[&Tensor], op: ReduceOp) -> Result<()> {
        let op = match op {
            ReduceOp::Sum => 0,
            ReduceOp::Avg => 1,
            ReduceOp::Max => 2,
        };
        self.collective("all_reduce", tensors, |ptrs, e, n| {
            // SAFETY: live, contiguous tensors; see `collective`.
            unsafe {
                ffi::d2l_dist_all_reduce(self.ptr, ptrs.as_ptr(), ptrs.len() as i32, op, e, n)
            }
        })
    }

    /// Copies rank `root`'s tensors into every other rank's, in place.
    pub fn broadcast(&self, tensors: &[&Tensor], root: usize) -> Result<()> {
        if root >= self.world_size() {
            return Err(Error::arg(
                "broadcast",
                format!("root {root} is outside a world of {}", self.world_size()),
            ));
        }
        self.collective("broadcast", tensors, |ptrs, e, n| {
            // SAFETY: live, contiguous tensors; see `collective`.
            unsafe {
                ffi::d2l_dist_broadcast(
                    self.ptr,
                    ptrs.as_ptr(),
                    ptrs.len() as i32,
                    root as i32,
                    e,
                    n,
                )
            }
        })
    }

    /// Waits until every rank has called it.
    pub fn barrier(&self) -> Result<()> {
        self.collective("barrier", &[], |_, e, n| {
            // SAFETY: an error buffer of the given length.
            unsafe { ffi::d2l_dist_barrier(self.ptr, e, n) }
        })
    }

    /// Runs one shim call over `tensors` (which must be contiguous: c10d reduces flat buffers).
    fn collective(
        &self,
        what: &str,
        tensors: &[&Tensor],
        call: impl FnOnce(&[*const c_void], *mut c_char, usize) -> i32,
    ) -> Result<()> {
        if let Some(t) = tensors.iter().find(|t| !t.is_contiguous()) {
            return Err(Error::arg(
                "d2l::dist",
                format!(
                    "{what}: a tensor of shape {:?} is not contiguous; call .contiguous() first",
                    t.size()
                ),
            ));
        }
        let ptrs: Vec<*const c_void> = tensors.iter().map(|t| t.as_ptr().cast()).collect();
        let mut err = ErrBuf::new();
        let (e, n) = err.ptr();
        if call(&ptrs, e, n) != 0 {
            let msg = if is_available() {
                err.text()
            } else {
                unavailable().to_string()
            };
            return Err(Error::Distributed {
                what: format!("{what} on rank {} of {}", self.rank(), self.world_size()),
                msg: format!(
                    "{msg}; another rank may have stopped (see its output), or it waited past the \
                     timeout of {:?} (D2L_DIST_TIMEOUT)",
                    self.opts.timeout
                ),
            });
        }
        Ok(())
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // SAFETY: made by d2l_dist_init, freed once.
        unsafe { ffi::d2l_dist_free(self.ptr) }
    }
}

impl std::fmt::Debug for ProcessGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessGroup")
            .field("rank", &self.rank())
            .field("world_size", &self.world_size())
            .field("backend", &self.backend())
            .finish()
    }
}

fn is_loopback(host: &str) -> bool {
    host == "localhost" || host.starts_with("127.") || host == "::1"
}

static DEFAULT_GROUP: std::sync::RwLock<Option<std::sync::Arc<ProcessGroup>>> =
    std::sync::RwLock::new(None);

/// PyTorch's `dist.init_process_group()` from torchrun's environment: joins the group and makes
/// it the default one, which `train_ch13` then trains with (each rank its share of every batch,
/// gradients summed across the ranks). Returns `None`, and changes nothing, when the process
/// was not launched for distributed training (no `WORLD_SIZE`), as in a notebook.
pub fn init_process_group() -> Result<Option<std::sync::Arc<ProcessGroup>>> {
    if let Some(group) = default_group() {
        return Ok(Some(group));
    }
    let Some(group) = ProcessGroup::from_env()? else {
        return Ok(None);
    };
    let group = std::sync::Arc::new(group);
    set_default_group(Some(group.clone()));
    Ok(Some(group))
}

/// The default group, if one was set ([`init_process_group`] or [`set_default_group`]).
pub fn default_group() -> Option<std::sync::Arc<ProcessGroup>> {
    DEFAULT_GROUP.read().ok().and_then(|g| g.clone())
}

/// Sets (or with `None`, clears) the default group.
pub fn set_default_group(group: Option<std::sync::Arc<ProcessGroup>>) {
    if let Ok(mut g) = DEFAULT_GROUP.write() {
        *g = group;
    }
}

/// Whether this process prints and writes files for the group: rank 0, or any process
/// outside distributed training.
pub fn is_main_process() -> bool {
    default_group().is_none_or(|g| g.rank() == 0)
}

/// Sends this process's standard output to `/dev/null` unless it is rank 0 (or not in a group),
/// so that a program run on several ranks prints its lines once; errors still go to standard
/// error, on every rank.
pub fn quiet_unless_main() -> Result<()> {
    if is_main_process() {
        return Ok(());
    }
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let null = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/null")
        .map_err(|e| Error::io("/dev/null", e))?;
    use std::os::fd::AsRawFd;
    // SAFETY: duplicates an open descriptor onto standard output.
    if unsafe { libc::dup2(null.as_raw_fd(), libc::STDOUT_FILENO) } < 0 {
        return Err(Error::Os {
            what: "quieting a rank's standard output",
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Runs this program as `nproc` processes on this machine, as
/// `torchrun --standalone --nproc-per-node nproc` would, without Python: each a copy of this
/// executable with `args`, with torchrun's variables (`MASTER_ADDR=127.0.0.1`, a free
/// `MASTER_PORT`, `RANK`, `LOCAL_RANK`, `WORLD_SIZE`, `LOCAL_WORLD_SIZE`). Waits for all; when
/// one fails, stops the others (as torchrun does) and returns its exit status.
pub fn launch(nproc: usize, args: &[std::ffi::OsString]) -> Result<std::process::ExitCode> {
    if nproc == 0 {
        return Err(Error::arg("launch", "--nproc must be at least 1"));
    }
    let exe = std::env::current_exe().map_err(|e| Error::io("current executable", e))?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| Error::io("127.0.0.1 (a free port)", e))?
        .port();
    let mut children = Vec::with_capacity(nproc);
    for rank in 0..nproc {
        let child = std::process::Command::new(&exe)
            .args(args)
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("WORLD_SIZE", nproc.to_string())
            .env("LOCAL_WORLD_SIZE", nproc.to_string())
            .spawn()
            .map_err(|e| Error::io(&exe, e))?;
        children.push(Some(child));
    }
    let mut status = 0u8;
    while children.iter().any(Option::is_some) {
        let mut failed = false;
        for slot in children.iter_mut() {
            let Some(child) = slot else { continue };
            if let Some(s) = child.try_wait().map_err(|e| Error::io(&exe, e))? {
                *slot = None;
                if !s.success() && status == 0 {
                    status = s.code().map_or(1, |c| c.clamp(1, 255) as u8);
                    failed = true;
                }
            }
        }
        if failed {
            // One rank failed: the others cannot finish; stop them.
            for other in children.iter_mut().flatten() {
                let _ = other.kill();
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(std::process::ExitCode::from(status))
}

/// A program's `--nproc N` (or `--nproc=N`): `Some(launch(N, the other arguments))` when given,
/// `None` otherwise (run as one process, or as the rank torchrun started). For `main`:
///
/// ```no_run
/// fn main() -> std::process::ExitCode {
///     if let Some(launched) = d2l::dist::launch_from_args() {
///         return launched.unwrap_or_else(|e| d2l::exit_code(Err(e)));
///     }
///     // ... d2l::dist::init_process_group()?, then the program
///     std::process::ExitCode::SUCCESS
/// }
/// ```
pub fn launch_from_args() -> Option<Result<std::process::ExitCode>> {
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let mut rest = Vec::with_capacity(args.len());
    let mut nproc = None;
    let mut it = args.into_iter();
    while let Some(arg) = it.next() {
        let text = arg.to_string_lossy().into_owned();
        let value = if text == "--nproc" {
            Some(
                it.next()
                    .map(|v| v.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            )
        } else {
            text.strip_prefix("--nproc=").map(str::to_owned)
        };
        match value {
            Some(v) => nproc = Some(v),
            None => rest.push(arg),
        }
    }
    let nproc = nproc?;
    Some(match nproc.trim().parse::<usize>() {
        Ok(n) if n >= 1 => launch(n, &rest),
        _ => Err(Error::arg(
            "--nproc",
            format!("{nproc:?} is not a number of processes (1 or more)"),
        )),
    })
}
