//! Endpoints as values: API, method, path template and whether they may be retried.
//!
//! A new Customer.io call is one `pub const` in [`endpoints`] plus a few-line method that hands
//! it to the client's generic request function.

use http::Method;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

use crate::config::Api;
use crate::error::CioError;

/// Whether the client may send a request again on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RetryPolicy {
    /// Repeating the request is harmless: retried on 408/429/5xx, timeouts and transport errors.
    Idempotent,
    /// Repeating could act twice (send a message, create a resource): never retried after the
    /// request may have left. Only a failure to connect (the request provably never left) is
    /// retried. A timeout or a connection lost mid-request gives an error whose
    /// [`is_outcome_unknown`](CioError::is_outcome_unknown) is true.
    NeverRetry,
}

/// One Customer.io operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Which API serves it (base URL, auth, rate limiter).
    pub api: Api,
    /// HTTP method.
    pub method: Method,
    /// Path template with `{name}` placeholders, e.g. `/v1/segments/{segment_id}`. This is
    /// what errors and logs show, never the filled-in path.
    pub template: &'static str,
    /// Automatic retry policy.
    pub retry: RetryPolicy,
}

/// Throttle scope of broadcast triggers (see [`Endpoint::throttle_scope`]).
pub const TRIGGER_SCOPE: &str = "broadcast triggers";

/// RFC 3986 unreserved characters stay; everything else in a segment is percent-encoded.
const PATH_SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Percent-encodes one path segment (`1/` → `1%2F`, `a b` → `a%20b`, `x@y` → `x%40y`). A
/// segment that is exactly `.` or `..` becomes `%2E` / `%2E%2E`: left as is it would be a dot
/// segment that URL resolution removes, taking the path out of its template.
///
/// Note that `url::Url` (WHATWG URL rules, what reqwest sends) treats `%2E` and `%2E%2E` as dot
/// segments too, so such an id still cannot travel in a path through this client: the request
/// is refused before anything is sent, with a [`CioError::Config`].
pub fn encode_path_segment(segment: &str) -> String {
    match segment {
        "." => "%2E".to_owned(),
        ".." => "%2E%2E".to_owned(),
        _ => utf8_percent_encode(segment, PATH_SEGMENT).to_string(),
    }
}

impl Endpoint {
    /// Fills the template's placeholders, in order, with percent-encoded `params`.
    pub fn path(&self, params: &[&str]) -> Result<String, CioError> {
        let mut out = String::with_capacity(self.template.len() + 16);
        let mut rest = self.template;
        let mut params = params.iter();
        while let Some(open) = rest.find('{') {
            out.push_str(&rest[..open]);
            let Some(close) = rest[open..].find('}') else {
                return Err(self.template_error("unclosed '{'"));
            };
            let Some(value) = params.next() else {
                return Err(self.template_error("too few path parameters"));
            };
            out.push_str(&encode_path_segment(value));
            rest = &rest[open + close + 1..];
        }
        out.push_str(rest);
        if params.next().is_some() {
            return Err(self.template_error("too many path parameters"));
        }
        Ok(out)
    }

    /// The part of its API's rate limits this endpoint has to itself, if any. Broadcast
    /// triggers are limited to one per 10 s on top of the App API's 10 requests/s: a 429 on a
    /// trigger pauses only later triggers ([`TRIGGER_SCOPE`]), not metrics polling, segment
    /// sync or profile reads. `None`: a 429 speaks for the whole API.
    pub fn throttle_scope(&self) -> Option<&'static str> {
        (*self == endpoints::TRIGGER_BROADCAST).then_some(TRIGGER_SCOPE)
    }

    fn template_error(&self, what: &str) -> CioError {
        CioError::Config {
            message: format!("endpoint {}: {what}", self.template),
        }
    }
}

/// Every endpoint the client calls.
pub mod endpoints {
    use super::{Endpoint, Method, RetryPolicy};
    use crate::config::Api;

    const fn get(api: Api, template: &'static str) -> Endpoint {
        Endpoint {
            api,
            method: Method::GET,
            template,
            retry: RetryPolicy::Idempotent,
        }
    }

    const fn with(
        api: Api,
        method: Method,
        template: &'static str,
        retry: RetryPolicy,
    ) -> Endpoint {
        Endpoint {
            api,
            method,
            template,
            retry,
        }
    }

    /// `GET /api/v1/accounts/region` (Track auth): region and workspace of the credentials.
    pub const ACCOUNT_REGION: Endpoint = get(Api::Track, "/api/v1/accounts/region");

