//! Deliveries ("messages", App API): `GET /v1/{campaigns,broadcasts,newsletters}/{id}/messages`
//! and one person's `GET /v1/customers/{customer_id}/messages`, cursor-paged: attribution by
//! polling, without webhooks.
//!
//! A [`Message`]'s `metrics` hold only what has happened (unix times by metric name), so a
//! delivery opened since the last poll shows an `opened` it did not have before.

use std::collections::BTreeMap;

use futures::Stream;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use crate::client::CioClient;
use crate::endpoint::{Endpoint, endpoints};
use crate::error::CioError;
use crate::pagination::{Page, paginate};
use crate::people::IdType;
use crate::segments::CustomerIdentifiers;
use crate::serde_util;

/// Customer.io's largest messages page.
pub const MAX_MESSAGES_PAGE: u32 = 1000;

/// One delivery. Unknown fields are ignored; parents that do not apply are `None`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// The delivery id (what reporting webhooks call `delivery_id`).
    #[serde(deserialize_with = "serde_util::i64_or_string")]
    pub id: String,
    /// Unique id.
    #[serde(default, deserialize_with = "serde_util::opt_string")]
    pub deduplicate_id: Option<String>,
    /// The template (action or newsletter content). Deprecated by Customer.io.
    #[serde(default, deserialize_with = "serde_util::opt_i64")]
    pub message_template_id: Option<i64>,
    /// The person's id (`None` without one, or deleted since).
    #[serde(default, deserialize_with = "serde_util::opt_string")]
    pub customer_id: Option<String>,
    /// The person's identifiers.
    #[serde(default, deserialize_with = "serde_util::null_as_default")]
    pub customer_identifiers: CustomerIdentifiers,
    /// Address it was sent to.
    #[serde(default, deserialize_with = "serde_util::opt_string")]
    pub recipient: Option<String>,
    /// Email subject.
    #[serde(default, deserialize_with = "serde_util::opt_string")]
    pub subject: Option<String>,
    /// When each metric happened (unix seconds), only those that have: `created`, `sent`,
    /// `delivered`, `opened`, `clicked`, `converted`, `bounced`, `spammed`, `unsubscribed`,
    /// `failed`, ...
    #[serde(default, deserialize_with = "metrics_map")]
    pub metrics: BTreeMap<String, i64>,
    /// Created, unix seconds.
    #[serde(default, deserialize_with = "serde_util::opt_i64")]
    pub created: Option<i64>,
    /// Why it failed or bounced.
    #[serde(default, deserialize_with = "serde_util::opt_string")]
    pub failure_message: Option<String>,
    /// Campaign parent.
    #[serde(default, deserialize_with = "serde_util::opt_i64")]
    pub campaign_id: Option<i64>,
    /// Campaign or broadcast action.
    #[serde(default, deserialize_with = "serde_util::opt_i64")]
    pub action_id: Option<i64>,
    /// API-triggered broadcast parent.
    #[serde(default, deserialize_with = "serde_util::opt_i64")]
    pub broadcast_id: Option<i64>,
    /// Broadcast trigger, when the answer carries one (the spec's object has none).
    #[serde(default, deserialize_with = "serde_util::opt_i64")]
    pub trigger_id: Option<i64>,
    /// Newsletter parent.
    #[serde(default, deserialize_with = "serde_util::opt_i64")]
    pub newsletter_id: Option<i64>,
    /// Newsletter content (variant).
    #[serde(default, deserialize_with = "serde_util::opt_i64")]
    pub content_id: Option<i64>,
    /// `email`, `push`, `webhook`, ...
    #[serde(default, rename = "type", deserialize_with = "serde_util::opt_string")]
    pub message_type: Option<String>,
    /// Contents not retained by Customer.io.
    #[serde(default, deserialize_with = "serde_util::opt_bool")]
    pub forgotten: Option<bool>,
}

/// Metric times, skipping entries that are not integers (nothing else fails a page).
fn metrics_map<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, i64>, D::Error> {
    let raw: Option<BTreeMap<String, Value>> = Option::deserialize(d)?;
    Ok(raw
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(k, v)| {
            let n = match &v {
                Value::Number(n) => n.as_i64(),
                Value::String(s) => s.trim().parse().ok(),
                _ => None,
            }?;
            Some((k, n))
        })
        .collect())
}

