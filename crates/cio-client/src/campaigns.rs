//! Campaigns, API-triggered broadcasts, newsletters and their metrics (App API).
//!
//! Sending calls (`trigger_broadcast`, `create_newsletter`, `send_newsletter`) are
//! [`RetryPolicy::NeverRetry`](crate::RetryPolicy): Customer.io has no idempotency key for them,
//! so a timeout after the request left is reported as an outcome-unknown error
//! ([`CioError::is_outcome_unknown`]) for the caller to reconcile, never sent again blindly.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use futures::TryStreamExt as _;
use tokio::time::Instant;

use crate::client::CioClient;
use crate::deadline::SendError;
use crate::endpoint::endpoints;
use crate::error::CioError;
use crate::pagination::{Page, paginate};
use crate::serde_util;

/// A campaign or broadcast as `GET /v1/campaigns` and `/v1/broadcasts` describe it. Unknown
/// fields are ignored; absent ones are `None`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Campaign {
    #[serde(deserialize_with = "serde_util::i64_lenient")]
    pub id: i64,
    #[serde(default, deserialize_with = "serde_util::opt_string")]
    pub deduplicate_id: Option<String>,
    pub name: String,
    /// Customer.io's campaign type, e.g. `segment`, `event`, `triggered_broadcast`.
    #[serde(default, rename = "type", deserialize_with = "serde_util::opt_string")]
    pub kind: Option<String>,
    #[serde(default, deserialize_with = "serde_util::opt_string")]
    pub state: Option<String>,
    #[serde(default)]
    pub active: Option<bool>,
    #[serde(default, deserialize_with = "serde_util::opt_i64")]
    pub created: Option<i64>,
    #[serde(default, deserialize_with = "serde_util::opt_i64")]
    pub updated: Option<i64>,
    #[serde(default)]
    pub tags: Option<Vec<String>>,
}

/// A newsletter (one-time send).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Newsletter {
    #[serde(deserialize_with = "serde_util::i64_lenient")]
    pub id: i64,
    #[serde(default, deserialize_with = "serde_util::opt_string")]
    pub deduplicate_id: Option<String>,
    #[serde(default)]
    pub name: String,
    #[serde(default, rename = "type", deserialize_with = "serde_util::opt_string")]
    pub kind: Option<String>,
    #[serde(default, deserialize_with = "serde_util::opt_i64")]
    pub created: Option<i64>,
    #[serde(default, deserialize_with = "serde_util::opt_i64")]
    pub updated: Option<i64>,
    #[serde(default, deserialize_with = "serde_util::opt_i64")]
    pub sent_at: Option<i64>,
    #[serde(default)]
    pub tags: Option<Vec<String>>,
}

/// Who an API-triggered broadcast goes to.
#[derive(Debug, Clone, PartialEq)]
pub enum Recipients {
    /// An audience filter (`{"segment":{"id":N}}`, `{"and":[..]}`, …).
    Filter(Value),
    /// Customer.io ids (at most 10,000).
    Ids(Vec<String>),
    /// Email addresses (at most 10,000).
    Emails(Vec<String>),
    /// The audience set on the broadcast in Customer.io's UI.
    Default,
}

/// `POST /v1/campaigns/{broadcast_id}/triggers` body.
#[derive(Debug, Clone, PartialEq)]
pub struct Trigger {
    pub recipients: Recipients,
    /// Liquid data for the message (`{{trigger.*}}`), at most 50,000 bytes.
    pub data: Map<String, Value>,
}

impl Serialize for Trigger {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut body = Map::new();
        match &self.recipients {
            Recipients::Filter(filter) => {
                body.insert("recipients".into(), filter.clone());
            }
            Recipients::Ids(ids) => {
                body.insert("ids".into(), Value::from(ids.clone()));
            }
            Recipients::Emails(emails) => {
                body.insert("emails".into(), Value::from(emails.clone()));
            }
            Recipients::Default => {}
        }
        if !self.data.is_empty() {
            body.insert("data".into(), Value::Object(self.data.clone()));
        }
        body.serialize(serializer)
    }
}