    /// `PUT /api/v1/customers/{identifier}`: creates or updates a person (v1 identify, what the
    /// official SDKs send). Idempotent: setting the same attributes twice leaves the same person.
    pub const IDENTIFY: Endpoint = with(
        Api::Track,
        Method::PUT,
        "/api/v1/customers/{identifier}",
        RetryPolicy::Idempotent,
    );
    /// `POST /api/v1/customers/{identifier}/events`: one event for a person. Idempotent only
    /// because the client always sends an event `id` (a ULID), on which Customer.io drops
    /// repeats.
    pub const TRACK_EVENT: Endpoint = with(
        Api::Track,
        Method::POST,
        "/api/v1/customers/{identifier}/events",
        RetryPolicy::Idempotent,
    );
    /// `POST /api/v2/entity`: one v2 operation. Idempotent for the operations this client
    /// builds (identify; events with an id).
    pub const ENTITY: Endpoint = with(
        Api::Track,
        Method::POST,
        "/api/v2/entity",
        RetryPolicy::Idempotent,
    );
    /// `POST /api/v2/batch`: many v2 operations; 200 when all were accepted, 207 with per-item
    /// errors otherwise. Idempotent for the same reason as [`ENTITY`]: retrying a whole batch
    /// re-applies identifies and re-sends events Customer.io drops as duplicates.
    pub const BATCH: Endpoint = with(
        Api::Track,
        Method::POST,
        "/api/v2/batch",
        RetryPolicy::Idempotent,
    );

    /// `GET /v1/customers?email=`: the people with an email address.
    pub const FIND_CUSTOMERS_BY_EMAIL: Endpoint = get(Api::App, "/v1/customers");
    /// `GET /v1/customers/{customer_id}/attributes?id_type=`.
    pub const CUSTOMER_ATTRIBUTES: Endpoint =
        get(Api::App, "/v1/customers/{customer_id}/attributes");
    /// `GET /v1/customers/{customer_id}/segments?id_type=`.
    pub const CUSTOMER_SEGMENTS: Endpoint = get(Api::App, "/v1/customers/{customer_id}/segments");
    /// `POST /v1/customers/attributes` `{"ids":[..]}`: attributes of up to 100 people. A POST
    /// that only reads, hence idempotent.
    pub const CUSTOMERS_ATTRIBUTES: Endpoint = with(
        Api::App,
        Method::POST,
        "/v1/customers/attributes",
        RetryPolicy::Idempotent,
    );

