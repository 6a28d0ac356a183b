//! Manual segment membership (Track API): `POST /api/v1/segments/{segment_id}/add_customers`
//! and `.../remove_customers`, body `{"ids":[..]}` with 1 to [`MAX_SEGMENT_MEMBERS_PER_CALL`]
//! ids, query `id_type` (`id` by default).
//!
//! Only manual segments accept these calls (Customer.io answers 400 for a data-driven one).
//! Both are idempotent — adding a member again or removing a non-member changes nothing — so
//! the client retries them like any idempotent call. Ids that match nobody are ignored by
//! Customer.io.

use serde::Serialize;
use serde::de::IgnoredAny;

use crate::client::CioClient;
use crate::endpoint::endpoints;
use crate::error::CioError;
use crate::people::IdType;

/// Customer.io's limit of ids per `add_customers` / `remove_customers` call.
pub const MAX_SEGMENT_MEMBERS_PER_CALL: usize = 1000;

#[derive(Serialize)]
struct MembersBody<'a, S: AsRef<str>> {
    #[serde(serialize_with = "as_strs")]
    ids: &'a [S],
}

fn as_strs<S: AsRef<str>, Ser: serde::Serializer>(
    ids: &&[S],
    s: Ser,
) -> Result<Ser::Ok, Ser::Error> {
    s.collect_seq(ids.iter().map(AsRef::as_ref))
}

impl CioClient {
    /// Adds people to manual segment `segment_id` (1 to 1000 identifiers of kind `id_type`;
    /// otherwise [`CioError::Config`] and nothing is sent).
    pub async fn add_to_segment<S: AsRef<str> + Sync>(
        &self,
        segment_id: i64,
        ids: &[S],
        id_type: IdType,
    ) -> Result<(), CioError> {
        self.change_segment_members(&endpoints::ADD_TO_SEGMENT, segment_id, ids, id_type)
            .await
    }

    /// Removes people from manual segment `segment_id` (as [`CioClient::add_to_segment`]).
    pub async fn remove_from_segment<S: AsRef<str> + Sync>(
        &self,
        segment_id: i64,
        ids: &[S],
        id_type: IdType,
    ) -> Result<(), CioError> {
        self.change_segment_members(&endpoints::REMOVE_FROM_SEGMENT, segment_id, ids, id_type)
            .await
    }

    async fn change_segment_members<S: AsRef<str> + Sync>(
        &self,
        endpoint: &crate::endpoint::Endpoint,
        segment_id: i64,
        ids: &[S],
        id_type: IdType,
    ) -> Result<(), CioError> {
        check_members(segment_id, ids)?;
        let segment = segment_id.to_string();
        let query = [("id_type", id_type.as_str().to_owned())];
        let _: IgnoredAny = self
            .request(endpoint, &[&segment], &query, Some(&MembersBody { ids }))
            .await?;
        Ok(())
    }
}

fn check_members<S: AsRef<str>>(segment_id: i64, ids: &[S]) -> Result<(), CioError> {
    let problem = if segment_id <= 0 {
        Some(format!("segment id must be positive, got {segment_id}"))
    } else if ids.is_empty() {
        Some("a segment membership change needs at least one id".to_owned())
    } else if ids.len() > MAX_SEGMENT_MEMBERS_PER_CALL {
        Some(format!(
            "{} ids in one segment membership change; Customer.io accepts at most {MAX_SEGMENT_MEMBERS_PER_CALL}",
            ids.len()
        ))
    } else if ids.iter().any(|id| id.as_ref().is_empty()) {
        Some("an empty id in a segment membership change".to_owned())
    } else {
        None
    };
    match problem {
        Some(message) => Err(CioError::Config { message }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn body_is_an_ids_array_of_strings() {
        let ids = vec!["a".to_owned(), "b@x.io".to_owned()];
        let body = serde_json::to_string(&MembersBody { ids: &ids }).unwrap();
        assert_eq!(body, r#"{"ids":["a","b@x.io"]}"#);
    }

    #[test]
    fn bounds_are_checked_before_sending() {
        let thousand: Vec<String> = (0..1000).map(|i| i.to_string()).collect();
        assert!(check_members(1, &thousand).is_ok());
        let too_many: Vec<String> = (0..1001).map(|i| i.to_string()).collect();
        for (segment, ids) in [
            (1, too_many.as_slice()),
            (1, &[][..]),
            (0, &thousand[..1]),
            (1, &["".to_owned()][..]),
        ] {
            assert!(
                matches!(check_members(segment, ids), Err(CioError::Config { .. })),
                "{segment} {}",
                ids.len()
            );
        }
    }
}