/// A broadcast trigger as listed by `GET /v1/broadcasts/{id}/triggers` or looked up by
/// `GET /v1/campaigns/{id}/triggers/{trigger_id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TriggerStatus {
    #[serde(deserialize_with = "serde_util::i64_lenient")]
    pub id: i64,
    #[serde(default, deserialize_with = "serde_util::opt_i64")]
    pub broadcast_id: Option<i64>,
    #[serde(default, deserialize_with = "serde_util::opt_i64")]
    pub created_at: Option<i64>,
    /// Set once Customer.io has processed the trigger.
    #[serde(default, deserialize_with = "serde_util::opt_i64")]
    pub processed_at: Option<i64>,
    #[serde(default, deserialize_with = "serde_util::opt_i64")]
    pub recipients_count: Option<i64>,
    /// Status only: the trigger request as Customer.io received it (audience, `data`, options);
    /// how a sender finds its own trigger by a marker it put in `data`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipients_filter: Option<Value>,
}

/// `POST /v1/newsletters` body: a newsletter with its content. The create schema has no tags:
/// a sender that must find its newsletter again (after a lost answer) puts its own marker in
/// `name` and looks through [`CioClient::list_newsletters`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NewNewsletter {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub name: String,
    pub recipients: Value,
    pub subject: String,
    pub body: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from_id: Option<i64>,
    /// The audience's subscription topic. Required when the workspace's subscription center
    /// is enabled (Customer.io answers `subscription_topic_id is required` without it);
    /// otherwise the newsletter goes to globally subscribed people. Not sent when `None`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subscription_topic_id: Option<i64>,
    pub send_now: bool,
}

impl NewNewsletter {
    /// An email newsletter, not sent on creation.
    pub fn email(
        name: impl Into<String>,
        recipients: Value,
        subject: impl Into<String>,
        body: impl Into<String>,
    ) -> Self {
        Self {
            kind: "email",
            name: name.into(),
            recipients,
            subject: subject.into(),
            body: body.into(),
            from: None,
            from_id: None,
            subscription_topic_id: None,
            send_now: false,
        }
    }
}

/// Whose metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MetricsOf {
    Campaign(i64),
    Broadcast(i64),
    Newsletter(i64),
}

/// Bucket size of a metrics series, finest first (hours nest in days, days in weeks; a week is
/// counted in the month holding its start).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Resolution {
    Hours,
    Days,
    Weeks,
    Months,
}

impl Resolution {
    pub const ALL: [Resolution; 4] = [
        Resolution::Hours,
        Resolution::Days,
        Resolution::Weeks,
        Resolution::Months,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Resolution::Hours => "hours",
            Resolution::Days => "days",
            Resolution::Weeks => "weeks",
            Resolution::Months => "months",
        }
    }
}

impl std::str::FromStr for Resolution {
    type Err = String;

    /// `hours`, `days`, `weeks` or `months`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Resolution::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("unknown resolution `{s}`"))
    }
}

/// A metrics request (version 2): buckets of `res` between `start` and `end` (unix seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricsQuery {
    pub res: Resolution,
    pub start: i64,
    pub end: i64,
}

/// Series per metric (`sent`, `delivered`, `opened`, …), oldest bucket first. Customer.io sends
/// no totals: [`MetricSeries::totals`] sums them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetricSeries {
    pub series: BTreeMap<String, Vec<u64>>,
}

impl MetricSeries {
    pub fn totals(&self) -> BTreeMap<String, u64> {
        self.series
            .iter()
            .map(|(k, v)| (k.clone(), v.iter().sum()))
            .collect()
    }
}

#[derive(Deserialize)]
pub(crate) struct CampaignsResponse {
    #[serde(
        default,
        alias = "broadcasts",
        deserialize_with = "serde_util::null_as_default"
    )]
    campaigns: Vec<Campaign>,
}

#[derive(Deserialize)]
pub(crate) struct CampaignResponse {
    #[serde(alias = "broadcast")]
    campaign: Campaign,
}

#[derive(Deserialize)]
pub(crate) struct NewslettersResponse {
    #[serde(default, deserialize_with = "serde_util::null_as_default")]
    newsletters: Vec<Newsletter>,
    #[serde(default, deserialize_with = "serde_util::opt_string")]
    next: Option<String>,
}