    /// `GET /v1/segments`.
    pub const LIST_SEGMENTS: Endpoint = get(Api::App, "/v1/segments");
    /// `GET /v1/segments/{segment_id}`.
    pub const GET_SEGMENT: Endpoint = get(Api::App, "/v1/segments/{segment_id}");
    /// `GET /v1/segments/{segment_id}/customer_count`.
    pub const SEGMENT_CUSTOMER_COUNT: Endpoint =
        get(Api::App, "/v1/segments/{segment_id}/customer_count");
    /// `GET /v1/segments/{segment_id}/membership?start=&limit=`.
    pub const SEGMENT_MEMBERSHIP: Endpoint = get(Api::App, "/v1/segments/{segment_id}/membership");
    /// `POST /v1/segments`: creates a manual segment. Not idempotent (a repeat creates a second
    /// segment), so never retried automatically.
    pub const CREATE_SEGMENT: Endpoint = Endpoint {
        api: Api::App,
        method: Method::POST,
        template: "/v1/segments",
        retry: RetryPolicy::NeverRetry,
    };
    /// `GET /v1/campaigns`.
    pub const LIST_CAMPAIGNS: Endpoint = get(Api::App, "/v1/campaigns");
    /// `GET /v1/campaigns/{campaign_id}`.
    pub const GET_CAMPAIGN: Endpoint = get(Api::App, "/v1/campaigns/{campaign_id}");
    /// `GET /v1/broadcasts`.
    pub const LIST_BROADCASTS: Endpoint = get(Api::App, "/v1/broadcasts");
    /// An API-triggered broadcast.
    pub const GET_BROADCAST: Endpoint = get(Api::App, "/v1/broadcasts/{broadcast_id}");
    /// `GET /v1/newsletters`.
    pub const LIST_NEWSLETTERS: Endpoint = get(Api::App, "/v1/newsletters");
    /// One newsletter.
    pub const GET_NEWSLETTER: Endpoint = get(Api::App, "/v1/newsletters/{newsletter_id}");
    /// `POST /v1/campaigns/{broadcast_id}/triggers`: SENDS the broadcast; Customer.io has no
    /// idempotency key for it, so it is never retried automatically.
    pub const TRIGGER_BROADCAST: Endpoint = with(
        Api::App,
        Method::POST,
        "/v1/campaigns/{broadcast_id}/triggers",
        RetryPolicy::NeverRetry,
    );
    /// `GET /v1/campaigns/{broadcast_id}/triggers/{trigger_id}`.
    pub const TRIGGER_STATUS: Endpoint = get(
        Api::App,
        "/v1/campaigns/{broadcast_id}/triggers/{trigger_id}",
    );
    /// `GET /v1/campaigns/{broadcast_id}/triggers/{trigger_id}/errors?start=&limit=`: the
    /// `line N: ...` errors of a processed trigger, paged.
    pub const TRIGGER_ERRORS: Endpoint = get(
        Api::App,
        "/v1/campaigns/{broadcast_id}/triggers/{trigger_id}/errors",
    );
    /// `GET /v1/broadcasts/{broadcast_id}/triggers`.
    pub const BROADCAST_TRIGGERS: Endpoint =
        get(Api::App, "/v1/broadcasts/{broadcast_id}/triggers");
    /// `POST /v1/newsletters`: creates a newsletter with content; never retried.
    pub const CREATE_NEWSLETTER: Endpoint = with(
        Api::App,
        Method::POST,
        "/v1/newsletters",
        RetryPolicy::NeverRetry,
    );
    /// `POST /v1/newsletters/{newsletter_id}/send`: SENDS it; never retried.
    pub const SEND_NEWSLETTER: Endpoint = with(
        Api::App,
        Method::POST,
        "/v1/newsletters/{newsletter_id}/send",
        RetryPolicy::NeverRetry,
    );
    /// `GET /v1/campaigns/{campaign_id}/metrics`.
    pub const CAMPAIGN_METRICS: Endpoint = get(Api::App, "/v1/campaigns/{campaign_id}/metrics");
    /// `GET /v1/broadcasts/{broadcast_id}/metrics`.
    pub const BROADCAST_METRICS: Endpoint = get(Api::App, "/v1/broadcasts/{broadcast_id}/metrics");
    /// `GET /v1/newsletters/{newsletter_id}/metrics`.
    pub const NEWSLETTER_METRICS: Endpoint =
        get(Api::App, "/v1/newsletters/{newsletter_id}/metrics");
    /// `DELETE /v1/segments/{segment_id}`.
    pub const DELETE_SEGMENT: Endpoint = Endpoint {
        api: Api::App,
        method: Method::DELETE,
        template: "/v1/segments/{segment_id}",
        retry: RetryPolicy::Idempotent,
    };
    /// `GET /v1/activities?type=&name=&customer_id=&id_type=&start=&limit=`: the activity feed.
    pub const ACTIVITIES: Endpoint = get(Api::App, "/v1/activities");
    /// `GET /v1/customers/{customer_id}/activities?id_type=&type=&name=&start=&limit=`.
    pub const CUSTOMER_ACTIVITIES: Endpoint =
        get(Api::App, "/v1/customers/{customer_id}/activities");
    /// `GET /v1/campaigns/{campaign_id}/messages?start=&limit=&metric=&type=`: deliveries.
    pub const CAMPAIGN_MESSAGES: Endpoint = get(Api::App, "/v1/campaigns/{campaign_id}/messages");
    /// `GET /v1/broadcasts/{broadcast_id}/messages?start=&limit=&metric=&state=&type=`.
    pub const BROADCAST_MESSAGES: Endpoint =
        get(Api::App, "/v1/broadcasts/{broadcast_id}/messages");
    /// `GET /v1/newsletters/{newsletter_id}/messages?start=&limit=&metric=`.
    pub const NEWSLETTER_MESSAGES: Endpoint =
        get(Api::App, "/v1/newsletters/{newsletter_id}/messages");
    /// `GET /v1/customers/{customer_id}/messages?id_type=&start=&limit=`: one person's.
    pub const CUSTOMER_MESSAGES: Endpoint = get(Api::App, "/v1/customers/{customer_id}/messages");
    /// `POST /v1/exports/customers`: starts a customer export. Not idempotent (a repeat starts
    /// a second export), so never retried automatically.
    pub const CREATE_CUSTOMER_EXPORT: Endpoint = with(
        Api::App,
        Method::POST,
        "/v1/exports/customers",
        RetryPolicy::NeverRetry,
    );
    /// `GET /v1/exports/{export_id}`.
    pub const GET_EXPORT: Endpoint = get(Api::App, "/v1/exports/{export_id}");
    /// `GET /v1/exports/{export_id}/download`: a signed link to the file, valid 15 minutes.
    pub const EXPORT_DOWNLOAD: Endpoint = get(Api::App, "/v1/exports/{export_id}/download");
    /// `POST /api/v1/segments/{segment_id}/add_customers?id_type=`: adds up to 1000 people to
    /// a manual segment. Idempotent: adding a member again changes nothing.
    pub const ADD_TO_SEGMENT: Endpoint = with(
        Api::Track,
        Method::POST,
        "/api/v1/segments/{segment_id}/add_customers",
        RetryPolicy::Idempotent,
    );
    /// `POST /api/v1/segments/{segment_id}/remove_customers?id_type=`: removes up to 1000
    /// people from a manual segment. Idempotent.
    pub const REMOVE_FROM_SEGMENT: Endpoint = with(
        Api::Track,
        Method::POST,
        "/api/v1/segments/{segment_id}/remove_customers",
        RetryPolicy::Idempotent,
    );
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn encodes_reserved_characters() {
        assert_eq!(encode_path_segment("1/"), "1%2F");
        assert_eq!(encode_path_segment("a b"), "a%20b");
        assert_eq!(encode_path_segment("x@y"), "x%40y");
        assert_eq!(encode_path_segment("a?b#c%d+e"), "a%3Fb%23c%25d%2Be");
        assert_eq!(encode_path_segment("Az09-._~"), "Az09-._~");
        assert_eq!(encode_path_segment("é"), "%C3%A9");
    }