impl Message {
    /// When `metric` happened, if it has.
    pub fn metric(&self, metric: &str) -> Option<i64> {
        self.metrics.get(metric).copied()
    }
}

/// Whose deliveries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessagesOf {
    /// A campaign's.
    Campaign(i64),
    /// An API-triggered broadcast's (all its triggers).
    Broadcast(i64),
    /// A newsletter's.
    Newsletter(i64),
}

impl MessagesOf {
    fn endpoint(self) -> (Endpoint, i64) {
        match self {
            MessagesOf::Campaign(id) => (endpoints::CAMPAIGN_MESSAGES, id),
            MessagesOf::Broadcast(id) => (endpoints::BROADCAST_MESSAGES, id),
            MessagesOf::Newsletter(id) => (endpoints::NEWSLETTER_MESSAGES, id),
        }
    }
}

/// Filters and page size of a messages listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessagesQuery {
    /// Only deliveries that reached this metric (`delivered`, `opened`, `clicked`, ...).
    pub metric: Option<String>,
    /// Only this channel (`email`, ...).
    pub message_type: Option<String>,
    /// Broadcasts only: `sent`, `failed`, `drafted`, `attempted`.
    pub state: Option<String>,
    /// Page size, 1..=[`MAX_MESSAGES_PAGE`].
    pub limit: u32,
}

impl Default for MessagesQuery {
    fn default() -> Self {
        Self {
            metric: None,
            message_type: None,
            state: None,
            limit: MAX_MESSAGES_PAGE,
        }
    }
}

impl MessagesQuery {
    /// Every delivery, 1000 per page.
    pub fn new() -> Self {
        Self::default()
    }

    /// Only deliveries that reached `metric`.
    pub fn with_metric(mut self, metric: &str) -> Self {
        self.metric = Some(metric.to_owned());
        self
    }

    /// Page size.
    pub fn with_limit(mut self, limit: u32) -> Self {
        self.limit = limit;
        self
    }

    fn params(&self, start: Option<&str>) -> Result<Vec<(&'static str, String)>, CioError> {
        let mut params = limit_and_start(self.limit, start)?;
        for (key, value) in [
            ("metric", &self.metric),
            ("type", &self.message_type),
            ("state", &self.state),
        ] {
            if let Some(value) = value {
                params.push((key, value.clone()));
            }
        }
        Ok(params)
    }
}

fn limit_and_start(
    limit: u32,
    start: Option<&str>,
) -> Result<Vec<(&'static str, String)>, CioError> {
    if !(1..=MAX_MESSAGES_PAGE).contains(&limit) {
        return Err(CioError::Config {
            message: format!("messages limit must be 1..={MAX_MESSAGES_PAGE}, got {limit}"),
        });
    }
    let mut params = vec![("limit", limit.to_string())];
    if let Some(start) = start.filter(|s| !s.is_empty()) {
        params.push(("start", start.to_owned()));
    }
    Ok(params)
}

#[derive(Deserialize)]
struct MessagesResponse {
    #[serde(default, deserialize_with = "serde_util::null_as_default")]
    messages: Vec<Message>,
    #[serde(default, deserialize_with = "serde_util::opt_string")]
    next: Option<String>,
}

impl From<MessagesResponse> for Page<Message> {
    fn from(r: MessagesResponse) -> Self {
        Page {
            items: r.messages,
            next: r.next.filter(|n| !n.is_empty()),
        }
    }
}

impl CioClient {
    /// One page of a campaign's, broadcast's or newsletter's deliveries; `start` is the
    /// previous page's `next`. [`CioError::NotFound`] for an unknown (or other kind of) id; a
    /// limit outside 1..=1000 is a [`CioError::Config`] (nothing sent).
    pub async fn messages_page(
        &self,
        of: MessagesOf,
        query: &MessagesQuery,
        start: Option<&str>,
    ) -> Result<Page<Message>, CioError> {
        let params = query.params(start)?;
        let (endpoint, id) = of.endpoint();
        let id = id.to_string();
        let r: MessagesResponse = self
            .request(&endpoint, &[&id], &params, None::<&()>)
            .await?;
        Ok(r.into())
    }

    /// `GET /v1/campaigns/{campaign_id}/messages`, one page.
    pub async fn campaign_messages_page(
        &self,
        campaign_id: i64,
        query: &MessagesQuery,
        start: Option<&str>,
    ) -> Result<Page<Message>, CioError> {
        self.messages_page(MessagesOf::Campaign(campaign_id), query, start)
            .await
    }