/// Newsletters per page when listing them all.
pub const NEWSLETTERS_PAGE: u32 = 100;

#[derive(Deserialize)]
pub(crate) struct NewsletterResponse {
    newsletter: Newsletter,
}

#[derive(Deserialize)]
pub(crate) struct TriggerCreated {
    #[serde(deserialize_with = "serde_util::i64_lenient")]
    id: i64,
}

#[derive(Deserialize)]
pub(crate) struct TriggersResponse {
    #[serde(default, deserialize_with = "serde_util::null_as_default")]
    triggers: Vec<TriggerStatus>,
}

#[derive(Deserialize)]
#[serde(untagged)]
pub(crate) enum TriggerStatusResponse {
    Wrapped { trigger: TriggerStatus },
    Flat(TriggerStatus),
}

/// A page of `GET /v1/campaigns/{broadcast_id}/triggers/{trigger_id}/errors` (2022 App spec:
/// `{"errors":["line <x>: <error text>",..],"next":<integer>}`).
#[derive(Deserialize)]
pub(crate) struct TriggerErrorsResponse {
    #[serde(default, deserialize_with = "serde_util::null_as_default")]
    errors: Vec<String>,
    #[serde(default, deserialize_with = "serde_util::opt_string")]
    next: Option<String>,
}

/// Trigger errors per page when listing them all.
pub const TRIGGER_ERRORS_PAGE: u32 = 100;

#[derive(Deserialize)]
pub(crate) struct MetricsResponse {
    pub(crate) metric: MetricSeries,
}

impl CioClient {
    /// `GET /v1/campaigns`.
    pub async fn list_campaigns(&self) -> Result<Vec<Campaign>, CioError> {
        let r: CampaignsResponse = self
            .request(&endpoints::LIST_CAMPAIGNS, &[], &[], None::<&()>)
            .await?;
        Ok(r.campaigns)
    }

    /// `GET /v1/campaigns/{campaign_id}`.
    pub async fn get_campaign(&self, id: i64) -> Result<Campaign, CioError> {
        let id = id.to_string();
        let r: CampaignResponse = self
            .request(&endpoints::GET_CAMPAIGN, &[&id], &[], None::<&()>)
            .await?;
        Ok(r.campaign)
    }

    /// `GET /v1/broadcasts`: API-triggered broadcasts.
    pub async fn list_broadcasts(&self) -> Result<Vec<Campaign>, CioError> {
        let r: CampaignsResponse = self
            .request(&endpoints::LIST_BROADCASTS, &[], &[], None::<&()>)
            .await?;
        Ok(r.campaigns)
    }

    /// `GET /v1/broadcasts/{broadcast_id}`.
    pub async fn get_broadcast(&self, id: i64) -> Result<Campaign, CioError> {
        let id = id.to_string();
        let r: CampaignResponse = self
            .request(&endpoints::GET_BROADCAST, &[&id], &[], None::<&()>)
            .await?;
        Ok(r.campaign)
    }

    /// `GET /v1/newsletters/{newsletter_id}`.
    pub async fn get_newsletter(&self, id: i64) -> Result<Newsletter, CioError> {
        let id = id.to_string();
        let r: NewsletterResponse = self
            .request(&endpoints::GET_NEWSLETTER, &[&id], &[], None::<&()>)
            .await?;
        Ok(r.newsletter)
    }

    /// `GET /v1/newsletters`: every newsletter, oldest first, following the `next` cursor.
    pub async fn list_newsletters(&self) -> Result<Vec<Newsletter>, CioError> {
        let pages = paginate(move |start: Option<String>| async move {
            self.newsletters_page(start.as_deref(), NEWSLETTERS_PAGE, false)
                .await
        });
        pages.try_collect().await
    }

