//! Reporting webhooks from the simulator's side: configuration, the sender task, the ledger.

use std::sync::Weak;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::{Inner, Simulator, lock};
use crate::webhooks::{self, InvalidWebhook, ReportingWebhook, SimWebhook, Step};

impl Simulator {
    /// Starts sending reporting webhooks to `config.url` for every delivery event that happens
    /// from now on (`None` stops; what was still queued is dropped, the ledger stays). Needs a
    /// tokio runtime: the sender runs as a task on the current one.
    pub fn set_reporting_webhook(
        &self,
        config: Option<ReportingWebhook>,
    ) -> Result<(), InvalidWebhook> {
        if let Some(config) = &config {
            config.validate()?;
        }
        self.with_world(|w| lock(&self.inner.webhooks).configure(w, config));
        self.ensure_webhook_sender();
        self.inner.webhook_wake.notify_one();
        Ok(())
    }

    /// The reporting webhook in use.
    pub fn reporting_webhook(&self) -> Option<ReportingWebhook> {
        lock(&self.inner.webhooks).config().cloned()
    }

    /// Every reported event with its body and attempts, in the order they were queued.
    pub fn webhook_ledger(&self) -> Vec<SimWebhook> {
        self.with_world(|w| {
            w.settle_sends();
            let mut state = lock(&self.inner.webhooks);
            state.collect(w);
            state.ledger()
        })
    }

    /// Events waiting to be delivered (the head included).
    pub fn webhooks_queued(&self) -> usize {
        self.with_world(|w| {
            let mut state = lock(&self.inner.webhooks);
            state.collect(w);
            state.queued()
        })
    }

    /// Waits (at most `timeout`) until nothing is left to send now: every event that has
    /// happened was delivered, or the head waits for a retry later on the simulator's clock
    /// (move it with [`Simulator::advance`]). False on timeout.
    pub async fn webhooks_settled(&self, timeout: Duration) -> bool {
        self.ensure_webhook_sender();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let quiet = self.with_world(|w| {
                w.settle_sends();
                let mut state = lock(&self.inner.webhooks);
                state.collect(w);
                state.quiet(w.sends.now_ms())
            });
            if quiet {
                return true;
            }
            self.inner.webhook_wake.notify_one();
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Starts the sender task once, on the current tokio runtime (if any).
    pub(crate) fn ensure_webhook_sender(&self) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.inner.webhook_sender.swap(true, Ordering::SeqCst) {
            return;
        }
        let weak = std::sync::Arc::downgrade(&self.inner);
        let wake = self.inner.webhook_wake.clone();
        runtime.spawn(sender(weak, wake));
    }
}

/// The sender task: one attempt at a time, the head of the queue first.
async fn sender(inner: Weak<Inner>, wake: std::sync::Arc<tokio::sync::Notify>) {
    // reqwest is built without a TLS provider of its own.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = match reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
    {
        Ok(http) => http,
        Err(err) => {
            tracing::error!(error = %err, "cannot build the reporting webhook client");
            return;
        }
    };
    loop {
        let step = {
            let Some(inner) = inner.upgrade() else {
                return;
            };
            let sim = Simulator { inner };
            sim.with_world(|w| {
                w.settle_sends();
                lock(&sim.inner.webhooks).step(w)
            })
        };
        match step {
            Step::Wait(wait) => {
                tokio::select! {
                    () = wake.notified() => {}
                    () = tokio::time::sleep(wait) => {}
                }
            }
            Step::Send(job) => {
                let outcome = webhooks::attempt(&http, &job).await;
                let Some(inner) = inner.upgrade() else {
                    return;
                };
                let sim = Simulator { inner };
                sim.with_world(|w| lock(&sim.inner.webhooks).done(w, &job, outcome));
            }
        }
    }
}
