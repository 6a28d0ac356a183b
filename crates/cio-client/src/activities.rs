//! The activity feed (App API): `GET /v1/activities` (the workspace, or one person with
//! `customer_id` + `id_type`) and `GET /v1/customers/{customer_id}/activities`, cursor-paged.
//!
//! Customer.io guarantees the last 30 days only. Pages come newest first; a reader after
//! changes since its last run reads from the top until it meets an activity `id` it has
//! already seen (ids are opaque: compare them for equality only), or one older than its
//! last-seen `timestamp`.
//!
//! Activity types the crate does not name, and unexpected fields, are kept
//! ([`ActivityType::Other`], [`Activity::data`]) so nothing is lost.

use std::fmt;

use futures::Stream;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

use crate::client::CioClient;
use crate::endpoint::endpoints;
use crate::error::CioError;
use crate::pagination::{Page, paginate};
use crate::people::IdType;
use crate::segments::CustomerIdentifiers;
use crate::serde_util;

/// Customer.io's largest activities page.
pub const MAX_ACTIVITIES_PAGE: u32 = 100;

macro_rules! activity_types {
    ($($variant:ident => $name:literal),* $(,)?) => {
        /// An activity type (`type`). Types not named here are kept as [`ActivityType::Other`].
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        pub enum ActivityType {
            $(
                #[doc = concat!("`", $name, "`")]
                $variant,
            )*
            /// Any other type, as sent.
            Other(String),
        }

        impl ActivityType {
            /// The wire name.
            pub fn as_str(&self) -> &str {
                match self {
                    $(ActivityType::$variant => $name,)*
                    ActivityType::Other(other) => other,
                }
            }

            /// Reads a wire name.
            pub fn parse(name: &str) -> Self {
                match name {
                    $($name => ActivityType::$variant,)*
                    other => ActivityType::Other(other.to_owned()),
                }
            }
        }
    };
}

activity_types! {
    Page => "page",
    Event => "event",
    AttributeChange => "attribute_change",
    FailedAttributeChange => "failed_attribute_change",
    DraftedEmail => "drafted_email",
    AttemptedEmail => "attempted_email",
    SentEmail => "sent_email",
    DeliveredEmail => "delivered_email",
    OpenedEmail => "opened_email",
    ClickedEmail => "clicked_email",
    ConvertedEmail => "converted_email",
    BouncedEmail => "bounced_email",
    SpammedEmail => "spammed_email",
    UnsubscribedEmail => "unsubscribed_email",
    DroppedEmail => "dropped_email",
    FailedEmail => "failed_email",
    UndeliverableEmail => "undeliverable_email",
    DeviceChange => "device_change",
}

impl fmt::Display for ActivityType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for ActivityType {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for ActivityType {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(ActivityType::parse(&String::deserialize(d)?))
    }
}

/// One activity. Unknown fields are ignored; `data` is kept whole.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Activity {
    /// Activity id (opaque; unique).
    #[serde(deserialize_with = "serde_util::i64_or_string")]
    pub id: String,
    /// The person's id (`None` for a person without one). Deprecated by Customer.io in favour
    /// of `customer_identifiers`.
    #[serde(default, deserialize_with = "serde_util::opt_string")]
    pub customer_id: Option<String>,
    /// The person's identifiers.
    #[serde(default, deserialize_with = "serde_util::null_as_default")]
    pub customer_identifiers: CustomerIdentifiers,
    /// What happened.
    #[serde(rename = "type")]
    pub activity_type: ActivityType,
    /// Attribute or event name, when the answer carries one.
    #[serde(default, deserialize_with = "serde_util::opt_string")]
    pub name: Option<String>,
    /// When it happened, unix seconds.
    #[serde(default, deserialize_with = "serde_util::opt_i64")]
    pub timestamp: Option<i64>,
    /// Type-specific data: `{"<attribute>":{"from","to"}}` for attribute changes, the event's
    /// data, or `{"delivery_id","delivered","opened"}` for a delivery.
    #[serde(default)]
    pub data: Value,
    /// The delivery, for message activities.
    #[serde(default, deserialize_with = "serde_util::opt_string")]
    pub delivery_id: Option<String>,
    /// `email`, `ios`, `android`, `phone`.
    #[serde(default, deserialize_with = "serde_util::opt_string")]
    pub delivery_type: Option<String>,
}

/// One attribute change of an `attribute_change` activity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttributeChange {
    /// Attribute name.
    pub name: String,
    /// Value before (`""` when the person did not have it).
    pub from: String,
    /// Value after (`""` when it was removed).
    pub to: String,
}

