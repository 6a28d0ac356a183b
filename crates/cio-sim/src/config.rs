//! Simulator configuration and the API selector.

use std::time::Duration;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::faults::RateLimitMode;
use crate::sends::DeliveryRates;
use crate::webhooks::ReportingWebhook;

/// Which of the two Customer.io APIs a request belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SimApi {
    /// App API: paths under `/v1/`, `Authorization: Bearer <app_api_key>`.
    App,
    /// Track API: paths under `/api/`, `Authorization: Basic base64(site_id:track_api_key)`.
    Track,
}

impl SimApi {
    /// Lowercase name (`"app"` / `"track"`).
    pub fn as_str(self) -> &'static str {
        match self {
            SimApi::App => "app",
            SimApi::Track => "track",
        }
    }
}

/// What one broadcast-trigger window covers (see [`SimConfig::trigger_scope`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TriggerScope {
    /// One trigger per interval across the whole workspace, whatever the broadcast: what
    /// Customer.io documents ("API-triggered broadcasts are limited to 1 request every 10
    /// seconds", not said to be per broadcast).
    #[default]
    Workspace,
    /// One trigger per interval per broadcast; triggers of different broadcasts do not wait
    /// for each other.
    PerBroadcast,
}

impl TriggerScope {
    /// `"workspace"` or `"per_broadcast"`.
    pub fn as_str(self) -> &'static str {
        match self {
            TriggerScope::Workspace => "workspace",
            TriggerScope::PerBroadcast => "per_broadcast",
        }
    }
}

/// Start-up configuration of a [`crate::Simulator`].
///
/// Rate limits given here are the initial values; they can be changed at run time with
/// [`crate::Simulator::set_rate_limit`] (which does not rewrite this struct).
#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    /// Track API site id (Basic auth user name).
    pub site_id: String,
    /// Track API key (Basic auth password).
    pub track_api_key: String,
    /// App API key (Bearer token).
    pub app_api_key: String,
    /// The workspace's region, `"us"` or `"eu"` (anything but `eu` reads as `us`): reported by
    /// `GET /api/v1/accounts/region`.
    pub region: String,
    /// The regional endpoint this simulator plays, i.e. the hosts a client believes it is
    /// calling (`"us"`: track/api.customer.io, `"eu"`: the `-eu` hosts); `None`: the
    /// workspace's own region. When it differs from [`SimConfig::region`] the simulator answers
    /// like Customer.io's wrong region: the region check still answers (it works on either
    /// region's Track host), other Track calls on the US host are redirected (307 to the EU
    /// host), Track calls on the EU host and every App call are refused (401). Changeable at
    /// run time ([`crate::Simulator::set_endpoint_region`]).
    pub endpoint_region: Option<String>,
    /// App API requests per second; 0 = unlimited. Customer.io: 10.
    pub app_rate_limit_per_sec: u32,
    /// Track API requests per second; 0 = unlimited. Customer.io: 1000.
    pub track_rate_limit_per_sec: u32,
    /// How both APIs' limits are enforced: a rolling one-second window (default: never more
    /// than the limit in any second) or a token bucket that allows an initial burst.
    /// Changeable per API at run time ([`crate::Simulator::set_rate_limit_mode`]).
    pub rate_limit_mode: RateLimitMode,
    /// Seed for the demo data, chaos decisions and delivery outcomes.
    pub seed: u64,
    /// Number of demo people; 0 = empty workspace (no people, segments, campaigns, broadcasts or
    /// newsletters).
    pub demo_people: usize,
    /// How many most recent App/Track requests the request log keeps (0 = none); request
    /// counters are kept regardless. Default [`DEFAULT_REQUEST_LOG_CAPACITY`].
    pub request_log_capacity: usize,
    /// A trigger is refused (429) until this long after the previous accepted one in its
    /// [`SimConfig::trigger_scope`]. Customer.io: 10 s. Changeable at run time
    /// ([`crate::Simulator::set_trigger_interval`]).
    pub trigger_interval: Duration,
    /// Whether the trigger interval holds per workspace (default) or per broadcast.
    /// Changeable at run time ([`crate::Simulator::set_trigger_scope`]).
    pub trigger_scope: TriggerScope,
    /// The workspace's subscription center is enabled: `POST /v1/newsletters` then requires
    /// `subscription_topic_id` (400 `subscription_topic_id is required`). Default off.
    /// Changeable at run time ([`crate::Simulator::set_subscription_center`]).
    pub subscription_center: bool,
    /// Outcome rates of deliveries no [`crate::RatesKey`] rule matches.
    pub default_rates: DeliveryRates,
    /// How strongly a person's opens and clicks follow their own seeded engagement, in
    /// `0..=1` (0: every delivery drawn independently; default
    /// [`DEFAULT_ENGAGEMENT_CORRELATION`]). The rates still hold over an audience; the higher
    /// this is, the more the same people open and click every time. Changeable at run time
    /// ([`crate::Simulator::set_engagement_correlation`]).
    pub engagement_correlation: f64,
    /// How long a customer export takes to complete on the simulator's clock (default
    /// [`DEFAULT_EXPORT_DELAY`]). Changeable at run time
    /// ([`crate::Simulator::set_export_delay`]).
    pub export_delay: Duration,
    /// Reporting webhooks: where every delivery event is POSTed, signed, as it happens (see
    /// [`ReportingWebhook`]); `None` (default): none. Changeable at run time
    /// ([`crate::Simulator::set_reporting_webhook`]).
    pub reporting_webhook: Option<ReportingWebhook>,
    /// Base URL of the signed download links of exports (e.g. `http://cio-sim:4010` when the
    /// simulator is reached under another name); `None`: the scheme-less host the App request
    /// came to, as `http://{Host}`.
    pub files_base_url: Option<String>,
}

