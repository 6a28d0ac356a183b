//! Customer reads (App API): attributes of one or up to 100 people, a person's segments, and
//! the people with an email address.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::client::CioClient;
use crate::endpoint::endpoints;
use crate::error::CioError;
use crate::people::IdType;
use crate::segments::CustomerIdentifiers;
use crate::serde_util;

/// Most ids `POST /v1/customers/attributes` takes in one request.
pub const MAX_CUSTOMERS_PER_LOOKUP: usize = 100;

/// A person's profile as `GET /v1/customers/{id}/attributes` answers it. Unknown fields
/// (`devices`...) are ignored.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CustomerAttributes {
    /// The workspace's customer id, if the person has one.
    #[serde(default, deserialize_with = "serde_util::opt_string")]
    pub id: Option<String>,
    /// `id`, `email` and `cio_id` (filled from `id` and `attributes` when Customer.io leaves
    /// the object out).
    #[serde(default, deserialize_with = "serde_util::null_as_default")]
    pub identifiers: CustomerIdentifiers,
    /// Every attribute, identifiers included. Customer.io stores and returns them as strings
    /// (`"42"`, `"true"`); see [`attribute`](Self::attribute).
    #[serde(default, deserialize_with = "serde_util::null_as_default")]
    pub attributes: Map<String, Value>,
    /// When each attribute was set, unix seconds by attribute name.
    #[serde(default, deserialize_with = "serde_util::null_as_default")]
    pub timestamps: Map<String, Value>,
    /// Whether the person is unsubscribed from messages.
    #[serde(default, deserialize_with = "serde_util::opt_bool")]
    pub unsubscribed: Option<bool>,
}

impl CustomerAttributes {
    /// The attribute `name` when it is a string (as Customer.io returns every attribute).
    pub fn attribute(&self, name: &str) -> Option<&str> {
        self.attributes.get(name).and_then(Value::as_str)
    }

    /// Fills empty identifiers from `id` and the identifier attributes.
    fn normalised(mut self) -> Self {
        let from_attributes = |key: &str| {
            self.attributes
                .get(key)
                .and_then(|v| match v {
                    Value::String(s) => Some(s.clone()),
                    Value::Number(n) => Some(n.to_string()),
                    _ => None,
                })
                .filter(|s| !s.is_empty())
        };
        let ids = &self.identifiers;
        let id = ids
            .id
            .clone()
            .or_else(|| self.id.clone())
            .or_else(|| from_attributes("id"));
        let email = ids.email.clone().or_else(|| from_attributes("email"));
        let cio_id = ids.cio_id.clone().or_else(|| from_attributes("cio_id"));
        self.identifiers = CustomerIdentifiers { id, email, cio_id };
        self
    }
}

/// A segment a person belongs to (`GET /v1/customers/{id}/segments`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustomerSegment {
    /// Segment id (the spec types it as a string; numeric strings are accepted).
    #[serde(deserialize_with = "serde_util::i64_lenient")]
    pub id: i64,
    /// Name.
    pub name: String,
    /// Description.
    #[serde(default, deserialize_with = "serde_util::opt_string")]
    pub description: Option<String>,
}

#[derive(Deserialize)]
pub(crate) struct CustomerResponse {
    customer: CustomerAttributes,
}

#[derive(Deserialize)]
pub(crate) struct CustomersResponse {
    #[serde(default, deserialize_with = "serde_util::null_as_default")]
    customers: Vec<CustomersItem>,
}

/// The 2022 spec wraps each item as `{"customer":{..}}`; a flat item is accepted too.
#[derive(Deserialize)]
#[serde(untagged)]
enum CustomersItem {
    Wrapped { customer: CustomerAttributes },
    Flat(CustomerAttributes),
}

#[derive(Serialize)]
struct CustomersRequest<'a> {
    ids: &'a [String],
}

#[derive(Deserialize)]
pub(crate) struct CustomerSegmentsResponse {
    #[serde(default, deserialize_with = "serde_util::null_as_default")]
    segments: Vec<CustomerSegment>,
}