    /// `GET /v1/newsletters?limit=&start=&sort=`: one page, oldest first or newest first.
    pub async fn newsletters_page(
        &self,
        start: Option<&str>,
        limit: u32,
        newest_first: bool,
    ) -> Result<Page<Newsletter>, CioError> {
        let mut params = vec![
            ("limit", limit.to_string()),
            (
                "sort",
                if newest_first { "desc" } else { "asc" }.to_string(),
            ),
        ];
        if let Some(start) = start {
            params.push(("start", start.to_string()));
        }
        let r: NewslettersResponse = self
            .request(&endpoints::LIST_NEWSLETTERS, &[], &params, None::<&()>)
            .await?;
        Ok(Page {
            items: r.newsletters,
            next: r.next,
        })
    }

    /// `POST /v1/campaigns/{broadcast_id}/triggers`: sends the broadcast. Never retried: a
    /// timeout comes back with [`CioError::is_outcome_unknown`] true. Answers the trigger id.
    ///
    /// To fence the whole attempt (rate-limiter wait and 429 pauses included) by a deadline,
    /// use [`CioClient::with_deadline`].
    pub async fn trigger_broadcast(
        &self,
        broadcast_id: i64,
        trigger: &Trigger,
    ) -> Result<i64, CioError> {
        Ok(self
            .trigger_broadcast_by(broadcast_id, trigger, None)
            .await?)
    }

    pub(crate) async fn trigger_broadcast_by(
        &self,
        broadcast_id: i64,
        trigger: &Trigger,
        deadline: Option<Instant>,
    ) -> Result<i64, SendError> {
        let id = broadcast_id.to_string();
        let r: TriggerCreated = self
            .request_by(
                &endpoints::TRIGGER_BROADCAST,
                &[&id],
                &[],
                Some(trigger),
                deadline,
            )
            .await?;
        Ok(r.id)
    }

    /// `GET /v1/campaigns/{broadcast_id}/triggers/{trigger_id}`.
    pub async fn trigger_status(
        &self,
        broadcast_id: i64,
        trigger_id: i64,
    ) -> Result<TriggerStatus, CioError> {
        let (b, t) = (broadcast_id.to_string(), trigger_id.to_string());
        let r: TriggerStatusResponse = self
            .request(&endpoints::TRIGGER_STATUS, &[&b, &t], &[], None::<&()>)
            .await?;
        Ok(match r {
            TriggerStatusResponse::Wrapped { trigger } | TriggerStatusResponse::Flat(trigger) => {
                trigger
            }
        })
    }

    /// `GET /v1/campaigns/{broadcast_id}/triggers/{trigger_id}/errors?start=&limit=`: one
    /// page of a processed trigger's errors, each a line like `line 3: customer id "x" does not
    /// exist` (ids or emails not found, data file problems). `start` is the previous page's
    /// `next` (an opaque cursor; Customer.io sends an integer).
    pub async fn trigger_errors_page(
        &self,
        broadcast_id: i64,
        trigger_id: i64,
        start: Option<&str>,
        limit: u32,
    ) -> Result<Page<String>, CioError> {
        let (b, t) = (broadcast_id.to_string(), trigger_id.to_string());
        let mut params = vec![("limit", limit.to_string())];
        if let Some(start) = start {
            params.push(("start", start.to_string()));
        }
        let r: TriggerErrorsResponse = self
            .request(&endpoints::TRIGGER_ERRORS, &[&b, &t], &params, None::<&()>)
            .await?;
        Ok(Page {
            items: r.errors,
            next: r.next,
        })
    }

    /// Every error of a processed trigger, following `next` ([`TRIGGER_ERRORS_PAGE`] per
    /// page). Empty for a trigger without errors; [`CioError::NotFound`] for an unknown
    /// broadcast or trigger.
    pub async fn trigger_errors(
        &self,
        broadcast_id: i64,
        trigger_id: i64,
    ) -> Result<Vec<String>, CioError> {
        let pages = paginate(move |start: Option<String>| async move {
            self.trigger_errors_page(
                broadcast_id,
                trigger_id,
                start.as_deref(),
                TRIGGER_ERRORS_PAGE,
            )
            .await
        });
        pages.try_collect().await
    }

