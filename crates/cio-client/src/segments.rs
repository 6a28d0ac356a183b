//! Segments (App API): list, get, count, membership pages and stream, create manual, delete.

use futures::Stream;
use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};

use crate::client::CioClient;
use crate::endpoint::endpoints;
use crate::error::CioError;
use crate::pagination::{Page, paginate};
use crate::serde_util;

/// Customer.io's largest membership page.
pub const MAX_MEMBERSHIP_PAGE: u32 = 30_000;

/// Dynamic (built in Customer.io's UI from criteria) or manual (membership set via API).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SegmentType {
    /// Data-driven; can only be built in Customer.io's UI.
    Dynamic,
    /// Membership managed through the Track API (`add_customers` / `remove_customers`).
    Manual,
}

/// A Customer.io segment. Unknown fields are ignored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    /// Segment id.
    #[serde(deserialize_with = "serde_util::i64_lenient")]
    pub id: i64,
    /// Globally unique Customer.io id, e.g. `"15:1492548073"`.
    #[serde(default, deserialize_with = "serde_util::opt_string")]
    pub deduplicate_id: Option<String>,
    /// Name.
    pub name: String,
    /// Description.
    #[serde(default, deserialize_with = "serde_util::opt_string")]
    pub description: Option<String>,
    /// Processing state, e.g. `"finished"`.
    #[serde(default, deserialize_with = "serde_util::opt_string")]
    pub state: Option<String>,
    /// Percent processed while building; `None` when finished.
    #[serde(default, deserialize_with = "serde_util::opt_i64")]
    pub progress: Option<i64>,
    /// Dynamic or manual.
    #[serde(rename = "type")]
    pub segment_type: SegmentType,
    /// Tags.
    #[serde(default)]
    pub tags: Option<Vec<String>>,
    /// Creation time, unix seconds.
    #[serde(default, deserialize_with = "serde_util::opt_i64")]
    pub created_at: Option<i64>,
    /// Last update, unix seconds.
    #[serde(default, deserialize_with = "serde_util::opt_i64")]
    pub updated_at: Option<i64>,
}

/// The identifiers of one person, as listed by membership and search endpoints.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CustomerIdentifiers {
    /// The workspace's `id`, if set.
    #[serde(default, deserialize_with = "serde_util::opt_string")]
    pub id: Option<String>,
    /// Email, if set and the workspace identifies by email.
    #[serde(default, deserialize_with = "serde_util::opt_string")]
    pub email: Option<String>,
    /// Customer.io's own id (use as `cio_<cio_id>` in Track paths).
    #[serde(default, deserialize_with = "serde_util::opt_string")]
    pub cio_id: Option<String>,
}

/// One page of `GET /v1/segments/{segment_id}/membership`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MembershipPage {
    /// The people on this page.
    pub identifiers: Vec<CustomerIdentifiers>,
    /// Cursor for the next page; `None` at the end (an empty `next` is normalised to `None`).
    pub next: Option<String>,
}

#[derive(Deserialize)]
pub(crate) struct MembershipResponse {
    #[serde(default, deserialize_with = "serde_util::null_as_default")]
    identifiers: Vec<CustomerIdentifiers>,
    #[serde(default, deserialize_with = "serde_util::null_as_default")]
    ids: Vec<serde_json::Value>,
    #[serde(default, deserialize_with = "serde_util::opt_string")]
    next: Option<String>,
}

impl From<MembershipResponse> for MembershipPage {
    fn from(r: MembershipResponse) -> Self {
        let identifiers = if r.identifiers.is_empty() && !r.ids.is_empty() {
            // Older answers carry only `ids`.
            r.ids
                .into_iter()
                .map(|id| CustomerIdentifiers {
                    id: match id {
                        serde_json::Value::String(s) if !s.is_empty() => Some(s),
                        serde_json::Value::Number(n) => Some(n.to_string()),
                        _ => None,
                    },
                    ..CustomerIdentifiers::default()
                })
                .collect()
        } else {
            r.identifiers
        };
        MembershipPage {
            identifiers,
            next: r.next.filter(|n| !n.is_empty()),
        }
    }
}

#[derive(Deserialize)]
pub(crate) struct SegmentsResponse {
    #[serde(default, deserialize_with = "serde_util::null_as_default")]
    segments: Vec<Segment>,
}

#[derive(Deserialize)]
pub(crate) struct SegmentResponse {
    segment: Segment,
}

#[derive(Deserialize)]
pub(crate) struct CountResponse {
    #[serde(deserialize_with = "serde_util::u64_lenient")]
    count: u64,
}

#[derive(Serialize)]
struct CreateSegmentRequest<'a> {
    segment: NewSegment<'a>,
}

#[derive(Serialize)]
struct NewSegment<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<&'a str>,
}

impl CioClient {
    /// `GET /v1/segments`: every segment of the workspace (not paginated by Customer.io).
    pub async fn list_segments(&self) -> Result<Vec<Segment>, CioError> {
        let r: SegmentsResponse = self
            .request(&endpoints::LIST_SEGMENTS, &[], &[], None::<&()>)
            .await?;
        Ok(r.segments)
    }

    /// `GET /v1/segments/{segment_id}`.
    pub async fn get_segment(&self, id: i64) -> Result<Segment, CioError> {
        let id = id.to_string();
        let r: SegmentResponse = self
            .request(&endpoints::GET_SEGMENT, &[&id], &[], None::<&()>)
            .await?;
        Ok(r.segment)
    }