#[derive(Deserialize)]
pub(crate) struct EmailSearchResponse {
    #[serde(default, deserialize_with = "serde_util::null_as_default")]
    results: Vec<CustomerIdentifiers>,
}

fn invalid(message: String) -> CioError {
    CioError::Config { message }
}

fn check_identifier(identifier: &str) -> Result<(), CioError> {
    if identifier.is_empty() {
        Err(invalid("customer identifier is empty".to_owned()))
    } else {
        Ok(())
    }
}

impl CioClient {
    /// `GET /v1/customers/{customer_id}/attributes?id_type=`: a person's attributes;
    /// [`CioError::NotFound`] when no such person exists.
    pub async fn customer_attributes(
        &self,
        identifier: &str,
        id_type: IdType,
    ) -> Result<CustomerAttributes, CioError> {
        check_identifier(identifier)?;
        let query = [("id_type", id_type.as_str().to_owned())];
        let r: CustomerResponse = self
            .request(
                &endpoints::CUSTOMER_ATTRIBUTES,
                &[identifier],
                &query,
                None::<&()>,
            )
            .await?;
        Ok(r.customer.normalised())
    }

    /// `GET /v1/customers/{customer_id}/segments?id_type=`: the segments a person belongs to;
    /// [`CioError::NotFound`] when no such person exists.
    pub async fn customer_segments(
        &self,
        identifier: &str,
        id_type: IdType,
    ) -> Result<Vec<CustomerSegment>, CioError> {
        check_identifier(identifier)?;
        let query = [("id_type", id_type.as_str().to_owned())];
        let r: CustomerSegmentsResponse = self
            .request(
                &endpoints::CUSTOMER_SEGMENTS,
                &[identifier],
                &query,
                None::<&()>,
            )
            .await?;
        Ok(r.segments)
    }

