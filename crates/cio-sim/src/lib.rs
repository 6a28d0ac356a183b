//! `cio-sim`: a stateful Customer.io stand-in for dev mode, tests and docker-compose.
//!
//! One HTTP server serves both APIs, as Customer.io's real shapes (see
//! `docs/customerio-api.md`): `/api/...` is the Track API (Basic auth), `/v1/...` the App API
//! (Bearer auth), `/_sim/...` an unauthenticated control API.
//!
//! Layout:
//! - [`config`]: [`SimConfig`] (credentials, region, rate limits, demo size, request log
//!   capacity, broadcast trigger interval, default delivery rates) and [`SimApi`].
//! - `state`: people, segments ([`Predicate`] for dynamic segments), suppressed identifiers;
//!   `events`: recorded events ([`SimEvent`]) with deduplication by event id, and the event
//!   field checks; `demo`: the deterministic demo workspace (a financial newsletter's ~5000
//!   readers and their segments, campaigns, broadcasts and newsletters).
//! - `gateway`: the layer in front of both APIs: request counters, the bounded [`LoggedRequest`]
//!   log, faults, rate limits.
//!   `faults`: [`Fault`], [`Chaos`], token buckets. `conn`: the listener whose connections can be
//!   dropped without a response.
//! - `auth`: credential checks; `errors`: Customer.io error bodies per API.
//! - `track_api` (Track v1), `track_v2` (`/api/v2/entity`, `/api/v2/batch`), `app_api`
//!   (segments, customers): the endpoints; `control`: `/_sim/` (route table in its docs).
//! - Sends: `audience` ([`AudienceFilter`], the `recipients` filter); `sends` (campaigns,
//!   API-triggered broadcasts, newsletters, triggers, the delivery ledger with outcomes drawn
//!   from [`DeliveryRates`], and the clock that [`Simulator::advance`] moves); `metrics` (the
//!   metrics endpoints' parameters and series); `campaigns_api` (campaigns, broadcasts,
//!   triggers: route table and rules in its docs) and `newsletters_api` (create, send, read).
//! - [`Simulator`]: the shared handle; [`Simulator::spawn`] gives a [`RunningSim`] on port 0.
//!
//! Time: the simulator never presents a time ahead of the wall clock. [`Simulator::advance`]
//! makes everything send-related look older (triggers, newsletters, deliveries and their
//! events, trigger windows, schedules), so delivery events drawn for "hours later" happen now
//! and a client asking for metrics up to its own "now" sees them. People and events are not
//! aged.
//!
//! The simulator never reads the OpenAPI specs at run time; it is written to them.

pub mod config;

mod app_api;
mod audience;
mod auth;
mod campaigns_api;
mod conn;
mod control;
mod demo;
mod error;
mod errors;
mod events;
mod faults;
mod gateway;
mod metrics;
mod newsletters_api;
mod sends;
mod state;
mod track_api;
mod track_v2;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::from_fn_with_state;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use audience::{AttributeOperator, AudienceFilter};
pub use config::{SimApi, SimConfig};
pub use error::SimError;
pub use events::SimEvent;
pub use faults::{Chaos, Fault};
pub use gateway::LoggedRequest;
pub use sends::{
    CampaignKind, CampaignState, CampaignTrigger, DeliveryFilter, DeliveryMetric, DeliveryRates,
    MetricTotals, NewBroadcast, NewCampaign, NewNewsletter, RatesKey, SimCampaign, SimDelivery,
    SimNewsletter, SimTrigger,
};
pub use state::{Predicate, SegmentKind, SimPerson, SimSegment};

use conn::{ConnCtl, SimListener};
use faults::{Action, Traffic};
use gateway::RequestLog;
use state::{IdType, Membership, World, parse_identifier};

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

struct Inner {
    config: SimConfig,
    world: Mutex<World>,
    traffic: Mutex<Traffic>,
    log: Mutex<RequestLog>,
}

