//! Workspace-level calls: region detection / credential check.

use serde::{Deserialize, Serialize};

use crate::client::CioClient;
use crate::config::Region;
use crate::endpoint::endpoints;
use crate::error::CioError;
use crate::serde_util;

/// Answer of `GET /api/v1/accounts/region`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountRegion {
    /// Track API URL for these credentials, e.g. `https://track-eu.customer.io`.
    pub url: String,
    /// The workspace's region.
    pub region: Region,
    /// The workspace the credentials belong to.
    #[serde(deserialize_with = "serde_util::i64_lenient")]
    pub environment_id: i64,
}

impl CioClient {
    /// `GET /api/v1/accounts/region` with Track credentials: validates them and tells which
    /// region and workspace they belong to.
    pub async fn account_region(&self) -> Result<AccountRegion, CioError> {
        self.request(&endpoints::ACCOUNT_REGION, &[], &[], None::<&()>)
            .await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_region_answer() {
        let r: AccountRegion = serde_json::from_str(
            r#"{"url":"https://track-eu.customer.io","region":"eu","environment_id":3,"extra":true}"#,
        )
        .unwrap();
        assert_eq!(r.region, Region::Eu);
        assert_eq!(r.environment_id, 3);
        let r: AccountRegion =
            serde_json::from_str(r#"{"url":"u","region":"us","environment_id":"42"}"#).unwrap();
        assert_eq!(r.environment_id, 42);
    }
}
