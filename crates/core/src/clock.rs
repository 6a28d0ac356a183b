//! [`Clock`]: where core reads the time. Production uses the system clock; tests use a
//! [`Clock::adjustable`] one and move it forward instead of sleeping.
//!
//! The database layer never reads the time itself: every query that compares times takes `now`
//! from here, so one process sees one consistent time.

use std::sync::{
    Arc,
    atomic::{AtomicI64, Ordering},
};

use chrono::{DateTime, TimeDelta, Utc};

/// The time source of an [`crate::AppContext`]. Cheap to clone; clones share the time.
#[derive(Clone, Debug)]
pub struct Clock {
    /// Milliseconds added to the system time (always 0 for [`Clock::system`]).
    offset_ms: Arc<AtomicI64>,
    adjustable: bool,
}

impl Clock {
    /// The system clock.
    pub fn system() -> Self {
        Self {
            offset_ms: Arc::new(AtomicI64::new(0)),
            adjustable: false,
        }
    }

    /// A clock that runs with the system clock and can be moved forward with
    /// [`Clock::advance`]: code waiting on real timers keeps working while times compared in the
    /// database jump ahead.
    pub fn adjustable() -> Self {
        Self {
            offset_ms: Arc::new(AtomicI64::new(0)),
            adjustable: true,
        }
    }

    /// Now.
    pub fn now(&self) -> DateTime<Utc> {
        let offset = self.offset_ms.load(Ordering::Relaxed);
        #[allow(clippy::disallowed_methods)] // the one place core reads the system time
        let system = Utc::now();
        system + TimeDelta::milliseconds(offset)
    }

    /// Moves an [`Clock::adjustable`] clock forward by `by` (a system clock ignores it and logs
    /// a warning: production time never jumps).
    pub fn advance(&self, by: std::time::Duration) {
        if !self.adjustable {
            tracing::warn!("advance() on the system clock is ignored");
            return;
        }
        let ms = i64::try_from(by.as_millis()).unwrap_or(i64::MAX);
        self.offset_ms.fetch_add(ms, Ordering::Relaxed);
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::system()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_adjustable_clock_jumps_and_its_clones_follow() {
        let clock = Clock::adjustable();
        let copy = clock.clone();
        let before = clock.now();
        clock.advance(std::time::Duration::from_secs(3600));
        let after = copy.now();
        assert!(
            after - before >= TimeDelta::seconds(3600),
            "{before} → {after}"
        );
        assert!(after - before < TimeDelta::seconds(3660));
    }

    #[test]
    fn the_system_clock_does_not_jump() {
        let clock = Clock::system();
        let before = clock.now();
        clock.advance(std::time::Duration::from_secs(3600));
        assert!(clock.now() - before < TimeDelta::seconds(60));
    }
}
