//! Freed memory kept in the process while loading and training on the CPU.
//!
//! glibc's `malloc` serves blocks over 32 MiB (and, until its threshold adapts, over 128 KiB)
//! with a fresh `mmap` and gives them back with `munmap` when freed. A training step allocates
//! and frees the same activations and gradients every time (at 224 px and batch 32 the first
//! stage's are 100 MiB each), and the loader a few 0.1-1 MB buffers a sample, so the kernel maps,
//! faults in and zeroes them again, page by page: on a 2-core AMD EPYC that was a quarter of a
//! 224 px step (9.8-10.4 img/s against 13.7 with the memory kept) and a tenth at 64 px; for the
//! loader alone, 640 against 1000 images/s, from nothing more than where glibc's adaptive
//! threshold happened to settle. [`keep_freed_memory`] tells glibc to serve every block from its
//! heaps and never to trim them: a freed block is reused by the next step or sample. (An earlier
//! version set `M_MMAP_THRESHOLD` to 64 MiB, which glibc refuses above 32 MiB; its trim setting
//! still turned the adaptive threshold off, pinning it at 128 KiB: every activation was mapped
//! afresh each step once a loader had started.)
//! (PyTorch's CPU tuning guide gets the same by preloading jemalloc or tcmalloc.) The process
//! keeps its high-water mark of memory until it ends, which it reaches during training anyway.
use std::sync::OnceLock;

/// Asks glibc's allocator to keep freed memory for reuse (no `mmap` for large blocks, no trimming
/// of the heap), once per process; [`train_ch13`](super::train_ch13) and each epoch of a
/// [`DataLoader`](crate::data::DataLoader) call it. Returns whether
/// the setting is in effect: `false` with another C library, or when `D2L_KEEP_FREED_MEMORY=0`
/// is set (glibc's defaults, for comparison).
pub fn keep_freed_memory() -> bool {
    static APPLIED: OnceLock<bool> = OnceLock::new();
    *APPLIED.get_or_init(|| {
        std::env::var("D2L_KEEP_FREED_MEMORY").map_or(true, |v| v.trim() != "0") && apply()
    })
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn apply() -> bool {
    // SAFETY: mallopt only changes the allocator's parameters; it is safe to call at any time.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX) == 1
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn apply() -> bool {
    false
}
