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

/// Why the configured workspace does not fit this client (from [`CioClient::check_account`]).
/// A 401/403 from any other call cannot tell these apart (Customer.io refuses a request sent
/// to the wrong region like one with a wrong key); the region check can, since it answers on
/// either region's Track host for valid credentials.
#[derive(Debug, thiserror::Error)]
pub enum AccountCheckError {
    /// The region check refused the Track credentials: the site id or the Track API key is
    /// wrong (it answers for valid ones whatever the region).
    #[error(
        "Customer.io refused the Track credentials (HTTP {status}): the site id or the Track API \
         key is wrong"
    )]
    TrackCredentials {
        /// 401 or 403.
        status: u16,
    },
    /// The credentials are valid but the workspace is in another region than the client is
    /// configured for: its calls would be redirected (Track on the US host) or refused (401).
    #[error(
        "the Customer.io workspace is in the {workspace} region but the client is configured \
         for {configured}"
    )]
    WrongRegion {
        /// The client's [`ClientConfig::region`](crate::ClientConfig::region).
        configured: Region,
        /// The workspace's region, as Customer.io reports it.
        workspace: Region,
        /// The Track API URL Customer.io reports for these credentials.
        track_url: String,
    },
    /// The check itself failed (unreachable, timeout, 5xx, unexpected answer).
    #[error("could not check the Customer.io account: {0}")]
    Unavailable(#[source] CioError),
}

impl CioClient {
    /// `GET /api/v1/accounts/region` with Track credentials: validates them and tells which
    /// region and workspace they belong to.
    pub async fn account_region(&self) -> Result<AccountRegion, CioError> {
        self.request(&endpoints::ACCOUNT_REGION, &[], &[], None::<&()>)
            .await
    }

    /// Checks the Track credentials and the region in one call
    /// ([`account_region`](Self::account_region)): `Ok` with the workspace when both fit,
    /// otherwise which one is wrong. Use it at start-up, and to explain a 401 from another
    /// call. (The App API key is not covered: with the Track credentials and region right, an
    /// App API 401 means that key is wrong.)
    pub async fn check_account(&self) -> Result<AccountRegion, AccountCheckError> {
        match self.account_region().await {
            Ok(account) if account.region == self.region() => Ok(account),
            Ok(account) => Err(AccountCheckError::WrongRegion {
                configured: self.region(),
                workspace: account.region,
                track_url: account.url,
            }),
            Err(CioError::Unauthorized { status, .. }) => {
                Err(AccountCheckError::TrackCredentials { status })
            }
            Err(other) => Err(AccountCheckError::Unavailable(other)),
        }
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
