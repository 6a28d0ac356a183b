//! Public configuration: which API, which region, credentials, timeouts, rates and retries.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use secrecy::SecretString;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use url::Url;

/// The two Customer.io APIs this client talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Api {
    /// Track API (`track.customer.io`): writes about people, Basic auth.
    Track,
    /// App API (`api.customer.io`): reads, segments, sends, Bearer auth.
    App,
}

impl Api {
    /// `"track"` or `"app"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Api::Track => "track",
            Api::App => "app",
        }
    }
}

impl fmt::Display for Api {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The data-centre region of a Customer.io workspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Region {
    /// `track.customer.io` / `api.customer.io`.
    #[default]
    Us,
    /// `track-eu.customer.io` / `api-eu.customer.io`.
    Eu,
}

impl Region {
    /// `"us"` or `"eu"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Region::Us => "us",
            Region::Eu => "eu",
        }
    }

    /// Default base URL of the Track API in this region.
    pub const fn track_base_url(self) -> &'static str {
        match self {
            Region::Us => "https://track.customer.io",
            Region::Eu => "https://track-eu.customer.io",
        }
    }

    /// Default base URL of the App API in this region.
    pub const fn app_base_url(self) -> &'static str {
        match self {
            Region::Us => "https://api.customer.io",
            Region::Eu => "https://api-eu.customer.io",
        }
    }

    /// Default base URL of `api` in this region.
    pub const fn base_url(self, api: Api) -> &'static str {
        match api {
            Api::Track => self.track_base_url(),
            Api::App => self.app_base_url(),
        }
    }
}

impl fmt::Display for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A region string that is neither `us` nor `eu`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown Customer.io region {value:?}: expected \"us\" or \"eu\"")]
pub struct ParseRegionError {
    /// The value that was given.
    pub value: String,
}

impl FromStr for Region {
    type Err = ParseRegionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "us" => Ok(Region::Us),
            "eu" => Ok(Region::Eu),
            _ => Err(ParseRegionError {
                value: s.to_owned(),
            }),
        }
    }
}

impl Serialize for Region {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Region {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(deserializer)?;
        raw.parse().map_err(serde::de::Error::custom)
    }
}

/// Workspace credentials. The keys are [`SecretString`]s: they never appear in `Debug` output.
#[derive(Clone, Debug)]
pub struct Credentials {
    /// Track API site id (the Basic-auth user name). Not secret.
    pub site_id: String,
    /// Track API key (the Basic-auth password).
    pub track_api_key: SecretString,
    /// App API key (the Bearer token).
    pub app_api_key: SecretString,
}

impl Credentials {
    /// Convenience constructor from plain strings.
    pub fn new(
        site_id: impl Into<String>,
        track_api_key: impl Into<String>,
        app_api_key: impl Into<String>,
    ) -> Self {
        Self {
            site_id: site_id.into(),
            track_api_key: SecretString::from(track_api_key.into()),
            app_api_key: SecretString::from(app_api_key.into()),
        }
    }
}

/// Automatic retry settings (only ever applied to [`RetryPolicy::Idempotent`] endpoints).
///
/// [`RetryPolicy::Idempotent`]: crate::RetryPolicy::Idempotent
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryConfig {
    /// Retries after the first attempt (so at most `max_retries + 1` requests). Default 3.
    pub max_retries: u32,
    /// First backoff step; doubles every retry. Default 200 ms.
    pub base_delay: Duration,
    /// Upper bound of one backoff step (a server's `Retry-After` is honoured even when larger,
    /// up to [`MAX_HONOURED_RETRY_AFTER`](crate::MAX_HONOURED_RETRY_AFTER)). Default 5 s.
    pub max_delay: Duration,
    /// Rate limiting is flow control, not failure: an idempotent call answered 429 with a
    /// `Retry-After` waits that long and tries again WITHOUT spending one of `max_retries`, as long
    /// as its 429 waits add up to at most this. So a 429 storm slows a sync down instead of failing
    /// it. Default 60 s; zero makes every 429 count as an ordinary retryable failure.
    pub max_throttle_wait: Duration,
}

impl RetryConfig {
    /// Default number of retries.
    pub const DEFAULT_MAX_RETRIES: u32 = 3;
    /// Default first backoff step.
    pub const DEFAULT_BASE_DELAY: Duration = Duration::from_millis(200);
    /// Default backoff cap.
    pub const DEFAULT_MAX_DELAY: Duration = Duration::from_secs(5);
    /// Default total time one call may spend waiting out 429s.
    pub const DEFAULT_MAX_THROTTLE_WAIT: Duration = Duration::from_secs(60);

    /// No retries at all (useful in tests and for callers that retry themselves).
    pub const fn disabled() -> Self {
        Self {
            max_retries: 0,
            base_delay: Self::DEFAULT_BASE_DELAY,
            max_delay: Self::DEFAULT_MAX_DELAY,
            max_throttle_wait: Duration::ZERO,
        }
    }
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_retries: Self::DEFAULT_MAX_RETRIES,
            base_delay: Self::DEFAULT_BASE_DELAY,
            max_delay: Self::DEFAULT_MAX_DELAY,
            max_throttle_wait: Self::DEFAULT_MAX_THROTTLE_WAIT,
        }
    }
}