    /// `GET /v1/broadcasts/{broadcast_id}/messages`, one page.
    pub async fn broadcast_messages_page(
        &self,
        broadcast_id: i64,
        query: &MessagesQuery,
        start: Option<&str>,
    ) -> Result<Page<Message>, CioError> {
        self.messages_page(MessagesOf::Broadcast(broadcast_id), query, start)
            .await
    }

    /// `GET /v1/newsletters/{newsletter_id}/messages`, one page.
    pub async fn newsletter_messages_page(
        &self,
        newsletter_id: i64,
        query: &MessagesQuery,
        start: Option<&str>,
    ) -> Result<Page<Message>, CioError> {
        self.messages_page(MessagesOf::Newsletter(newsletter_id), query, start)
            .await
    }

    /// Every delivery of a campaign, broadcast or newsletter, page after page.
    pub fn messages(
        &self,
        of: MessagesOf,
        query: MessagesQuery,
    ) -> impl Stream<Item = Result<Message, CioError>> + Send + 'static {
        let client = self.clone();
        paginate(move |start: Option<String>| {
            let client = client.clone();
            let query = query.clone();
            async move { client.messages_page(of, &query, start.as_deref()).await }
        })
    }

    /// One page of `GET /v1/customers/{customer_id}/messages` (limit 1..=1000);
    /// [`CioError::NotFound`] for an unknown person.
    pub async fn customer_messages_page(
        &self,
        identifier: &str,
        id_type: IdType,
        limit: u32,
        start: Option<&str>,
    ) -> Result<Page<Message>, CioError> {
        if identifier.is_empty() {
            return Err(CioError::Config {
                message: "customer identifier is empty".to_owned(),
            });
        }
        let mut params = limit_and_start(limit, start)?;
        params.push(("id_type", id_type.as_str().to_owned()));
        let r: MessagesResponse = self
            .request(
                &endpoints::CUSTOMER_MESSAGES,
                &[identifier],
                &params,
                None::<&()>,
            )
            .await?;
        Ok(r.into())
    }

    /// Every delivery to one person, page after page.
    pub fn customer_messages(
        &self,
        identifier: &str,
        id_type: IdType,
        limit: u32,
    ) -> impl Stream<Item = Result<Message, CioError>> + Send + 'static {
        let client = self.clone();
        let identifier = identifier.to_owned();
        paginate(move |start: Option<String>| {
            let client = client.clone();
            let identifier = identifier.clone();
            async move {
                client
                    .customer_messages_page(&identifier, id_type, limit, start.as_deref())
                    .await
            }
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_the_spec_object_leniently() {
        let r: MessagesResponse = serde_json::from_value(json!({
            "messages": [{
                "id": "d1", "deduplicate_id": "d1:1", "message_template_id": 5,
                "customer_id": null,
                "customer_identifiers": {"id": null, "email": "a@b.io", "cio_id": "c1"},
                "recipient": "a@b.io", "subject": "Hi",
                "metrics": {"sent": 10, "opened": "12", "weird": {"x": 1}},
                "created": 10, "failure_message": null,
                "campaign_id": null, "action_id": 5, "broadcast_id": 3,
                "newsletter_id": null, "content_id": null,
                "type": "email", "forgotten": false, "extra": 1
            }],
            "next": "abc"
        }))
        .unwrap();
        let page: Page<Message> = r.into();
        assert_eq!(page.next.as_deref(), Some("abc"));
        let m = &page.items[0];
        assert_eq!(m.metric("opened"), Some(12));
        assert_eq!(m.metric("clicked"), None);
        assert_eq!(m.metrics.len(), 2);
        assert_eq!(m.broadcast_id, Some(3));
        assert_eq!(m.customer_identifiers.email.as_deref(), Some("a@b.io"));
        assert_eq!(m.customer_id, None);
    }

    #[test]
    fn limits_are_checked_before_sending() {
        assert!(MessagesQuery::new().with_limit(0).params(None).is_err());
        assert!(MessagesQuery::new().with_limit(1001).params(None).is_err());
        assert_eq!(
            MessagesQuery::new()
                .with_metric("opened")
                .with_limit(2)
                .params(Some("x"))
                .unwrap(),
            vec![
                ("limit", "2".to_owned()),
                ("start", "x".to_owned()),
                ("metric", "opened".to_owned())
            ]
        );
    }
}