fn text(value: Option<&Value>) -> String {
    match value {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

impl Activity {
    /// The attribute changes of an `attribute_change` activity (empty for other types), by
    /// name.
    pub fn attribute_changes(&self) -> Vec<AttributeChange> {
        if self.activity_type != ActivityType::AttributeChange {
            return Vec::new();
        }
        let Value::Object(map) = &self.data else {
            return Vec::new();
        };
        let mut changes: Vec<AttributeChange> = map
            .iter()
            .map(|(name, change)| AttributeChange {
                name: name.clone(),
                from: text(change.get("from")),
                to: text(change.get("to")),
            })
            .collect();
        changes.sort_by(|a, b| a.name.cmp(&b.name));
        changes
    }
}

/// Which activities to list, and how many per page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActivityQuery {
    /// Only this type.
    pub activity_type: Option<ActivityType>,
    /// Only this attribute or event name.
    pub name: Option<String>,
    /// Only this person (`GET /v1/activities` only; the customer route names its person).
    pub customer: Option<(String, IdType)>,
    /// Page size, 1..=[`MAX_ACTIVITIES_PAGE`].
    pub limit: u32,
}

impl Default for ActivityQuery {
    fn default() -> Self {
        Self {
            activity_type: None,
            name: None,
            customer: None,
            limit: MAX_ACTIVITIES_PAGE,
        }
    }
}

impl ActivityQuery {
    /// Every activity, 100 per page.
    pub fn new() -> Self {
        Self::default()
    }

    /// Only activities of this type.
    pub fn of_type(mut self, activity_type: ActivityType) -> Self {
        self.activity_type = Some(activity_type);
        self
    }

    /// Only this attribute or event name.
    pub fn named(mut self, name: &str) -> Self {
        self.name = Some(name.to_owned());
        self
    }

    /// Only this person.
    pub fn for_customer(mut self, identifier: &str, id_type: IdType) -> Self {
        self.customer = Some((identifier.to_owned(), id_type));
        self
    }

    /// Page size.
    pub fn with_limit(mut self, limit: u32) -> Self {
        self.limit = limit;
        self
    }

    fn params(
        &self,
        start: Option<&str>,
        with_customer: bool,
    ) -> Result<Vec<(&'static str, String)>, CioError> {
        if !(1..=MAX_ACTIVITIES_PAGE).contains(&self.limit) {
            return Err(CioError::Config {
                message: format!(
                    "activities limit must be 1..={MAX_ACTIVITIES_PAGE}, got {}",
                    self.limit
                ),
            });
        }
        let mut query = vec![("limit", self.limit.to_string())];
        if let Some(t) = &self.activity_type {
            query.push(("type", t.as_str().to_owned()));
        }
        if let Some(name) = &self.name {
            query.push(("name", name.clone()));
        }
        if with_customer && let Some((identifier, id_type)) = &self.customer {
            if identifier.is_empty() {
                return Err(CioError::Config {
                    message: "customer identifier is empty".to_owned(),
                });
            }
            query.push(("customer_id", identifier.clone()));
            query.push(("id_type", id_type.as_str().to_owned()));
        }
        if let Some(start) = start.filter(|s| !s.is_empty()) {
            query.push(("start", start.to_owned()));
        }
        Ok(query)
    }
}

#[derive(Deserialize)]
struct ActivitiesResponse {
    #[serde(default, deserialize_with = "serde_util::null_as_default")]
    activities: Vec<Activity>,
    #[serde(default, deserialize_with = "serde_util::opt_string")]
    next: Option<String>,
}

impl From<ActivitiesResponse> for Page<Activity> {
    fn from(r: ActivitiesResponse) -> Self {
        Page {
            items: r.activities,
            next: r.next.filter(|n| !n.is_empty()),
        }
    }
}

impl CioClient {
    /// One page of `GET /v1/activities` (newest first); `start` is the previous page's `next`.
    /// A limit outside 1..=100 is a [`CioError::Config`] (nothing sent).
    pub async fn activities_page(
        &self,
        query: &ActivityQuery,
        start: Option<&str>,
    ) -> Result<Page<Activity>, CioError> {
        let params = query.params(start, true)?;
        let r: ActivitiesResponse = self
            .request(&endpoints::ACTIVITIES, &[], &params, None::<&()>)
            .await?;
        Ok(r.into())
    }

    /// Every activity of `GET /v1/activities`, page after page (see [`crate::paginate`]).
    pub fn activities(
        &self,
        query: ActivityQuery,
    ) -> impl Stream<Item = Result<Activity, CioError>> + Send + 'static {
        let client = self.clone();
        paginate(move |start: Option<String>| {
            let client = client.clone();
            let query = query.clone();
            async move { client.activities_page(&query, start.as_deref()).await }
        })
    }

    /// One page of `GET /v1/customers/{customer_id}/activities` (one person's history, newest
    /// first; `query.customer` is ignored); [`CioError::NotFound`] for an unknown person.
    pub async fn customer_activities_page(
        &self,
        identifier: &str,
        id_type: IdType,
        query: &ActivityQuery,
        start: Option<&str>,
    ) -> Result<Page<Activity>, CioError> {
        if identifier.is_empty() {
            return Err(CioError::Config {
                message: "customer identifier is empty".to_owned(),
            });
        }
        let mut params = query.params(start, false)?;
        params.push(("id_type", id_type.as_str().to_owned()));
        let r: ActivitiesResponse = self
            .request(
                &endpoints::CUSTOMER_ACTIVITIES,
                &[identifier],
                &params,
                None::<&()>,
            )
            .await?;
        Ok(r.into())
    }

    /// Every activity of one person, page after page.
    pub fn customer_activities(
        &self,
        identifier: &str,
        id_type: IdType,
        query: ActivityQuery,
    ) -> impl Stream<Item = Result<Activity, CioError>> + Send + 'static {
        let client = self.clone();
        let identifier = identifier.to_owned();
        paginate(move |start: Option<String>| {
            let client = client.clone();
            let query = query.clone();
            let identifier = identifier.clone();
            async move {
                client
                    .customer_activities_page(&identifier, id_type, &query, start.as_deref())
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
    fn parses_the_spec_shapes_and_keeps_unknown_types() {
        let page: ActivitiesResponse = serde_json::from_value(json!({
            "activities": [
                {
                    "id": "01HXYZ", "customer_id": "42",
                    "customer_identifiers": {"id": "42", "email": "a@b.io", "cio_id": "c1"},
                    "type": "attribute_change", "timestamp": 1_700_000_000,
                    "data": {"plan": {"from": "free", "to": "pro"}, "score": {"to": 9}},
                    "delivery_id": null, "delivery_type": null
                },
                {
                    "id": 77, "customer_id": null, "customer_identifiers": null,
                    "type": "secondary:opened_email", "timestamp": "1700000001",
                    "data": {"delivery_id": "d1", "delivered": 1_700_000_000, "opened": true},
                    "delivery_id": "d1", "delivery_type": "email"
                }
            ],
            "next": ""
        }))
        .unwrap();
        let page: Page<Activity> = page.into();
        assert_eq!(page.next, None);
        let change = &page.items[0];
        assert_eq!(change.activity_type, ActivityType::AttributeChange);
        assert_eq!(
            change.attribute_changes(),
            vec![
                AttributeChange {
                    name: "plan".into(),
                    from: "free".into(),
                    to: "pro".into()
                },
                AttributeChange {
                    name: "score".into(),
                    from: String::new(),
                    to: "9".into()
                },
            ]
        );
        let other = &page.items[1];
        assert_eq!(other.id, "77");
        assert_eq!(
            other.activity_type,
            ActivityType::Other("secondary:opened_email".into())
        );
        assert_eq!(other.timestamp, Some(1_700_000_001));
        assert!(other.attribute_changes().is_empty());
        assert_eq!(
            serde_json::to_value(&other.activity_type).unwrap(),
            json!("secondary:opened_email")
        );
    }

    #[test]
    fn limits_are_checked_before_sending() {
        for limit in [0, 101] {
            let err = ActivityQuery::new()
                .with_limit(limit)
                .params(None, true)
                .unwrap_err();
            assert!(matches!(err, CioError::Config { .. }), "{limit}");
        }
        let params = ActivityQuery::new()
            .of_type(ActivityType::OpenedEmail)
            .named("x")
            .for_customer("a@b.io", IdType::Email)
            .with_limit(5)
            .params(Some("c1"), true)
            .unwrap();
        assert_eq!(
            params,
            vec![
                ("limit", "5".to_owned()),
                ("type", "opened_email".to_owned()),
                ("name", "x".to_owned()),
                ("customer_id", "a@b.io".to_owned()),
                ("id_type", "email".to_owned()),
                ("start", "c1".to_owned()),
            ]
        );
    }
}