    /// `GET /v1/broadcasts/{broadcast_id}/triggers`: every trigger of a broadcast (used to find
    /// out whether a trigger whose answer was lost did arrive).
    pub async fn broadcast_triggers(
        &self,
        broadcast_id: i64,
    ) -> Result<Vec<TriggerStatus>, CioError> {
        let id = broadcast_id.to_string();
        let r: TriggersResponse = self
            .request(&endpoints::BROADCAST_TRIGGERS, &[&id], &[], None::<&()>)
            .await?;
        Ok(r.triggers)
    }

    /// `POST /v1/newsletters`: creates a newsletter with its content. Never retried. With a
    /// deadline: [`CioClient::with_deadline`].
    pub async fn create_newsletter(
        &self,
        newsletter: &NewNewsletter,
    ) -> Result<Newsletter, CioError> {
        Ok(self.create_newsletter_by(newsletter, None).await?)
    }

    pub(crate) async fn create_newsletter_by(
        &self,
        newsletter: &NewNewsletter,
        deadline: Option<Instant>,
    ) -> Result<Newsletter, SendError> {
        let r: NewsletterResponse = self
            .request_by(
                &endpoints::CREATE_NEWSLETTER,
                &[],
                &[],
                Some(newsletter),
                deadline,
            )
            .await?;
        Ok(r.newsletter)
    }

    /// `POST /v1/newsletters/{newsletter_id}/send` with the body `{}` (no options: the request
    /// is JSON, and an empty body is not a JSON document). Never retried.
    /// With a deadline: [`CioClient::with_deadline`].
    pub async fn send_newsletter(&self, newsletter_id: i64) -> Result<(), CioError> {
        Ok(self.send_newsletter_by(newsletter_id, None).await?)
    }

    pub(crate) async fn send_newsletter_by(
        &self,
        newsletter_id: i64,
        deadline: Option<Instant>,
    ) -> Result<(), SendError> {
        let id = newsletter_id.to_string();
        let _: serde::de::IgnoredAny = self
            .request_by(
                &endpoints::SEND_NEWSLETTER,
                &[&id],
                &[],
                Some(&Map::new()),
                deadline,
            )
            .await?;
        Ok(())
    }

    /// `GET /v1/{campaigns|broadcasts|newsletters}/{id}/metrics?version=2&res=&start=&end=&tz=`,
    /// bucketed in the client's [`metrics_tz`](Self::metrics_tz).
    pub async fn metrics(
        &self,
        of: MetricsOf,
        query: MetricsQuery,
    ) -> Result<MetricSeries, CioError> {
        self.metrics_in(of, query, self.metrics_tz()).await
    }