    /// `GET /v1/segments/{segment_id}/customer_count`.
    pub async fn segment_customer_count(&self, id: i64) -> Result<u64, CioError> {
        let id = id.to_string();
        let r: CountResponse = self
            .request(&endpoints::SEGMENT_CUSTOMER_COUNT, &[&id], &[], None::<&()>)
            .await?;
        Ok(r.count)
    }

    /// `GET /v1/segments/{segment_id}/membership?start=&limit=`: one page. `limit` is clamped
    /// to `1..=30000`; pass the previous page's `next` as `start`.
    pub async fn segment_membership_page(
        &self,
        id: i64,
        start: Option<&str>,
        limit: u32,
    ) -> Result<MembershipPage, CioError> {
        let id = id.to_string();
        let mut query = Vec::with_capacity(2);
        if let Some(start) = start.filter(|s| !s.is_empty()) {
            query.push(("start", start.to_owned()));
        }
        query.push(("limit", limit.clamp(1, MAX_MEMBERSHIP_PAGE).to_string()));
        let r: MembershipResponse = self
            .request(&endpoints::SEGMENT_MEMBERSHIP, &[&id], &query, None::<&()>)
            .await?;
        Ok(r.into())
    }

    /// Every member of segment `id`, fetched lazily `page_size` at a time.
    pub fn segment_membership(
        &self,
        id: i64,
        page_size: u32,
    ) -> impl Stream<Item = Result<CustomerIdentifiers, CioError>> + Send + 'static {
        let client = self.clone();
        paginate(move |start: Option<String>| {
            let client = client.clone();
            async move {
                let page = client
                    .segment_membership_page(id, start.as_deref(), page_size)
                    .await?;
                Ok(Page {
                    items: page.identifiers,
                    next: page.next,
                })
            }
        })
    }

    /// `POST /v1/segments`: creates an empty MANUAL segment (Customer.io cannot create dynamic
    /// segments through the API). Never retried automatically: a repeat would create a second
    /// segment.
    pub async fn create_manual_segment(
        &self,
        name: &str,
        description: Option<&str>,
    ) -> Result<Segment, CioError> {
        let body = CreateSegmentRequest {
            segment: NewSegment { name, description },
        };
        let r: SegmentResponse = self
            .request(&endpoints::CREATE_SEGMENT, &[], &[], Some(&body))
            .await?;
        Ok(r.segment)
    }

    /// `DELETE /v1/segments/{segment_id}`.
    pub async fn delete_segment(&self, id: i64) -> Result<(), CioError> {
        let id = id.to_string();
        let _: IgnoredAny = self
            .request(&endpoints::DELETE_SEGMENT, &[&id], &[], None::<&()>)
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_segments_leniently() {
        let r: SegmentsResponse = serde_json::from_str(
            r#"{"segments":[
                {"id":7,"deduplicate_id":"15:1492548073","name":"Manual Segment 1","description":"d",
                 "state":"finished","progress":null,"type":"manual","tags":null,"created_at":1,"updated_at":2,"new_field":{}},
                {"id":"8","name":"Dyn","type":"dynamic","progress":40}
            ]}"#,
        )
        .unwrap();
        assert_eq!(r.segments.len(), 2);
        assert_eq!(r.segments[0].segment_type, SegmentType::Manual);
        assert_eq!(
            r.segments[0].deduplicate_id.as_deref(),
            Some("15:1492548073")
        );
        assert_eq!(r.segments[1].id, 8);
        assert_eq!(r.segments[1].progress, Some(40));
        assert_eq!(r.segments[1].description, None);
        let json = serde_json::to_value(&r.segments[0]).unwrap();
        assert_eq!(json["type"], "manual");
    }

    #[test]
    fn parses_membership_pages() {
        let r: MembershipResponse = serde_json::from_str(
            r#"{"identifiers":[{"email":"a@x.io","id":2,"cio_id":"786433"},{"email":null,"id":"b","cio_id":"9"}],
                "ids":["2","b"],"next":""}"#,
        )
        .unwrap();
        let page = MembershipPage::from(r);
        assert_eq!(page.next, None);
        assert_eq!(page.identifiers[0].id.as_deref(), Some("2"));
        assert_eq!(page.identifiers[1].email, None);

        let r: MembershipResponse = serde_json::from_str(r#"{"ids":["1",""],"next":12}"#).unwrap();
        let page = MembershipPage::from(r);
        assert_eq!(page.next.as_deref(), Some("12"));
        assert_eq!(page.identifiers.len(), 2);
        assert_eq!(page.identifiers[1].id, None);

        let r: MembershipResponse = serde_json::from_str(r#"{"identifiers":null}"#).unwrap();
        assert_eq!(MembershipPage::from(r), MembershipPage::default());
    }

    #[test]
    fn create_body_shape() {
        let body = CreateSegmentRequest {
            segment: NewSegment {
                name: "n",
                description: None,
            },
        };
        assert_eq!(
            serde_json::to_string(&body).unwrap(),
            r#"{"segment":{"name":"n"}}"#
        );
    }

    #[test]
    fn count_parses() {
        let r: CountResponse = serde_json::from_str(r#"{"count":12}"#).unwrap();
        assert_eq!(r.count, 12);
        assert!(serde_json::from_str::<CountResponse>(r#"{"count":-1}"#).is_err());
    }
}