/// Default site id accepted by the simulator.
pub const DEFAULT_SITE_ID: &str = "sim-site";
/// Default Track API key accepted by the simulator.
pub const DEFAULT_TRACK_API_KEY: &str = "sim-track-key";
/// Default App API key accepted by the simulator.
pub const DEFAULT_APP_API_KEY: &str = "sim-app-key";
/// Number of people in the default demo workspace.
pub const DEFAULT_DEMO_PEOPLE: usize = 5000;
/// Default [`SimConfig::trigger_interval`]: Customer.io's one trigger per 10 s.
pub const DEFAULT_TRIGGER_INTERVAL: Duration = Duration::from_secs(10);
/// Default [`SimConfig::engagement_correlation`].
pub const DEFAULT_ENGAGEMENT_CORRELATION: f64 = 0.7;
/// Default [`SimConfig::export_delay`].
pub const DEFAULT_EXPORT_DELAY: Duration = Duration::from_secs(2);
/// Default [`SimConfig::request_log_capacity`].
pub const DEFAULT_REQUEST_LOG_CAPACITY: usize = 10_000;
/// Request bodies larger than this are logged as `{"_truncated": <size in bytes>}`.
pub const MAX_LOGGED_BODY_BYTES: usize = 64 * 1024;
/// The request log also evicts its oldest entries while the bodies it keeps exceed this many
/// bytes in total.
pub const MAX_LOGGED_BODIES_TOTAL: usize = 64 * 1024 * 1024;

impl SimConfig {
    /// Demo workspace: ~5000 financial-newsletter readers, a set of segments, and demo campaigns,
    /// API-triggered broadcasts and newsletters (see `demo`).
    pub fn demo() -> Self {
        Self {
            site_id: DEFAULT_SITE_ID.to_owned(),
            track_api_key: DEFAULT_TRACK_API_KEY.to_owned(),
            app_api_key: DEFAULT_APP_API_KEY.to_owned(),
            region: "us".to_owned(),
            endpoint_region: None,
            app_rate_limit_per_sec: 10,
            track_rate_limit_per_sec: 1000,
            rate_limit_mode: RateLimitMode::Rolling,
            seed: 42,
            demo_people: DEFAULT_DEMO_PEOPLE,
            request_log_capacity: DEFAULT_REQUEST_LOG_CAPACITY,
            trigger_interval: DEFAULT_TRIGGER_INTERVAL,
            trigger_scope: TriggerScope::Workspace,
            subscription_center: false,
            default_rates: DeliveryRates::default(),
            engagement_correlation: DEFAULT_ENGAGEMENT_CORRELATION,
            export_delay: DEFAULT_EXPORT_DELAY,
            files_base_url: None,
            reporting_webhook: None,
        }
    }

    /// Empty workspace: no people, no segments, no campaigns; same credentials and limits as
    /// [`SimConfig::demo`].
    pub fn empty() -> Self {
        Self {
            demo_people: 0,
            ..Self::demo()
        }
    }

    /// The `Authorization` header value the Track API accepts (`Basic ...`).
    pub fn track_authorization(&self) -> String {
        let raw = format!("{}:{}", self.site_id, self.track_api_key);
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }

    /// The `Authorization` header value the App API accepts (`Bearer ...`).
    pub fn app_authorization(&self) -> String {
        format!("Bearer {}", self.app_api_key)
    }

    /// Initial rate limit of one API.
    pub fn rate_limit(&self, api: SimApi) -> u32 {
        match api {
            SimApi::App => self.app_rate_limit_per_sec,
            SimApi::Track => self.track_rate_limit_per_sec,
        }
    }

    pub(crate) fn track_url(&self) -> &'static str {
        track_host(&self.region)
    }
}

/// `"eu"` for an EU region name (any case), `"us"` for anything else.
pub(crate) fn normal_region(region: &str) -> &'static str {
    if region.trim().eq_ignore_ascii_case("eu") {
        "eu"
    } else {
        "us"
    }
}

/// The Track API base URL of a region.
pub(crate) fn track_host(region: &str) -> &'static str {
    match normal_region(region) {
        "eu" => "https://track-eu.customer.io",
        _ => "https://track.customer.io",
    }
}

impl Default for SimConfig {
    fn default() -> Self {
        Self::demo()
    }
}