/// Shared handle to one simulated Customer.io workspace. Cheap to clone; every clone, the HTTP
/// API and the control API see the same state.
#[derive(Clone)]
pub struct Simulator {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Simulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Simulator")
            .field("site_id", &self.inner.config.site_id)
            .field("region", &self.inner.config.region)
            .finish_non_exhaustive()
    }
}

impl Simulator {
    /// Builds the workspace (demo data when `config.demo_people > 0`).
    pub fn new(config: SimConfig) -> Self {
        let mut world = World::new();
        world
            .sends
            .configure(config.seed, config.trigger_interval, config.default_rates);
        demo::populate(&mut world, config.seed, config.demo_people);
        let traffic = Traffic::new(&config);
        let log = RequestLog::new(config.request_log_capacity);
        Self {
            inner: Arc::new(Inner {
                config,
                world: Mutex::new(world),
                traffic: Mutex::new(traffic),
                log: Mutex::new(log),
            }),
        }
    }

    /// The configuration it was created with (rate limits: initial values).
    pub fn config(&self) -> &SimConfig {
        &self.inner.config
    }

    /// Router serving both APIs and `/_sim/`. [`Simulator::serve`] adds a per-connection kill
    /// switch that makes `Fault::Drop` certain; under a plain `axum::serve` a drop relies on the
    /// response body failing before hyper writes the head (what hyper 1.x does today).
    pub fn router(&self) -> Router {
        Router::new()
            .merge(track_api::routes(self))
            .merge(app_api::routes(self))
            .merge(campaigns_api::routes(self))
            .merge(newsletters_api::routes(self))
            .merge(control::routes())
            .fallback(fallback)
            .layer(from_fn_with_state(self.clone(), gateway::gateway))
            .with_state(self.clone())
    }

