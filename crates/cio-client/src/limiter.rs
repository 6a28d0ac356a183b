//! Process-wide request pacing per (API, workspace, base URL).
//!
//! Every client built for the same workspace and base URL gets the same [`RateLimiter`] from
//! [`shared_limiter`], so the limits hold for the whole process, not per client. Two rules hold
//! together:
//!
//! - Smooth pacing: starts are at least `1 / rate` seconds apart, no bursts.
//! - Rolling window: a request holds one of `rate` places from its start until one second after
//!   its answer (or failure). Customer.io counts a request when it arrives, which is somewhere
//!   between those two instants, so however the network delays single requests no rolling
//!   second at Customer.io sees more than `rate` of them. Pacing alone cannot promise that: a
//!   first request slowed by connection set-up can arrive less than a second before the
//!   eleventh.
//!
//! A 429 with `Retry-After` pauses the limiter: for the whole API, or only for a throttle scope
//! (the broadcast-trigger limit, one trigger per 10 s, is separate from the App API's 10/s:
//! a trigger's 429 must not hold back metrics, segment or profile reads).
//!
//! A caller with a deadline ([`RateLimiter::acquire_by`]) is told at once, without waiting,
//! when its turn would come too late.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::{Instant, sleep_until};
use url::Url;

use crate::config::Api;

/// How long a request keeps its place in the rolling window after its answer.
pub const RATE_WINDOW: Duration = Duration::from_secs(1);

/// Pacer shared by every caller of one API of one workspace.
#[derive(Debug)]
pub struct RateLimiter {
    per_sec: u32,
    interval: Duration,
    state: Mutex<State>,
    /// Woken whenever a request gives its place back.
    released: Notify,
}

#[derive(Debug, Default)]
struct State {
    /// Earliest start of the next request (smooth pacing).
    next_slot: Option<Instant>,
    /// Nobody starts before this (set by a 429's `Retry-After`).
    paused_until: Option<Instant>,
    /// Callers of one throttle scope do not start before these.
    scope_pauses: HashMap<&'static str, Instant>,
    /// Requests under way (each holds a place).
    in_flight: usize,
    /// When finished requests leave the window, oldest first (each holds a place until then).
    leaving: VecDeque<Instant>,
}

/// A place in the limiter, held while one request is under way. Dropping it (once the answer
/// is in, or the attempt failed) keeps the place taken for [`RATE_WINDOW`] more.
#[derive(Debug)]
#[must_use = "the place is given back when the slot is dropped"]
pub struct Slot<'a> {
    limiter: &'a RateLimiter,
    waited: Duration,
}

impl Slot<'_> {
    /// How long the caller waited for this slot.
    pub fn waited(&self) -> Duration {
        self.waited
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.limiter.release();
    }
}

/// [`RateLimiter::acquire_by`] could not give a turn by the caller's latest start; the caller
/// did not wait and holds no place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooLate {
    /// The earliest start the limiter could offer, when known (`None`: every place is held by
    /// a request still under way).
    pub earliest: Option<Instant>,
}

/// When a caller may start.
enum Turn {
    Now,
    At(Instant),
    /// Only once a request under way gives its place back, and not before this (at least a
    /// window from now: a place given back now frees up a window later).
    AfterRelease(Instant),
}

