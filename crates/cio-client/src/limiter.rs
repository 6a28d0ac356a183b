//! Process-wide request pacing per (API, workspace, base URL).
//!
//! Every client built for the same workspace and base URL gets the same [`RateLimiter`] from
//! [`shared_limiter`], so the pace holds for the whole process, not per client. Pacing is
//! smooth: one request every `1 / rate` seconds, no bursts. A 429 with `Retry-After` pauses the
//! limiter, holding back every caller of that API until then.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::Duration;

use tokio::time::{Instant, sleep_until};
use url::Url;

use crate::config::Api;

/// Smooth pacer shared by every caller of one API of one workspace.
#[derive(Debug)]
pub struct RateLimiter {
    per_sec: u32,
    interval: Duration,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Earliest start of the next request.
    next_slot: Option<Instant>,
    /// Nobody starts before this (set by a 429's `Retry-After`).
    paused_until: Option<Instant>,
}

impl RateLimiter {
    /// A limiter allowing `per_sec` requests per second (at least 1).
    pub fn new(per_sec: u32) -> Self {
        let per_sec = per_sec.max(1);
        Self {
            per_sec,
            interval: Duration::from_secs(1) / per_sec,
            state: Mutex::new(State::default()),
        }
    }

    /// The configured rate.
    pub fn per_sec(&self) -> u32 {
        self.per_sec
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent even if a holder panicked: recover it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for this caller's turn; returns how long it waited.
    pub async fn acquire(&self) -> Duration {
        let started = Instant::now();
        loop {
            let slot = {
                let mut st = self.lock();
                let now = Instant::now();
                let slot = [st.next_slot, st.paused_until]
                    .into_iter()
                    .flatten()
                    .fold(now, Instant::max);
                st.next_slot = Some(slot + self.interval);
                slot
            };
            sleep_until(slot).await;
            // A 429 may have paused everyone while we slept: queue again behind the pause.
            let paused = self.lock().paused_until.is_some_and(|p| p > Instant::now());
            if !paused {
                return started.elapsed();
            }
        }
    }

    /// Holds back every caller for `duration` from now (never shortens an existing pause).
    pub fn pause_for(&self, duration: Duration) {
        let until = Instant::now() + duration;
        let mut st = self.lock();
        st.paused_until = Some(st.paused_until.map_or(until, |p| p.max(until)));
    }
}

type Key = (Api, String, String);

fn registry() -> &'static Mutex<HashMap<Key, Weak<RateLimiter>>> {
    static REGISTRY: OnceLock<Mutex<HashMap<Key, Weak<RateLimiter>>>> = OnceLock::new();
    REGISTRY.get_or_init(|| Mutex::new(HashMap::new()))
}

/// The process-wide limiter for `api` of workspace `site_id` at `base_url`, created with
/// `per_sec` if no live client holds one yet. While one exists, its rate wins (a differing
/// `per_sec` is logged and ignored).
pub fn shared_limiter(api: Api, site_id: &str, base_url: &Url, per_sec: u32) -> Arc<RateLimiter> {
    let key = (
        api,
        site_id.to_owned(),
        base_url.as_str().trim_end_matches('/').to_owned(),
    );
    let mut map = registry().lock().unwrap_or_else(|e| e.into_inner());
    if let Some(existing) = map.get(&key).and_then(Weak::upgrade) {
        if existing.per_sec() != per_sec.max(1) {
            tracing::debug!(
                %api,
                existing = existing.per_sec(),
                requested = per_sec,
                "Customer.io rate limiter already exists for this workspace; keeping its rate"
            );
        }
        return existing;
    }
    map.retain(|_, weak| weak.strong_count() > 0);
    let limiter = Arc::new(RateLimiter::new(per_sec));
    map.insert(key, Arc::downgrade(&limiter));
    limiter
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn paces_one_request_per_interval() {
        let limiter = RateLimiter::new(10);
        let t0 = Instant::now();
        let mut starts = Vec::new();
        for _ in 0..5 {
            limiter.acquire().await;
            starts.push(t0.elapsed());
        }
        let expected: Vec<Duration> = (0..5).map(|i| Duration::from_millis(100 * i)).collect();
        assert_eq!(starts, expected);
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_callers_are_serialised_and_report_wait() {
        let limiter = Arc::new(RateLimiter::new(4));
        let t0 = Instant::now();
        let tasks: Vec<_> = (0..4)
            .map(|_| {
                let l = limiter.clone();
                tokio::spawn(async move {
                    let waited = l.acquire().await;
                    (t0.elapsed(), waited)
                })
            })
            .collect();
        let mut results = Vec::new();
        for t in tasks {
            results.push(t.await.unwrap());
        }
        results.sort();
        let starts: Vec<_> = results.iter().map(|r| r.0.as_millis()).collect();
        assert_eq!(starts, vec![0, 250, 500, 750]);
        for (start, waited) in results {
            assert_eq!(start, waited);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn idle_time_does_not_build_a_burst() {
        let limiter = RateLimiter::new(10);
        limiter.acquire().await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        let t0 = Instant::now();
        limiter.acquire().await;
        limiter.acquire().await;
        assert_eq!(t0.elapsed(), Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn pause_holds_everyone_including_sleepers() {
        let limiter = Arc::new(RateLimiter::new(10));
        let t0 = Instant::now();
        limiter.acquire().await; // slot 0
        // A caller already queued for the 100 ms slot...
        let queued = {
            let l = limiter.clone();
            tokio::spawn(async move {
                l.acquire().await;
                t0.elapsed()
            })
        };
        tokio::task::yield_now().await;
        // ...then a 429 says "retry after 1 s".
        limiter.pause_for(Duration::from_secs(1));
        let after = queued.await.unwrap();
        assert!(after >= Duration::from_secs(1), "{after:?}");
        assert!(after <= Duration::from_millis(1200), "{after:?}");
        // A pause never shortens.
        limiter.pause_for(Duration::from_millis(10));
        let st = limiter.lock();
        assert!(st.paused_until.is_some());
    }

    #[test]
    fn registry_shares_per_workspace_and_api() {
        let base = Url::parse("http://127.0.0.1:1/").unwrap();
        let other = Url::parse("http://127.0.0.1:2").unwrap();
        let a = shared_limiter(Api::App, "reg-test-site", &base, 10);
        let b = shared_limiter(
            Api::App,
            "reg-test-site",
            &Url::parse("http://127.0.0.1:1").unwrap(),
            10,
        );
        assert!(Arc::ptr_eq(&a, &b));
        let track = shared_limiter(Api::Track, "reg-test-site", &base, 10);
        assert!(!Arc::ptr_eq(&a, &track));
        let other_site = shared_limiter(Api::App, "reg-test-site-2", &base, 10);
        assert!(!Arc::ptr_eq(&a, &other_site));
        let other_base = shared_limiter(Api::App, "reg-test-site", &other, 10);
        assert!(!Arc::ptr_eq(&a, &other_base));
        // Dropped when the last holder goes.
        drop((a, b));
        let fresh = shared_limiter(Api::App, "reg-test-site", &base, 20);
        assert_eq!(fresh.per_sec(), 20);
    }
}