    /// Serves on `listener` until `shutdown` completes (then drains open connections).
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let app = self
            .router()
            .into_make_service_with_connect_info::<ConnCtl>();
        axum::serve(SimListener::new(listener), app)
            .with_graceful_shutdown(shutdown)
            .await
    }

    /// Binds `127.0.0.1:0` and serves in a tokio task. Dropping the [`RunningSim`] leaves the
    /// server running until the runtime ends; call [`RunningSim::shutdown`] to stop it.
    pub async fn spawn(config: SimConfig) -> std::io::Result<RunningSim> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let sim = Simulator::new(config);
        let (tx, rx) = oneshot::channel::<()>();
        let shutdown = async move {
            if rx.await.is_err() {
                // Handle dropped without shutdown(): keep serving.
                std::future::pending::<()>().await;
            }
        };
        let task = tokio::spawn(sim.clone().serve(listener, shutdown));
        Ok(RunningSim {
            addr,
            sim,
            shutdown: Some(tx),
            task: Some(task),
        })
    }

    // ----- state -----

    pub(crate) fn with_world<R>(&self, f: impl FnOnce(&mut World) -> R) -> R {
        f(&mut lock(&self.inner.world))
    }

    /// Creates or updates the person with this id; attributes are merged (`null`/`""` remove
    /// one; `email` sets the email identifier). No Customer.io limits are applied.
    pub fn upsert_person(&self, id: &str, attributes: Map<String, Value>) {
        let now = chrono::Utc::now().timestamp();
        self.with_world(|w| w.upsert_by_id(id, attributes, now));
    }

    /// Removes the person with this id (and their manual-segment memberships).
    pub fn remove_person(&self, id: &str) -> bool {
        self.with_world(|w| w.resolve(id, IdType::Id).is_some_and(|seq| w.remove(seq)))
    }

    /// The person with this id.
    pub fn person(&self, id: &str) -> Option<SimPerson> {
        self.with_world(|w| {
            w.resolve(id, IdType::Id)
                .and_then(|seq| w.person(seq))
                .map(|p| p.snapshot())
        })
    }

    /// The person with this email (case-insensitive), e.g. one created by email alone.
    pub fn person_by_email(&self, email: &str) -> Option<SimPerson> {
        self.with_world(|w| {
            w.resolve(email, IdType::Email)
                .and_then(|seq| w.person(seq))
                .map(|p| p.snapshot())
        })
    }

    /// Number of people.
    pub fn people_count(&self) -> usize {
        self.with_world(|w| w.people_count())
    }

    /// Adds a data-driven segment; returns its id.
    pub fn add_dynamic_segment(&self, name: &str, description: &str, predicate: Predicate) -> i64 {
        let now = chrono::Utc::now().timestamp();
        self.with_world(|w| {
            w.add_segment(name, description, Membership::Dynamic(predicate), None, now)
        })
    }

    /// Adds an empty manual segment; returns its id.
    pub fn create_manual_segment(&self, name: &str, description: &str) -> i64 {
        let now = chrono::Utc::now().timestamp();
        self.with_world(|w| {
            w.add_segment(
                name,
                description,
                Membership::Manual(Default::default()),
                None,
                now,
            )
        })
    }

    /// Adds people (by id; unknown ids are ignored) to a manual segment; returns how many were
    /// not members before.
    pub fn add_to_manual_segment(
        &self,
        segment_id: i64,
        person_ids: &[&str],
    ) -> Result<usize, SimError> {
        self.change_manual(segment_id, person_ids, true)
    }

    /// Removes people (by id) from a manual segment; returns how many were members.
    pub fn remove_from_manual_segment(
        &self,
        segment_id: i64,
        person_ids: &[&str],
    ) -> Result<usize, SimError> {
        self.change_manual(segment_id, person_ids, false)
    }

    fn change_manual(&self, segment_id: i64, ids: &[&str], add: bool) -> Result<usize, SimError> {
        let now = chrono::Utc::now().timestamp();
        self.with_world(|w| {
            let people: Vec<u64> = ids
                .iter()
                .filter_map(|i| w.resolve(i, IdType::Id))
                .collect();
            w.change_manual(segment_id, &people, add, now)
        })
    }

    /// Deletes a segment of either kind.
    pub fn delete_segment(&self, id: i64) -> bool {
        self.with_world(|w| w.delete_segment(id))
    }

    /// All segments with their current member counts, by id.
    pub fn segments(&self) -> Vec<SimSegment> {
        self.with_world(|w| w.segment_list().map(|s| w.snapshot_segment(s)).collect())
    }

    /// Member ids of a segment, sorted (people without an id appear as `cio_<cio_id>`).
    pub fn segment_members(&self, id: i64) -> Option<Vec<String>> {
        self.with_world(|w| {
            let segment = w.segment(id)?;
            let mut ids: Vec<String> = w
                .members(segment)
                .into_iter()
                .map(|p| p.id.clone().unwrap_or_else(|| format!("cio_{}", p.cio_id)))
                .collect();
            ids.sort();
            Some(ids)
        })
    }

    // ----- sends -----

    /// Makes `by` pass for everything send-related: recorded times (triggers, newsletters,
    /// deliveries) look `by` older, delivery events drawn for the next `by` happen, trigger
    /// windows and scheduled newsletters come `by` closer. The wall clock is untouched.
    pub fn advance(&self, by: Duration) {
        self.with_world(|w| {
            w.sends.advance(by);
            w.settle_sends();
        });
    }

    /// Total time [`Simulator::advance`]d so far.
    pub fn advanced(&self) -> Duration {
        let age = self.with_world(|w| w.sends.age_ms());
        Duration::from_millis(u64::try_from(age).unwrap_or(0))
    }

    /// Changes the per-broadcast trigger interval (Customer.io: 10 s); open windows are kept.
    pub fn set_trigger_interval(&self, interval: Duration) {
        self.with_world(|w| w.sends.set_trigger_interval(interval));
    }

    /// Current per-broadcast trigger interval.
    pub fn trigger_interval(&self) -> Duration {
        self.with_world(|w| w.sends.trigger_interval())
    }

    /// Campaigns and broadcasts, by id.
    pub fn campaigns(&self) -> Vec<SimCampaign> {
        self.with_world(|w| {
            w.sends
                .campaigns()
                .map(|c| w.sends.snapshot_campaign(c))
                .collect()
        })
    }

    /// API-triggered broadcasts, by id.
    pub fn broadcasts(&self) -> Vec<SimCampaign> {
        self.campaigns()
            .into_iter()
            .filter(|c| c.kind == CampaignKind::Broadcast)
            .collect()
    }

    /// One campaign or broadcast.
    pub fn campaign(&self, id: i64) -> Option<SimCampaign> {
        self.with_world(|w| w.sends.campaign(id).map(|c| w.sends.snapshot_campaign(c)))
    }

    /// Adds an API-triggered broadcast; its audience may only name existing segments.
    pub fn add_broadcast(&self, broadcast: NewBroadcast) -> Result<i64, SimError> {
        self.with_world(|w| {
            if let Some(missing) = w.unknown_segment(&broadcast.audience) {
                return Err(SimError::UnknownSegment(missing));
            }
            let now = w.sends.now_ms();
            Ok(w.sends.add_broadcast(broadcast, now))
        })
    }

    /// Adds a campaign (it sends only through [`Simulator::record_campaign_send`]).
    pub fn add_campaign(&self, campaign: NewCampaign) -> i64 {
        self.with_world(|w| {
            let now = w.sends.now_ms();
            w.sends.add_campaign(campaign, now)
        })
    }

    /// Changes a campaign's or broadcast's state (a broadcast triggers only when `Running`).
    pub fn set_campaign_state(&self, id: i64, state: CampaignState) -> Result<(), SimError> {
        if self.with_world(|w| w.sends.set_campaign_state(id, state)) {
            Ok(())
        } else {
            Err(SimError::CampaignNotFound(id))
        }
    }

    /// Records that a campaign emailed these people now (ids; unknown people, people without
    /// an email and unsubscribed people are skipped); returns the deliveries created.
    pub fn record_campaign_send(
        &self,
        campaign_id: i64,
        person_ids: &[&str],
    ) -> Result<usize, SimError> {
        self.with_world(|w| w.campaign_send(campaign_id, person_ids))
    }

    /// Every trigger (of one broadcast with `Some`), oldest first.
    pub fn triggers(&self, broadcast_id: Option<i64>) -> Vec<SimTrigger> {
        self.with_world(|w| {
            w.sends
                .triggers()
                .filter(|t| broadcast_id.is_none_or(|b| t.broadcast_id == b))
                .map(|t| w.sends.snapshot_trigger(t))
                .collect()
        })
    }

    /// One trigger.
    pub fn trigger(&self, id: i64) -> Option<SimTrigger> {
        self.with_world(|w| w.sends.trigger(id).map(|t| w.sends.snapshot_trigger(t)))
    }

    /// Newsletters, by id (scheduled ones whose time has come are sent first).
    pub fn newsletters(&self) -> Vec<SimNewsletter> {
        self.with_world(|w| {
            w.settle_sends();
            w.sends
                .newsletters()
                .map(|n| w.sends.snapshot_newsletter(n))
                .collect()
        })
    }

    /// One newsletter.
    pub fn newsletter(&self, id: i64) -> Option<SimNewsletter> {
        self.with_world(|w| {
            w.settle_sends();
            w.sends
                .newsletter(id)
                .map(|n| w.sends.snapshot_newsletter(n))
        })
    }

    /// Adds a draft newsletter (tags allowed, unlike the API); its recipients may only name
    /// existing segments.
    pub fn add_newsletter(&self, newsletter: NewNewsletter) -> Result<i64, SimError> {
        self.with_world(|w| {
            if let Some(missing) = w.unknown_segment(&newsletter.recipients) {
                return Err(SimError::UnknownSegment(missing));
            }
            let now = w.sends.now_ms();
            let spec = sends::NewsletterSpec {
                name: newsletter.name,
                subject: newsletter.subject,
                body: newsletter.body,
                preheader_text: None,
                from: None,
                from_id: None,
                recipients: newsletter.recipients,
                tags: newsletter.tags,
                subscription_topic_id: None,
            };
            Ok(w.sends.add_newsletter(spec, now))
        })
    }

    /// Sends a draft newsletter now; returns the deliveries created.
    pub fn send_newsletter(&self, id: i64) -> Result<usize, SimError> {
        self.with_world(|w| match w.send_newsletter_now(id) {
            Ok(n) => Ok(n),
            Err(false) => Err(SimError::NewsletterNotFound(id)),
            Err(true) => Err(SimError::NewsletterNotDraft(id)),
        })
    }

    /// Deliveries matching the filter, in creation order, with the events that have happened
    /// by now and those still ahead.
    pub fn deliveries(&self, filter: &DeliveryFilter) -> Vec<SimDelivery> {
        self.with_world(|w| {
            w.settle_sends();
            w.sends.deliveries(filter)
        })
    }

    /// Per-metric counts of the matching deliveries' events that have happened by now: what
    /// the metrics endpoints sum to over a window covering the sends.
    pub fn delivery_totals(&self, filter: &DeliveryFilter) -> MetricTotals {
        self.with_world(|w| {
            w.settle_sends();
            w.sends.totals(filter, false)
        })
    }

    /// Per-metric counts once every drawn event has happened (the eventual truth).
    pub fn eventual_delivery_totals(&self, filter: &DeliveryFilter) -> MetricTotals {
        self.with_world(|w| {
            w.settle_sends();
            w.sends.totals(filter, true)
        })
    }

    /// Outcome rates of deliveries created from now on that match `key` (the most recently set
    /// matching rule wins; setting a key again replaces its rule).
    pub fn set_rates(&self, key: RatesKey, rates: DeliveryRates) -> Result<(), SimError> {
        rates.validate()?;
        self.with_world(|w| w.sends.set_rates(key, rates));
        Ok(())
    }

    /// Outcome rates of deliveries no rule matches.
    pub fn set_default_rates(&self, rates: DeliveryRates) -> Result<(), SimError> {
        rates.validate()?;
        self.with_world(|w| w.sends.set_default_rates(rates));
        Ok(())
    }

    /// Removes every rates rule (the default stays).
    pub fn clear_rates(&self) {
        self.with_world(|w| w.sends.clear_rates());
    }

    /// The default rates and the rules, oldest first.
    pub fn rates(&self) -> (DeliveryRates, Vec<(RatesKey, DeliveryRates)>) {
        self.with_world(|w| (w.sends.default_rates(), w.sends.rate_rules().to_vec()))
    }

    pub(crate) fn environment_id(&self) -> u64 {
        // Stable per site id, like a real workspace id.
        let hash = self
            .inner
            .config
            .site_id
            .bytes()
            .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
            });
        1 + hash % 99_999
    }

    // ----- traffic -----

    /// Changes an API's rate limit (requests per second, 0 = unlimited); the bucket starts full.
    pub fn set_rate_limit(&self, api: SimApi, per_sec: u32) {
        lock(&self.inner.traffic).set_rate_limit(api, per_sec);
    }

    /// Current rate limit of an API.
    pub fn rate_limit(&self, api: SimApi) -> u32 {
        lock(&self.inner.traffic).rate_limit(api)
    }

    /// Queues one-shot faults for the next requests of `api` (`None`: either API), in order.
    pub fn push_faults(&self, api: Option<SimApi>, faults: impl IntoIterator<Item = Fault>) {
        lock(&self.inner.traffic).push(api, faults);
    }

    /// Sets standing faults for `api` (`None`: both). Queued faults take precedence.
    pub fn set_chaos(&self, api: Option<SimApi>, chaos: Chaos) {
        lock(&self.inner.traffic).set_chaos(api, chaos);
    }

    /// Clears queued faults and chaos (rate limits stay).
    pub fn clear_faults(&self) {
        lock(&self.inner.traffic).clear();
    }

    /// Number of queued one-shot faults not yet consumed.
    pub fn queued_faults(&self) -> usize {
        lock(&self.inner.traffic).queued()
    }

    pub(crate) fn decide(&self, api: SimApi) -> (Duration, Action) {
        lock(&self.inner.traffic).decide(api)
    }

    pub(crate) fn take_token(&self, api: SimApi) -> Result<(), (u32, u64)> {
        lock(&self.inner.traffic).take_token(api)
    }

    // ----- events -----

    /// Every recorded event (person and anonymous), oldest first. Events whose `id` repeated an
    /// earlier one are not here (see [`Simulator::duplicate_events_dropped`]); events of deleted
    /// people are gone with them.
    pub fn events(&self) -> Vec<SimEvent> {
        self.with_world(|w| w.events().all().map(|e| w.event_snapshot(e)).collect())
    }

    /// Events of one person, oldest first. `person_id` is read like a Track v1 path identifier:
    /// an id, an email (contains `@`) or `cio_<cio_id>`. Unknown person: empty.
    pub fn events_for(&self, person_id: &str) -> Vec<SimEvent> {
        let (kind, value) = parse_identifier(person_id);
        self.with_world(|w| match w.resolve(value, kind) {
            Some(seq) => w
                .events()
                .of_person(seq)
                .map(|e| w.event_snapshot(e))
                .collect(),
            None => Vec::new(),
        })
    }

    /// Number of recorded events.
    pub fn event_count(&self) -> usize {
        self.with_world(|w| w.events().len())
    }

    /// Number of events dropped because their `id` had been received before (v1 and v2).
    pub fn duplicate_events_dropped(&self) -> u64 {
        self.with_world(|w| w.events().duplicates())
    }

    // ----- request log and counters -----

    pub(crate) fn with_log<R>(&self, f: impl FnOnce(&mut RequestLog) -> R) -> R {
        f(&mut lock(&self.inner.log))
    }

    /// The most recent App and Track requests (at most `SimConfig::request_log_capacity`),
    /// oldest first; control requests are not logged. Bodies over 64 KiB appear as
    /// `{"_truncated": size}`.
    pub fn requests(&self) -> Vec<LoggedRequest> {
        self.with_log(|log| log.snapshot())
    }

    /// Empties the request log (the counters keep counting).
    pub fn clear_requests(&self) {
        self.with_log(RequestLog::clear);
    }

    /// Requests received by an API since start (faulted, rate-limited and rejected ones included;
    /// never reset, unlike the log).
    pub fn request_count(&self, api: SimApi) -> u64 {
        self.with_log(|log| log.request_count(api))
    }

    /// Requests received per route template since start, keyed like `"POST /api/v2/batch"` or
    /// `"GET /v1/customers/{customer_id}/attributes"`; paths matching no route count under
    /// `"<METHOD> (no route)"`.
    pub fn request_counts_by_route(&self) -> BTreeMap<String, u64> {
        self.with_log(|log| log.by_route().clone())
    }
}

async fn fallback(req: Request) -> Response {
    let detail = format!("no route for {} {}", req.method(), req.uri().path());
    match gateway::classify(req.uri().path()) {
        Some(api) => errors::api_error(api, StatusCode::NOT_FOUND, detail),
        None => (
            StatusCode::NOT_FOUND,
            axum::Json(json!({ "error": detail })),
        )
            .into_response(),
    }
}

/// A simulator serving on a local port (from [`Simulator::spawn`]).
#[derive(Debug)]
pub struct RunningSim {
    /// Bound address (`127.0.0.1:PORT`).
    pub addr: SocketAddr,
    /// The simulator's state handle.
    pub sim: Simulator,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl RunningSim {
    /// `http://127.0.0.1:PORT`: the base URL of both APIs (and of `/_sim/`).
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops accepting, drains open connections and waits for the server task.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => {
                    tracing::warn!(error = %err, "simulator server ended with an error")
                }
                Err(err) => tracing::warn!(error = %err, "simulator task failed"),
            }
        }
    }
}

impl std::ops::Deref for RunningSim {
    type Target = Simulator;

    fn deref(&self) -> &Simulator {
        &self.sim
    }
}
