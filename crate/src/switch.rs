//! A process-wide on/off switch whose first reading comes from an environment variable.
use std::os::raw::c_char;
use std::sync::atomic::{AtomicU8, Ordering};

/// The NUL-terminated message a C++ kernel wrote into `err` (text past the buffer is ignored).
pub(crate) fn c_message(err: &[c_char]) -> String {
    let bytes: Vec<u8> = err
        .iter()
        .map(|&c| c as u8)
        .take_while(|&b| b != 0)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// On unless the variable is `0` at the first reading; [`EnvSwitch::set`] overrides it.
pub(crate) struct EnvSwitch {
    /// 0: not yet read, 1: on, 2: off.
    state: AtomicU8,
    var: &'static str,
}

impl EnvSwitch {
    pub(crate) const fn new(var: &'static str) -> EnvSwitch {
        EnvSwitch {
            state: AtomicU8::new(0),
            var,
        }
    }

    pub(crate) fn set(&self, on: bool) {
        self.state.store(if on { 1 } else { 2 }, Ordering::Relaxed);
    }

    /// A kernel behind this switch failed with the NUL-terminated message in `err` (text past
    /// the buffer is ignored): off from now on, and said on stderr once, when it turns off.
    pub(crate) fn turn_off(&self, what: &str, err: &[c_char]) {
        self.turn_off_with(what, &c_message(err));
    }

    /// As [`EnvSwitch::turn_off`], with the message as text.
    pub(crate) fn turn_off_with(&self, what: &str, msg: &str) {
        if self.state.swap(2, Ordering::Relaxed) != 2 {
            eprintln!("d2l: {what} failed ({msg}); using libtorch's from now on");
        }
    }

    pub(crate) fn get(&self) -> bool {
        match self.state.load(Ordering::Relaxed) {
            1 => true,
            2 => false,
            _ => {
                let off = std::env::var(self.var).is_ok_and(|v| v.trim() == "0");
                // Another thread may have set it meanwhile: keep its value.
                let _ = self.state.compare_exchange(
                    0,
                    if off { 2 } else { 1 },
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
                self.state.load(Ordering::Relaxed) == 1
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::EnvSwitch;

    #[test]
    fn the_variable_decides_the_first_reading_and_set_overrides_it() {
        static OFF: EnvSwitch = EnvSwitch::new("D2L_TEST_SWITCH_OFF");
        static ON: EnvSwitch = EnvSwitch::new("D2L_TEST_SWITCH_UNSET");
        // SAFETY: no other test reads or writes this variable.
        unsafe { std::env::set_var("D2L_TEST_SWITCH_OFF", " 0 ") };
        assert!(!OFF.get());
        assert!(ON.get());
        OFF.set(true);
        ON.set(false);
        assert!(OFF.get() && !ON.get());
    }

    #[test]
    fn a_failure_turns_the_switch_off() {
        static KERNEL: EnvSwitch = EnvSwitch::new("D2L_TEST_SWITCH_KERNEL");
        assert!(KERNEL.get());
        let err: Vec<std::os::raw::c_char> = b"boom\0junk".iter().map(|&b| b as _).collect();
        KERNEL.turn_off("the test kernel", &err);
        assert!(!KERNEL.get());
        // Again while off: nothing changes (and nothing more is said).
        KERNEL.turn_off("the test kernel", &err);
        assert!(!KERNEL.get());
    }
}
