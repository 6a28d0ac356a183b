//! Customer exports: their state and files, injected failures and the completion delay.

use std::time::Duration;

use super::Simulator;
use crate::exports::SimExport;

impl Simulator {
    /// Every export, by id (those whose time has come are completed first).
    pub fn exports(&self) -> Vec<SimExport> {
        self.with_world(|w| {
            w.settle_exports();
            w.exports.snapshots()
        })
    }

    /// The CSV file of a done export.
    pub fn export_csv(&self, id: i64) -> Option<String> {
        self.with_world(|w| {
            w.settle_exports();
            w.exports
                .csv(id)
                .map(|b| String::from_utf8_lossy(&b).into_owned())
        })
    }

    /// Makes the next `count` exports fail (`failed: true`, never downloadable) instead of
    /// completing; 0 cancels.
    pub fn fail_next_exports(&self, count: u32) {
        self.with_world(|w| w.exports.fail_next(count));
    }

    /// Exports still set to fail.
    pub fn export_failures_queued(&self) -> u32 {
        self.with_world(|w| w.exports.failures_queued())
    }

    /// How long exports created from now on take to complete on the simulator's clock.
    pub fn set_export_delay(&self, delay: Duration) {
        self.with_world(|w| w.exports.set_delay(delay));
    }

    /// Current export delay.
    pub fn export_delay(&self) -> Duration {
        self.with_world(|w| w.exports.delay())
    }
}