/// Everything needed to build a [`CioClient`](crate::CioClient).
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Workspace credentials.
    pub credentials: Credentials,
    /// Workspace region; picks the default hosts.
    pub region: Region,
    /// Overrides the Track base URL (simulator, proxy). `None`: the region's host.
    pub track_base_url: Option<Url>,
    /// Overrides the App base URL (simulator, proxy). `None`: the region's host.
    pub app_base_url: Option<Url>,
    /// Whole-request timeout (connect, send, read the body). Default 10 s.
    pub timeout: Duration,
    /// App API pace for this workspace, shared by every client in the process. Default 10/s.
    pub app_requests_per_sec: u32,
    /// Track API pace for this workspace, shared by every client in the process. Default 1000/s.
    pub track_requests_per_sec: u32,
    /// Automatic retries for idempotent endpoints.
    pub retry: RetryConfig,
    /// IANA time zone sent as `tz` with every metrics request: the series' hour, day, week and
    /// month buckets are aligned to it. No Customer.io page states the default, so the client
    /// always sends one. Default [`ClientConfig::DEFAULT_METRICS_TZ`]; checked by
    /// [`CioClient::new`](crate::CioClient::new).
    pub metrics_tz: String,
}

impl ClientConfig {
    /// Default whole-request timeout (the official node/python/ruby SDKs use 10 s).
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
    /// Customer.io's App API limit: 10 requests/s per workspace.
    pub const DEFAULT_APP_REQUESTS_PER_SEC: u32 = 10;
    /// Customer.io's Track API limit (2026 spec): 1000 requests/s.
    pub const DEFAULT_TRACK_REQUESTS_PER_SEC: u32 = 1000;
    /// Default [`ClientConfig::metrics_tz`]: Eastern time, what the series were aligned to
    /// before the client sent `tz` (Customer.io's "EST").
    pub const DEFAULT_METRICS_TZ: &'static str = "America/New_York";

    /// A configuration with the region's hosts and every default.
    pub fn new(credentials: Credentials, region: Region) -> Self {
        Self {
            credentials,
            region,
            track_base_url: None,
            app_base_url: None,
            timeout: Self::DEFAULT_TIMEOUT,
            app_requests_per_sec: Self::DEFAULT_APP_REQUESTS_PER_SEC,
            track_requests_per_sec: Self::DEFAULT_TRACK_REQUESTS_PER_SEC,
            retry: RetryConfig::default(),
            metrics_tz: Self::DEFAULT_METRICS_TZ.to_owned(),
        }
    }

    /// Points both APIs at one base URL (the simulator serves both, e.g. `http://127.0.0.1:PORT`).
    pub fn with_base_url(mut self, base_url: Url) -> Self {
        self.track_base_url = Some(base_url.clone());
        self.app_base_url = Some(base_url);
        self
    }

    /// The base URL `api` will use: the override, or the region's host.
    pub fn base_url(&self, api: Api) -> Result<Url, crate::CioError> {
        let overridden = match api {
            Api::Track => self.track_base_url.as_ref(),
            Api::App => self.app_base_url.as_ref(),
        };
        match overridden {
            Some(url) => Ok(url.clone()),
            None => Url::parse(self.region.base_url(api)).map_err(|e| crate::CioError::Config {
                message: format!("default {api} base URL: {e}"),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn region_parses_case_insensitively_and_names_bad_values() {
        assert_eq!("us".parse::<Region>().unwrap(), Region::Us);
        assert_eq!("EU".parse::<Region>().unwrap(), Region::Eu);
        assert_eq!(" Eu ".parse::<Region>().unwrap(), Region::Eu);
        let err = "mars".parse::<Region>().unwrap_err();
        assert!(err.to_string().contains("\"mars\""), "{err}");
    }

    #[test]
    fn region_hosts() {
        assert_eq!(Region::Us.base_url(Api::Track), "https://track.customer.io");
        assert_eq!(Region::Us.base_url(Api::App), "https://api.customer.io");
        assert_eq!(
            Region::Eu.base_url(Api::Track),
            "https://track-eu.customer.io"
        );
        assert_eq!(Region::Eu.base_url(Api::App), "https://api-eu.customer.io");
    }

    #[test]
    fn api_display() {
        assert_eq!(Api::Track.to_string(), "track");
        assert_eq!(Api::App.to_string(), "app");
    }

    #[test]
    fn defaults_and_overrides() {
        let cfg = ClientConfig::new(Credentials::new("s", "t", "a"), Region::Eu);
        assert_eq!(cfg.timeout, Duration::from_secs(10));
        assert_eq!(cfg.app_requests_per_sec, 10);
        assert_eq!(cfg.track_requests_per_sec, 1000);
        assert_eq!(cfg.retry.max_retries, 3);
        assert_eq!(cfg.retry.base_delay, Duration::from_millis(200));
        assert_eq!(cfg.metrics_tz, "America/New_York");
        assert_eq!(
            cfg.base_url(Api::App).unwrap().as_str(),
            "https://api-eu.customer.io/"
        );
        let sim = Url::parse("http://127.0.0.1:9999").unwrap();
        let cfg = cfg.with_base_url(sim.clone());
        assert_eq!(cfg.base_url(Api::Track).unwrap(), sim);
        assert_eq!(cfg.base_url(Api::App).unwrap(), sim);
    }

    #[test]
    fn region_serde_round_trip() {
        let r: Region = serde_json::from_str("\"EU\"").unwrap();
        assert_eq!(r, Region::Eu);
        assert_eq!(serde_json::to_string(&Region::Us).unwrap(), "\"us\"");
    }
}