    #[test]
    fn encodes_whole_dot_segments_only() {
        assert_eq!(encode_path_segment("."), "%2E");
        assert_eq!(encode_path_segment(".."), "%2E%2E");
        assert_eq!(encode_path_segment("..."), "...");
        assert_eq!(encode_path_segment("../x"), "..%2Fx");
        assert_eq!(encode_path_segment("a.b"), "a.b");
        assert_eq!(
            endpoints::IDENTIFY.path(&[".."]).unwrap(),
            "/api/v1/customers/%2E%2E"
        );
    }

    #[test]
    fn fills_templates() {
        let ep = Endpoint {
            api: Api::Track,
            method: Method::PUT,
            template: "/api/v1/customers/{identifier}/events",
            retry: RetryPolicy::Idempotent,
        };
        assert_eq!(
            ep.path(&["x@y.com"]).unwrap(),
            "/api/v1/customers/x%40y.com/events"
        );
        assert!(ep.path(&[]).is_err());
        assert!(ep.path(&["a", "b"]).is_err());
        assert_eq!(endpoints::LIST_SEGMENTS.path(&[]).unwrap(), "/v1/segments");
        assert_eq!(
            endpoints::SEGMENT_MEMBERSHIP.path(&["1/"]).unwrap(),
            "/v1/segments/1%2F/membership"
        );
        let err = ep.path(&[]).unwrap_err().to_string();
        assert!(err.contains("{identifier}"), "{err}");
    }

    #[test]
    fn only_triggers_have_their_own_throttle_scope() {
        assert_eq!(
            endpoints::TRIGGER_BROADCAST.throttle_scope(),
            Some(TRIGGER_SCOPE)
        );
        for ep in [
            &endpoints::TRIGGER_STATUS,
            &endpoints::LIST_SEGMENTS,
            &endpoints::CREATE_NEWSLETTER,
            &endpoints::SEND_NEWSLETTER,
            &endpoints::IDENTIFY,
        ] {
            assert_eq!(ep.throttle_scope(), None, "{}", ep.template);
        }
    }

    #[test]
    fn policies() {
        assert_eq!(endpoints::CREATE_SEGMENT.retry, RetryPolicy::NeverRetry);
        assert_eq!(endpoints::GET_SEGMENT.retry, RetryPolicy::Idempotent);
        assert_eq!(endpoints::ACCOUNT_REGION.api, Api::Track);
        for ep in [
            &endpoints::IDENTIFY,
            &endpoints::TRACK_EVENT,
            &endpoints::ENTITY,
            &endpoints::BATCH,
        ] {
            assert_eq!(
                (ep.api, ep.retry),
                (Api::Track, RetryPolicy::Idempotent),
                "{ep:?}"
            );
        }
        for ep in [
            &endpoints::FIND_CUSTOMERS_BY_EMAIL,
            &endpoints::CUSTOMER_ATTRIBUTES,
            &endpoints::CUSTOMER_SEGMENTS,
            &endpoints::CUSTOMERS_ATTRIBUTES,
        ] {
            assert_eq!(
                (ep.api, ep.retry),
                (Api::App, RetryPolicy::Idempotent),
                "{ep:?}"
            );
        }
        assert_eq!(endpoints::IDENTIFY.method, Method::PUT);
        assert_eq!(endpoints::BATCH.method, Method::POST);
        assert_eq!(endpoints::CUSTOMERS_ATTRIBUTES.method, Method::POST);
        assert_eq!(
            endpoints::TRACK_EVENT.path(&["cio_03000001"]).unwrap(),
            "/api/v1/customers/cio_03000001/events"
        );
        assert_eq!(
            endpoints::CUSTOMER_SEGMENTS.path(&["a@b.c"]).unwrap(),
            "/v1/customers/a%40b.c/segments"
        );
    }
}