    /// [`metrics`](Self::metrics) bucketed in the IANA time zone `tz` (e.g. a workspace or
    /// user setting) instead of the client's default. An unknown zone is a
    /// [`CioError::Config`], nothing sent.
    pub async fn metrics_in(
        &self,
        of: MetricsOf,
        query: MetricsQuery,
        tz: &str,
    ) -> Result<MetricSeries, CioError> {
        crate::client::check_time_zone(tz)?;
        let (endpoint, id) = match of {
            MetricsOf::Campaign(id) => (&endpoints::CAMPAIGN_METRICS, id),
            MetricsOf::Broadcast(id) => (&endpoints::BROADCAST_METRICS, id),
            MetricsOf::Newsletter(id) => (&endpoints::NEWSLETTER_METRICS, id),
        };
        let id = id.to_string();
        let params = [
            ("version", "2".to_string()),
            ("res", query.res.as_str().to_string()),
            ("start", query.start.to_string()),
            ("end", query.end.to_string()),
            ("tz", tz.to_string()),
        ];
        let r: MetricsResponse = self.request(endpoint, &[&id], &params, None::<&()>).await?;
        Ok(r.metric)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use serde_json::json;

    use super::*;
    use crate::endpoint::RetryPolicy;

    #[test]
    fn sending_endpoints_are_never_retried() {
        for e in [
            &endpoints::TRIGGER_BROADCAST,
            &endpoints::CREATE_NEWSLETTER,
            &endpoints::SEND_NEWSLETTER,
        ] {
            assert_eq!(e.retry, RetryPolicy::NeverRetry, "{}", e.template);
        }
        for e in [
            &endpoints::TRIGGER_STATUS,
            &endpoints::TRIGGER_ERRORS,
            &endpoints::BROADCAST_TRIGGERS,
            &endpoints::CAMPAIGN_METRICS,
            &endpoints::LIST_NEWSLETTERS,
        ] {
            assert_eq!(e.retry, RetryPolicy::Idempotent, "{}", e.template);
        }
    }

    #[test]
    fn trigger_bodies_carry_exactly_one_recipient_form() {
        let data: Map<String, Value> = json!({"headline": "Q4"}).as_object().cloned().unwrap();
        let filter = Trigger {
            recipients: Recipients::Filter(json!({"segment": {"id": 3}})),
            data: data.clone(),
        };
        assert_eq!(
            serde_json::to_value(&filter).unwrap(),
            json!({"recipients": {"segment": {"id": 3}}, "data": {"headline": "Q4"}})
        );
        let ids = Trigger {
            recipients: Recipients::Ids(vec!["u1".into()]),
            data: Map::new(),
        };
        assert_eq!(serde_json::to_value(&ids).unwrap(), json!({"ids": ["u1"]}));
        let default = Trigger {
            recipients: Recipients::Default,
            data: Map::new(),
        };
        assert_eq!(serde_json::to_value(&default).unwrap(), json!({}));
    }

    #[test]
    fn newsletter_bodies_carry_a_topic_only_when_set() {
        let mut new = NewNewsletter::email("n", json!({"segment": {"id": 1}}), "s", "<p>b</p>");
        let body = serde_json::to_value(&new).unwrap();
        assert!(body.get("subscription_topic_id").is_none(), "{body}");
        new.subscription_topic_id = Some(3);
        let body = serde_json::to_value(&new).unwrap();
        assert_eq!(body["subscription_topic_id"], 3);
        assert_eq!(body["type"], "email");
    }

    #[test]
    fn resolutions_round_trip_and_order_finest_first() {
        for res in Resolution::ALL {
            assert_eq!(res.as_str().parse::<Resolution>(), Ok(res));
        }
        assert!("day".parse::<Resolution>().is_err());
        assert!(Resolution::Hours < Resolution::Days && Resolution::Weeks < Resolution::Months);
    }

    #[test]
    fn parses_triggers_campaigns_and_metrics() {
        let status: TriggerStatusResponse =
            serde_json::from_str(r#"{"id":"12","broadcast_id":4,"created_at":1,"processed_at":null,"recipients_count":30}"#).unwrap();
        let TriggerStatusResponse::Flat(status) = status else {
            panic!("flat")
        };
        assert_eq!(
            (status.id, status.processed_at, status.recipients_count),
            (12, None, Some(30))
        );
        let list: TriggersResponse = serde_json::from_str(r#"{"triggers":[{"id":3,"broadcast_id":2,"created_at":1552341937,"processed_at":1552341940}]}"#).unwrap();
        assert_eq!(list.triggers[0].processed_at, Some(1_552_341_940));
        let campaigns: CampaignsResponse = serde_json::from_str(r#"{"broadcasts":[{"id":2,"name":"Alert","type":"triggered_broadcast","created":1,"updated":2,"active":true,"extra":[]}]}"#).unwrap();
        assert_eq!(
            campaigns.campaigns[0].kind.as_deref(),
            Some("triggered_broadcast")
        );
        let errors: TriggerErrorsResponse = serde_json::from_str(
            r#"{"errors":["line 1: customer id \"x\" does not exist"],"next":1}"#,
        )
        .unwrap();
        assert_eq!(errors.errors.len(), 1);
        assert_eq!(errors.next.as_deref(), Some("1"));
        let last: TriggerErrorsResponse = serde_json::from_str(r#"{"errors":null}"#).unwrap();
        assert!(last.errors.is_empty() && last.next.is_none());
        let metrics: MetricsResponse =
            serde_json::from_str(r#"{"metric":{"series":{"sent":[1,2,3],"opened":[0,1,1]}}}"#)
                .unwrap();
        assert_eq!(metrics.metric.totals().get("sent"), Some(&6));
        assert_eq!(metrics.metric.totals().get("opened"), Some(&2));
    }
}