    /// `POST /v1/customers/attributes`: the attributes of up to
    /// [`MAX_CUSTOMERS_PER_LOOKUP`] people by customer id, in one request. Unknown ids are
    /// left out of the answer. More ids than that is a [`CioError::Config`] error before
    /// anything is sent (split with `ids.chunks(MAX_CUSTOMERS_PER_LOOKUP)`: each chunk is one
    /// paced App API request); no ids answers an empty list without a request.
    pub async fn customers_attributes(
        &self,
        ids: &[String],
    ) -> Result<Vec<CustomerAttributes>, CioError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        if ids.len() > MAX_CUSTOMERS_PER_LOOKUP {
            return Err(invalid(format!(
                "{} ids given, at most {MAX_CUSTOMERS_PER_LOOKUP} per request",
                ids.len()
            )));
        }
        let body = CustomersRequest { ids };
        let r: CustomersResponse = self
            .request(&endpoints::CUSTOMERS_ATTRIBUTES, &[], &[], Some(&body))
            .await?;
        Ok(r.customers
            .into_iter()
            .map(|item| match item {
                CustomersItem::Wrapped { customer } | CustomersItem::Flat(customer) => {
                    customer.normalised()
                }
            })
            .collect())
    }

    /// `GET /v1/customers?email=`: the identifiers of every person with this email (none, one,
    /// or several in workspaces that do not identify by email).
    pub async fn find_customers_by_email(
        &self,
        email: &str,
    ) -> Result<Vec<CustomerIdentifiers>, CioError> {
        if email.is_empty() {
            return Err(invalid("email is empty".to_owned()));
        }
        let query = [("email", email.to_owned())];
        let r: EmailSearchResponse = self
            .request(
                &endpoints::FIND_CUSTOMERS_BY_EMAIL,
                &[],
                &query,
                None::<&()>,
            )
            .await?;
        Ok(r.results)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The example answer of the 2022 App API spec (`getPersonAttributes`), which has no
    /// `identifiers` object.
    #[test]
    fn parses_the_spec_example() {
        let r: CustomerResponse = serde_json::from_str(
            r#"{"customer":{"id":"1","attributes":{"_last_emailed":"1528932553","created_at":"1489014595",
                "email":"test@example.com","title":"tester","department":"qa","id":"1","cio_id":"03000001"},
                "timestamps":{"cio_id":1489014595,"_last_emailed":1528932553,"created_at":1489014595,
                "email":1508932553,"id":1489014595,"department":1508932553,"title":1508932553},
                "unsubscribed":false,
                "devices":[{"id":"my_android_device_id","last_used":1514764800,"platform":"android"}]}}"#,
        )
        .unwrap();
        let c = r.customer.normalised();
        assert_eq!(c.id.as_deref(), Some("1"));
        assert_eq!(
            c.identifiers,
            CustomerIdentifiers {
                id: Some("1".into()),
                email: Some("test@example.com".into()),
                cio_id: Some("03000001".into()),
            }
        );
        assert_eq!(c.attribute("department"), Some("qa"));
        assert_eq!(c.timestamps["title"], 1_508_932_553);
        assert_eq!(c.unsubscribed, Some(false));
    }

    #[test]
    fn parses_identifiers_and_lenient_values() {
        let r: CustomerResponse = serde_json::from_str(
            r#"{"customer":{"id":null,"identifiers":{"id":null,"email":"a@b.io","cio_id":"9"},
                "attributes":null,"timestamps":null,"unsubscribed":"true"}}"#,
        )
        .unwrap();
        let c = r.customer.normalised();
        assert_eq!(c.identifiers.id, None);
        assert_eq!(c.identifiers.email.as_deref(), Some("a@b.io"));
        assert!(c.attributes.is_empty());
        assert_eq!(c.unsubscribed, Some(true));
    }

    #[test]
    fn parses_bulk_answers_wrapped_or_flat() {
        let r: CustomersResponse = serde_json::from_str(
            r#"{"customers":[{"customer":{"id":"1","attributes":{"id":"1"}}},
                             {"id":"2","attributes":{"id":"2","plan":"pro"}}]}"#,
        )
        .unwrap();
        let ids: Vec<_> = r
            .customers
            .into_iter()
            .map(|item| match item {
                CustomersItem::Wrapped { customer } | CustomersItem::Flat(customer) => {
                    customer.normalised().identifiers.id.unwrap()
                }
            })
            .collect();
        assert_eq!(ids, vec!["1", "2"]);
        let r: CustomersResponse = serde_json::from_str(r#"{"customers":null}"#).unwrap();
        assert!(r.customers.is_empty());
    }

    #[test]
    fn parses_customer_segments_with_string_ids() {
        let r: CustomerSegmentsResponse = serde_json::from_str(
            r#"{"segments":[{"id":"7","name":"Growth","description":"d"},{"id":8,"name":"X","description":null}]}"#,
        )
        .unwrap();
        assert_eq!(
            r.segments,
            vec![
                CustomerSegment {
                    id: 7,
                    name: "Growth".into(),
                    description: Some("d".into())
                },
                CustomerSegment {
                    id: 8,
                    name: "X".into(),
                    description: None
                },
            ]
        );
    }

    #[test]
    fn parses_email_search() {
        let r: EmailSearchResponse = serde_json::from_str(
            r#"{"results":[{"email":"hugh.mann@example.com","id":2,"cio_id":"786433"}]}"#,
        )
        .unwrap();
        assert_eq!(r.results[0].id.as_deref(), Some("2"));
        let r: EmailSearchResponse = serde_json::from_str(r#"{"results":[]}"#).unwrap();
        assert!(r.results.is_empty());
    }

    #[test]
    fn bulk_request_shape() {
        let ids = vec!["1".to_owned(), "b".to_owned()];
        assert_eq!(
            serde_json::to_string(&CustomersRequest { ids: &ids }).unwrap(),
            r#"{"ids":["1","b"]}"#
        );
    }
}
