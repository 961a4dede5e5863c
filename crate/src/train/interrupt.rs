//! Stopping training cleanly on Ctrl-C: the first press asks `train_ch13` to stop after the
//! step it is in; a second press ends the process at once. Files the crate writes are written
//! to a temporary name and renamed, so neither way leaves a half-written file behind.
use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{Error, Result};

static STOP: AtomicBool = AtomicBool::new(false);

/// Asks the running `train_ch13` to stop after its current step (what Ctrl-C does once
/// [`install_ctrl_c_handler`] ran).
pub fn request_stop() {
    STOP.store(true, Ordering::SeqCst);
}

/// Whether a stop was asked for and not yet taken.
pub fn stop_requested() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// Takes a pending stop request: true once for each request.
pub(crate) fn take_stop() -> bool {
    STOP.swap(false, Ordering::SeqCst)
}

extern "C" fn on_sigint(_: libc::c_int) {
    if STOP.swap(true, Ordering::SeqCst) {
        // Second Ctrl-C: do what Ctrl-C does by default.
        // SAFETY: signal and raise are async-signal-safe.
        unsafe {
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            libc::raise(libc::SIGINT);
        }
        return;
    }
    let msg = b"\nCtrl-C: stopping after this step (press again to quit at once)\n";
    // SAFETY: write(2) is async-signal-safe; the buffer is valid for its length.
    unsafe {
        libc::write(2, msg.as_ptr().cast(), msg.len());
    }
}

/// Installs a SIGINT handler for command-line programs: the first Ctrl-C makes `train_ch13`
/// return [`Error::Interrupted`] after the step it is in (so the caller can save what it has),
/// a second one quits. In a notebook, the kernel's interrupt ends the cell's process instead.
pub fn install_ctrl_c_handler() -> Result<()> {
    // SAFETY: the handler only touches an atomic and calls async-signal-safe functions.
    let previous =
        unsafe { libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t) };
    if previous == libc::SIG_ERR {
        return Err(Error::Os {
            what: "cannot install the Ctrl-C handler",
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}
