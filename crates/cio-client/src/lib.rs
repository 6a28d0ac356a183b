//! Typed client for Customer.io's Track and App APIs.
//!
//! Layout:
//! - [`config`]: [`Api`], [`Region`] (hosts per region), [`Credentials`] (keys as
//!   `SecretString`), [`ClientConfig`] and [`RetryConfig`] with their defaults.
//! - [`client`]: [`CioClient`], auth headers, and the single generic request path every call
//!   goes through (URL building, rate limiting, timeout, retries, error mapping, decoding);
//!   [`install_crypto_provider`].
//! - [`endpoint`]: [`Endpoint`] values (API, method, path template, [`RetryPolicy`]), the
//!   [`endpoints`] table and path-segment percent-encoding. Adding a Customer.io call = one
//!   endpoint constant + a few-line method.
//! - [`error`]: [`CioError`] and parsing of Customer.io's error bodies into [`ErrorDetail`]s.
//! - [`retry`]: jittered exponential backoff, `Retry-After` parsing, retry decisions.
//! - [`limiter`]: per-(API, workspace, base URL) pacing shared process-wide: smooth starts,
//!   and never more than the rate within any rolling second at Customer.io (a request holds a
//!   place until a second after its answer). A 429 with `Retry-After` pauses what was
//!   throttled: the whole API, or only broadcast triggers ([`Endpoint::throttle_scope`]).
//! - [`pagination`]: [`paginate`], the cursor stream helper for every `next`-style endpoint.
//! - [`account`]: `account_region()`, `check_account()` ([`AccountCheckError`]: wrong Track
//!   credentials vs wrong region); [`segments`]: segment reads, membership, manual segments.
//! - [`segment_members`]: manual segment membership (Track `add_customers` /
//!   `remove_customers`, at most [`MAX_SEGMENT_MEMBERS_PER_CALL`] ids per call).
//! - [`people`]: Track writes about people: v1 `identify` / `track_event` (what the official
//!   SDKs send) and v2 [`PersonOp`]s one at a time (`entity`) or batched (`batch`, 207 =
//!   per-op [`BatchFailure`]s); [`Identifier`], [`IdType`], size limits.
//! - [`customers`]: App API customer reads: attributes of one or up to 100 people, a person's
//!   segments, lookup by email.
//! - [`campaigns`]: campaigns, API-triggered broadcasts (trigger, status, errors, trigger list),
//!   newsletters (create with content, send) and metrics series ([`MetricSeries::totals`]).
//!
//! - [`activities`]: the activity feed (`/v1/activities`, one person's
//!   `/v1/customers/{id}/activities`): [`Activity`], [`ActivityQuery`], pages and streams.
//! - [`messages`]: deliveries of a campaign, broadcast or newsletter, and one person's
//!   ([`Message`] with only the metrics that happened), pages and streams.
//! - [`exports`]: customer exports (create, poll, signed link) and the credential-free,
//!   bounded-memory download of the file as byte chunks or parsed [`ExportRow`]s
//!   ([`DownloadError`]); [`csv`]: the incremental CSV reader behind it.
//! - [`webhooks`]: receiving reporting webhooks: [`verify_signature`] (constant time, replay
//!   window) and [`parse_reporting_event`] into a [`ReportingEvent`] that keeps unknown metrics,
//!   object types and fields.
//! - [`deadline`]: [`CioClient::with_deadline`] fences a sending call (trigger, newsletter
//!   create/send) by an absolute deadline covering its rate-limiter wait and 429 pauses:
//!   [`SendError::NotSent`] when it could not start by `deadline - timeout` (nothing left).
//!
//! Calls on endpoints with [`RetryPolicy::NeverRetry`] (creating resources, and later every
//! message send) are never repeated once they may have left; a timeout then yields an error with
//! [`CioError::is_outcome_unknown`] true. Keys never appear in `Debug`/`Display` output.

pub mod account;
pub mod activities;
pub mod campaigns;
pub mod client;
pub mod config;
pub mod csv;
pub mod customers;
pub mod deadline;
pub mod endpoint;
pub mod error;
pub mod exports;
pub mod limiter;
pub mod messages;
pub mod pagination;
pub mod people;
#[cfg(test)]
mod proptests;
pub mod retry;
pub mod segment_members;
pub mod segments;
mod serde_util;
pub mod webhooks;

pub use account::{AccountCheckError, AccountRegion};
pub use activities::{Activity, ActivityQuery, ActivityType, AttributeChange, MAX_ACTIVITIES_PAGE};
pub use campaigns::{
    Campaign, MetricSeries, MetricsOf, MetricsQuery, NEWSLETTERS_PAGE, NewNewsletter, Newsletter,
    Recipients, Resolution, TRIGGER_ERRORS_PAGE, Trigger, TriggerStatus,
};
pub use client::{CioClient, USER_AGENT, install_crypto_provider};
pub use config::{Api, ClientConfig, Credentials, ParseRegionError, Region, RetryConfig};
pub use csv::{CsvError, CsvReader};
pub use customers::{CustomerAttributes, CustomerSegment, MAX_CUSTOMERS_PER_LOOKUP};
pub use deadline::{DeadlineClient, NotSent, SendError};
pub use endpoint::{Endpoint, RetryPolicy, TRIGGER_SCOPE, encode_path_segment, endpoints};
pub use error::{CioError, ErrorDetail, parse_error_details};
pub use exports::{DownloadError, Export, ExportRow};
pub use messages::{MAX_MESSAGES_PAGE, Message, MessagesOf, MessagesQuery};
pub use pagination::{Page, paginate};
pub use people::{
    BATCH_ENVELOPE_BYTES, BatchFailure, BatchOutcome, EncodedOp, Event, IdType, Identifier,
    MAX_BATCH_BYTES, MAX_OP_BYTES, PersonAction, PersonOp, batch_body_len, is_ulid,
};
pub use retry::{MAX_HONOURED_RETRY_AFTER, parse_retry_after, parse_retry_after_at};
pub use secrecy::SecretString;
pub use segment_members::MAX_SEGMENT_MEMBERS_PER_CALL;
pub use segments::{
    CustomerIdentifiers, MAX_MEMBERSHIP_PAGE, MembershipPage, Segment, SegmentType,
};
pub use webhooks::{
    Metric, ObjectType, ReportingData, ReportingEvent, WebhookError, parse_reporting_event,
    verify_signature,
};
