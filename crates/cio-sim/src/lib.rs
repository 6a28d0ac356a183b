//! `cio-sim`: a stateful Customer.io stand-in for dev mode, tests and docker-compose.
//!
//! One HTTP server serves both APIs, as Customer.io's real shapes (see
//! `docs/customerio-api.md`): `/api/...` is the Track API (Basic auth), `/v1/...` the App API
//! (Bearer auth), `/_sim/...` an unauthenticated control API, `/_files/...` the files behind
//! signed download links (no credentials, like an object store).
//!
//! Layout:
//! - [`config`]: [`SimConfig`] (credentials, the workspace's region and the regional endpoint
//!   played, rate limits and their [`RateLimitMode`], demo size, request log capacity,
//!   broadcast trigger interval and [`TriggerScope`], subscription center, default delivery
//!   rates, engagement correlation, export delay and download base URL, reporting webhook) and
//!   [`SimApi`].
//! - `state`: people, segments ([`Predicate`] for dynamic segments), suppressed identifiers;
//!   `events`: recorded events ([`SimEvent`]) with deduplication by event id, and the event
//!   field checks; `demo`: the deterministic demo workspace (a financial newsletter's ~5000
//!   readers and their segments, campaigns, broadcasts and newsletters).
//! - `gateway`: the layer in front of both APIs: dot-segment resolution before routing, request
//!   counters, the bounded [`LoggedRequest`] log, faults, rate limits.
//!   `faults`: [`Fault`], [`Chaos`], rolling-window or token-bucket limits. `conn`: the listener
//!   whose connections can be dropped without a response.
//! - `auth`: credential checks and wrong-region answers (redirect / 401); `error_bodies`: the
//!   error BODIES Customer.io answers, per API (HTTP responses); `error`: [`SimError`], the
//!   error of the simulator's own state operations.
//! - `track_api` (Track v1), `track_v2` (`/api/v2/entity`, `/api/v2/batch`), `app_api`
//!   (segments, customers): the endpoints; `control`: `/_sim/` (route table in its docs).
//! - Sends: `audience` ([`AudienceFilter`], the `recipients` filter); `sends` (campaigns,
//!   API-triggered broadcasts, newsletters, triggers, the delivery ledger with outcomes drawn
//!   from [`DeliveryRates`] per content rule ([`RatesKey`]) and per-person engagement, and the
//!   clock that [`Simulator::advance`] moves); `metrics` (the
//!   metrics endpoints' parameters and series); `campaigns_api` (campaigns, broadcasts,
//!   triggers: route table and rules in its docs) and `newsletters_api` (create, send, read).
//! - `exports` (customer exports: `/v1/exports*`, the CSV file and its signed, credential-free
//!   download link under `/_files/`); `signing` (HMAC-SHA256: download links, and
//!   [`sign_webhook`], Customer.io's reporting-webhook signature).
//! - `activities` (the activity feed: `/v1/activities`, `/v1/customers/{id}/activities`);
//!   `messages_api` (deliveries as messages: `/v1/{campaigns,broadcasts,newsletters}/{id}/messages`,
//!   `/v1/customers/{id}/messages`).
//! - `webhooks`: the reporting-webhook sender ([`ReportingWebhook`]): every delivery event
//!   POSTed signed, at least once, in order, held back behind a failing one, retried with
//!   backoff on the simulator's clock; its ledger ([`SimWebhook`]).
//! - `sim`: [`Simulator`], the shared handle (construction, router, serving), its control
//!   methods grouped by concern (people and segments, sends, traffic, records), and
//!   [`RunningSim`]: [`Simulator::spawn`] gives one on port 0.
//!
//! Time: the simulator never presents a time ahead of the wall clock. [`Simulator::advance`]
//! makes everything send-related look older (triggers, newsletters, deliveries and their
//! events, trigger windows, schedules, exports and their download links, activities and their
//! 30-day window, webhook retries), so delivery events drawn for "hours later" happen now (and
//! are reported by webhook) and a client asking for metrics up to its own "now" sees them.
//! People and events are not aged; attribute changes and events are recorded as activities at
//! the simulator's time.
//!
//! The simulator never reads the OpenAPI specs at run time; it is written to them.

pub mod config;

mod activities;
mod app_api;
mod audience;
mod auth;
mod campaigns_api;
mod conn;
mod control;
mod demo;
mod error;
mod error_bodies;
mod events;
mod exports;
mod faults;
mod gateway;
mod messages_api;
mod metrics;
mod newsletters_api;
mod sends;
mod signing;
mod sim;
mod state;
mod track_api;
mod track_v2;
mod webhooks;

pub use activities::{ACTIVITY_WINDOW_SECS, SimActivity};
pub use audience::{AttributeOperator, AudienceFilter};
pub use config::{SimApi, SimConfig, TriggerScope};
pub use error::SimError;
pub use events::SimEvent;
pub use exports::{DOWNLOAD_LINK_TTL_SECS, ExportStatus, SimExport};
pub use faults::{Chaos, Fault, RateLimitMode};
pub use gateway::LoggedRequest;
pub use sends::{
    CampaignKind, CampaignState, CampaignTrigger, DeliveryFilter, DeliveryMetric, DeliveryRates,
    MetricTotals, NewBroadcast, NewCampaign, NewNewsletter, PersonEngagement, RatesKey, RuleTotals,
    SimCampaign, SimDelivery, SimNewsletter, SimTrigger,
};
pub use signing::sign_webhook;
pub use sim::{RunningSim, Simulator};
pub use state::{Predicate, SegmentKind, SimPerson, SimSegment};
pub use webhooks::{
    DEFAULT_WEBHOOK_TIMEOUT, InvalidWebhook, ReportingWebhook, SimWebhook, WEBHOOK_RETRY_PERIOD,
    WebhookAttempt,
};
