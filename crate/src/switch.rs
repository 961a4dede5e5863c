//! A process-wide on/off switch whose first reading comes from an environment variable.
use std::sync::atomic::{AtomicU8, Ordering};

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
}