impl RateLimiter {
    /// A limiter allowing `per_sec` requests per second (at least 1).
    pub fn new(per_sec: u32) -> Self {
        let per_sec = per_sec.max(1);
        Self {
            per_sec,
            interval: Duration::from_secs(1) / per_sec,
            state: Mutex::new(State::default()),
            released: Notify::new(),
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

    /// Waits for this caller's turn; returns how long it waited. The request counts in the
    /// window from now until [`RATE_WINDOW`] later (use [`acquire_slot`](Self::acquire_slot)
    /// to hold the place while the request is under way).
    pub async fn acquire(&self) -> Duration {
        self.acquire_slot(None).await.waited()
    }

    /// Waits for a turn of a caller in throttle `scope` (`None`: only the API-wide pause
    /// applies) and returns its place, held until the slot is dropped.
    pub async fn acquire_slot(&self, scope: Option<&'static str>) -> Slot<'_> {
        loop {
            // Without a latest start the wait always ends in a slot.
            if let Ok(slot) = self.acquire_by(scope, None).await {
                return slot;
            }
        }
    }

    /// [`acquire_slot`](Self::acquire_slot) for a caller that must start by `latest_start`:
    /// when its turn would come later (a pause, the pace, a full window), it gets [`TooLate`]
    /// at once instead of waiting, and takes no place.
    pub async fn acquire_by(
        &self,
        scope: Option<&'static str>,
        latest_start: Option<Instant>,
    ) -> Result<Slot<'_>, TooLate> {
        let started = Instant::now();
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            // Registered before the state is read, so a release in between is not missed.
            released.as_mut().enable();
            let turn = {
                let mut st = self.lock();
                let now = Instant::now();
                let turn = self.turn(&mut st, now, scope);
                if let Turn::Now = turn {
                    if latest_start.is_some_and(|latest| now > latest) {
                        return Err(TooLate {
                            earliest: Some(now),
                        });
                    }
                    st.in_flight += 1;
                    st.next_slot = Some(now + self.interval);
                }
                turn
            };
            match turn {
                Turn::Now => {
                    return Ok(Slot {
                        limiter: self,
                        waited: started.elapsed(),
                    });
                }
                Turn::At(at) => {
                    if latest_start.is_some_and(|latest| at > latest) {
                        return Err(TooLate { earliest: Some(at) });
                    }
                    // A pause set meanwhile is seen on the next round.
                    sleep_until(at).await;
                }
                Turn::AfterRelease(not_before) => match latest_start {
                    Some(latest) if not_before > latest => {
                        return Err(TooLate { earliest: None });
                    }
                    Some(latest) => {
                        // A place given back after `latest - RATE_WINDOW` frees up too late.
                        let give_up = latest.checked_sub(RATE_WINDOW).unwrap_or(latest);
                        if Instant::now() >= give_up {
                            return Err(TooLate { earliest: None });
                        }
                        tokio::select! {
                            () = sleep_until(give_up) => {}
                            () = &mut released => {}
                        }
                    }
                    None => released.await,
                },
            }
        }
    }

    /// The caller's turn as of `now` (drops expired window entries and pauses).
    fn turn(&self, st: &mut State, now: Instant, scope: Option<&str>) -> Turn {
        while st.leaving.front().is_some_and(|at| *at <= now) {
            st.leaving.pop_front();
        }
        st.scope_pauses.retain(|_, until| *until > now);
        let scope_pause = scope.and_then(|s| st.scope_pauses.get(s).copied());
        let at = [st.next_slot, st.paused_until, scope_pause]
            .into_iter()
            .flatten()
            .fold(now, Instant::max);
        let occupied = st.in_flight + st.leaving.len();
        let places = self.per_sec as usize;
        let at = if occupied < places {
            at
        } else {
            // A place frees up when enough finished requests have left the window.
            match st.leaving.get(occupied - places) {
                Some(leaves) => at.max(*leaves),
                None => return Turn::AfterRelease(at.max(now + RATE_WINDOW)),
            }
        };
        if at <= now { Turn::Now } else { Turn::At(at) }
    }

    fn release(&self) {
        {
            let mut st = self.lock();
            st.in_flight = st.in_flight.saturating_sub(1);
            st.leaving.push_back(Instant::now() + RATE_WINDOW);
        }
        self.released.notify_waiters();
    }

    /// Holds back every caller for `duration` from now (never shortens an existing pause).
    pub fn pause_for(&self, duration: Duration) {
        let until = Instant::now() + duration;
        let mut st = self.lock();
        st.paused_until = Some(st.paused_until.map_or(until, |p| p.max(until)));
    }

    /// Holds back the callers of throttle `scope` for `duration` from now (never shortens an
    /// existing pause); other callers are not affected.
    pub fn pause_scope_for(&self, scope: &'static str, duration: Duration) {
        let until = Instant::now() + duration;
        let mut st = self.lock();
        let entry = st.scope_pauses.entry(scope).or_insert(until);
        *entry = (*entry).max(until);
    }

    /// Until when callers of `scope` (`None`: of the whole API) are held back by a pause.
    pub fn paused_until(&self, scope: Option<&str>) -> Option<Instant> {
        let st = self.lock();
        let now = Instant::now();
        let scoped = scope.and_then(|s| st.scope_pauses.get(s).copied());
        [st.paused_until, scoped]
            .into_iter()
            .flatten()
            .filter(|until| *until > now)
            .max()
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

    #[tokio::test(start_paused = true)]
    async fn no_more_than_the_rate_start_within_a_second() {
        let limiter = RateLimiter::new(10);
        let t0 = Instant::now();
        for _ in 0..10 {
            limiter.acquire().await;
        }
        assert_eq!(t0.elapsed(), Duration::from_millis(900));
        // The 11th would be paced at 1000 ms: exactly when the first leaves the window.
        limiter.acquire().await;
        assert_eq!(t0.elapsed(), Duration::from_millis(1000));
    }

    #[tokio::test(start_paused = true)]
    async fn a_place_is_held_until_a_second_after_the_answer() {
        let limiter = Arc::new(RateLimiter::new(4));
        let t0 = Instant::now();
        let mut held = Vec::new();
        for _ in 0..4 {
            held.push(limiter.acquire_slot(None).await);
        }
        assert_eq!(t0.elapsed(), Duration::from_millis(750));
        let fifth = {
            let l = limiter.clone();
            tokio::spawn(async move {
                let slot = l.acquire_slot(None).await;
                (t0.elapsed(), slot.waited())
            })
        };
        // Slow answers: nothing can start while all four are under way...
        tokio::time::sleep_until(t0 + Duration::from_secs(3)).await;
        assert!(!fifth.is_finished());
        // ...and a place frees one second after the first answer.
        drop(held.remove(0));
        let (started, waited) = fifth.await.unwrap();
        assert_eq!(started, Duration::from_secs(4));
        assert_eq!(waited, Duration::from_millis(3250));
        drop(held);
    }

    /// Requests of random durations that reach the server at a random moment between their
    /// start and their answer: no rolling second of arrivals ever holds more than the rate.
    #[tokio::test(start_paused = true)]
    async fn arrivals_never_exceed_the_rate_in_any_second() {
        use rand::{Rng, SeedableRng};
        let limiter = Arc::new(RateLimiter::new(10));
        let t0 = Instant::now();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let tasks: Vec<_> = (0..80)
            .map(|_| {
                let l = limiter.clone();
                let took = Duration::from_millis(rng.random_range(1..700));
                let reached = rng.random_range(0.0..=1.0_f64);
                tokio::spawn(async move {
                    let slot = l.acquire_slot(None).await;
                    let start = t0.elapsed();
                    tokio::time::sleep(took).await;
                    drop(slot);
                    start + took.mul_f64(reached)
                })
            })
            .collect();
        let mut arrivals = Vec::new();
        for task in tasks {
            arrivals.push(task.await.unwrap());
        }
        arrivals.sort();
        for (i, first) in arrivals.iter().enumerate() {
            let within = arrivals[i..]
                .iter()
                .take_while(|at| **at - *first < Duration::from_secs(1))
                .count();
            assert!(
                within <= 10,
                "{within} arrivals within a second of {first:?}"
            );
        }
        // ...while still going at close to the rate (10/s less the answer times).
        assert!(t0.elapsed() < Duration::from_secs(14), "{:?}", t0.elapsed());
    }

    #[tokio::test(start_paused = true)]
    async fn a_scope_pause_holds_only_that_scope() {
        let limiter = RateLimiter::new(10);
        limiter.pause_scope_for("triggers", Duration::from_secs(10));
        let t0 = Instant::now();
        drop(limiter.acquire_slot(None).await);
        assert_eq!(t0.elapsed(), Duration::ZERO);
        assert_eq!(limiter.paused_until(None), None);
        assert_eq!(
            limiter.paused_until(Some("triggers")),
            Some(t0 + Duration::from_secs(10))
        );
        drop(limiter.acquire_slot(Some("triggers")).await);
        assert_eq!(t0.elapsed(), Duration::from_secs(10));
        // The API-wide pause holds every scope.
        limiter.pause_for(Duration::from_secs(2));
        let t1 = Instant::now();
        drop(limiter.acquire_slot(Some("other")).await);
        assert_eq!(t1.elapsed(), Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_past_the_turn_fails_at_once_without_a_place() {
        let limiter = RateLimiter::new(10);
        limiter.pause_for(Duration::from_secs(5));
        let t0 = Instant::now();
        let err = limiter
            .acquire_by(None, Some(t0 + Duration::from_secs(4)))
            .await
            .unwrap_err();
        assert_eq!(err.earliest, Some(t0 + Duration::from_secs(5)));
        assert_eq!(t0.elapsed(), Duration::ZERO, "no waiting");
        // A deadline after the turn waits for it.
        let slot = limiter
            .acquire_by(None, Some(t0 + Duration::from_secs(6)))
            .await
            .unwrap();
        assert_eq!(slot.waited(), Duration::from_secs(5));
        drop(slot);

        // Every place held by a request under way: a place given back frees up a second later
        // at the earliest, so a latest start within that second fails at once...
        let one = Arc::new(RateLimiter::new(1));
        let held = one.acquire_slot(None).await;
        let t1 = Instant::now();
        let err = one
            .acquire_by(None, Some(t1 + Duration::from_millis(900)))
            .await
            .unwrap_err();
        assert_eq!(err.earliest, None);
        assert_eq!(t1.elapsed(), Duration::ZERO);
        assert_eq!(one.lock().in_flight, 1, "a refused caller takes no place");
        // ...a later one waits for the answer, and gives up once it would be too late.
        let err = one
            .acquire_by(None, Some(t1 + Duration::from_secs(3)))
            .await
            .unwrap_err();
        assert_eq!(err.earliest, None);
        assert_eq!(t1.elapsed(), Duration::from_secs(2));
        let waiter = {
            let l = one.clone();
            tokio::spawn(async move {
                l.acquire_by(None, Some(t1 + Duration::from_secs(5)))
                    .await
                    .map(|slot| slot.waited())
            })
        };
        tokio::time::sleep(Duration::from_millis(500)).await;
        drop(held); // answered at 2.5 s: the place is free again at 3.5 s
        assert_eq!(waiter.await.unwrap(), Ok(Duration::from_millis(1500)));
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
