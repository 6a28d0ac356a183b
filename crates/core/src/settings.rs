//! [`Settings`]: every setting of both binaries, read from the environment and validated ONCE, at
//! start-up, then passed down in the [`crate::AppContext`]. Nothing reads the environment after
//! that.
//!
//! - [`VARIABLES`] declares every variable: its default, who reads it, whether it is secret and
//!   what it means. Defaults are parsed from that table, so `--help` ([`help`]) and the
//!   behaviour cannot disagree.
//! - Every error is a [`ConfigError`] naming the variable, never echoing its value; a malformed
//!   value refuses to start.
//! - [`Env`] is where values come from: the process ([`ProcessEnv`]) or a map in tests.

use std::{fmt, net::SocketAddr, str::FromStr, time::Duration};

use cio_client::{ClientConfig, Credentials, Region};
use secrecy::SecretString;
use url::Url;

use crate::{
    jobs::Job,
    managed_segments::EvaluationConfig,
    outbox::DeliveryConfig,
    secrets::{MasterKeyring, MasterKeys},
    sends::SendConfig,
    telemetry::TelemetryConfig,
};

/// Where settings come from: the process environment, or a map in tests.
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;
}

/// The process environment. Empty values count as unset.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    #[allow(clippy::disallowed_methods)] // the one place the environment is read
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.trim().is_empty())
    }
}

impl<S: std::hash::BuildHasher> Env for std::collections::HashMap<String, String, S> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).filter(|v| !v.trim().is_empty()).cloned()
    }
}

/// A setting that is missing or malformed. Shows the variable, never its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub variable: &'static str,
    pub problem: String,
}

impl ConfigError {
    pub fn new(variable: &'static str, problem: impl Into<String>) -> Self {
        Self {
            variable,
            problem: problem.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "configuration variable {}: {}",
            self.variable, self.problem
        )
    }
}

impl std::error::Error for ConfigError {}

/// Which binary reads a variable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Binary {
    Server,
    Scheduler,
}

/// Who reads a variable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readers {
    Both,
    Server,
    Scheduler,
    /// The scheduler, and the server in `--dev` (which runs the jobs in-process).
    Jobs,
}

impl Readers {
    fn includes(self, binary: Binary) -> bool {
        matches!(
            (self, binary),
            (Readers::Both | Readers::Jobs, _)
                | (Readers::Server, Binary::Server)
                | (Readers::Scheduler, Binary::Scheduler)
        )
    }
}

/// One environment variable.
#[derive(Debug, Clone, Copy)]
pub struct Variable {
    pub name: &'static str,
    /// The value used when unset (`""`: none; the meaning says what happens then).
    pub default: &'static str,
    pub readers: Readers,
    /// A credential: never printed, never echoed.
    pub secret: bool,
    pub meaning: &'static str,
}

const fn var(
    name: &'static str,
    default: &'static str,
    readers: Readers,
    meaning: &'static str,
) -> Variable {
    Variable {
        name,
        default,
        readers,
        secret: false,
        meaning,
    }
}

const fn secret(name: &'static str, readers: Readers, meaning: &'static str) -> Variable {
    Variable {
        name,
        default: "",
        readers,
        secret: true,
        meaning,
    }
}

/// Default database: a SQLite file in the working directory.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://sharpsend.db?mode=rwc";
/// Dev mode's database unless `DATABASE_URL` is set.
pub const DEFAULT_DEV_DATABASE_URL: &str = "sqlite://sharpsend-dev.db?mode=rwc";
/// Default gRPC listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";
/// The well-known key of `--dev` mode when `SHARPSEND_API_KEYS` is unset.
pub const DEV_API_KEY: &str = "dev-key";

use Readers::{Both, Jobs, Server};

/// Every variable either binary reads, with its default.
pub const VARIABLES: &[Variable] = &[
    var(
        "DATABASE_URL",
        DEFAULT_DATABASE_URL,
        Both,
        "postgres://… in production, sqlite://… for a file (dev mode: sqlite://sharpsend-dev.db)",
    ),
    var(
        "SHARPSEND_LISTEN",
        DEFAULT_LISTEN,
        Server,
        "gRPC listen address",
    ),
    secret(
        "SHARPSEND_API_KEYS",
        Server,
        "comma-separated API keys, each `key` or `name=key`; required outside --dev (dev-key)",
    ),
    var(
        "SHARPSEND_TLS_CERT",
        "",
        Server,
        "PEM certificate chain: serve gRPC over TLS (with SHARPSEND_TLS_KEY); re-read when the file changes",
    ),
    var(
        "SHARPSEND_TLS_KEY",
        "",
        Server,
        "PEM private key of SHARPSEND_TLS_CERT; re-read when the file changes",
    ),
    var(
        "SHARPSEND_TLS_CLIENT_CA",
        "",
        Server,
        "PEM CA certificate(s): require client certificates signed by them (mTLS); needs SHARPSEND_TLS_CERT",
    ),
    var(
        "SHARPSEND_MASTER_KEY_FILE",
        "",
        Both,
        "a file holding the master keys instead of SHARPSEND_MASTER_KEY (same format), read again whenever it changes: rotate the master key without a restart",
    ),
    secret(
        "SHARPSEND_MASTER_KEY",
        Both,
        "master keys sealing stored workspace credentials: `<key id>:<base64 of 32 bytes>,…`, the first seals, the others still open (rotation; the secrets-rekey job re-seals); unset: workspaces cannot be created (--dev: an ephemeral key)",
    ),
    var(
        "SHARPSEND_REQUEST_TIMEOUT_SECS",
        "30",
        Server,
        "server-wide deadline per call",
    ),
    var(
        "SHARPSEND_MAX_CONCURRENT_STREAMS",
        "256",
        Server,
        "HTTP/2 streams (calls) open at once per connection; a client's further calls wait in its HTTP/2 flow control (none are refused)",
    ),
    var(
        "SHARPSEND_MAX_IN_FLIGHT",
        "1024",
        Server,
        "calls handled at once across all connections (health checks aside); beyond it calls are shed at once with UNAVAILABLE and google.rpc.RetryInfo (retry after 1 s)",
    ),
    var(
        "SHARPSEND_LOG_JSON",
        "false",
        Both,
        "true: one JSON object per log line (also --json-logs)",
    ),
    var(
        "RUST_LOG",
        crate::telemetry::DEFAULT_FILTER,
        Both,
        "log filter (tracing EnvFilter syntax)",
    ),
    var(
        "HOSTNAME",
        "",
        Both,
        "names this process in job leases and runs (unset: /etc/hostname)",
    ),
    var(
        "CIO_SITE_ID",
        "",
        Both,
        "Customer.io workspace (site) id; required outside --dev",
    ),
    secret(
        "CIO_TRACK_API_KEY",
        Both,
        "Customer.io Track API key; required outside --dev",
    ),
    secret(
        "CIO_APP_API_KEY",
        Both,
        "Customer.io App API key; required outside --dev",
    ),
    var(
        "CIO_REGION",
        "us",
        Both,
        "`us` or `eu`: picks Customer.io's hosts",
    ),
    var(
        "CIO_TRACK_BASE_URL",
        "",
        Both,
        "override of the Track API host (e.g. the simulator); unset: from the region",
    ),
    var(
        "CIO_APP_BASE_URL",
        "",
        Both,
        "override of the App API host; unset: from the region",
    ),
    var(
        "CIO_APP_RATE_LIMIT",
        "10",
        Both,
        "App API requests/s of this process (split Customer.io's 10/s between server and scheduler)",
    ),
    var(
        "CIO_TRACK_RATE_LIMIT",
        "100",
        Both,
        "Track API requests/s of this process",
    ),
    var(
        "CIO_TIMEOUT_SECS",
        "10",
        Both,
        "per-request timeout to Customer.io",
    ),
    var(
        "CIO_SUBSCRIPTION_TOPIC_ID",
        "",
        Both,
        "subscription topic of newsletter sends (Customer.io requires one when the workspace's subscription center is on); a send's own topic overrides it; unset: none sent",
    ),
    var(
        "SHARPSEND_METRICS_TZ",
        cio_client::ClientConfig::DEFAULT_METRICS_TZ,
        Both,
        "IANA time zone of metrics buckets, sent to Customer.io as `tz` (e.g. Europe/Paris)",
    ),
    var(
        "SHARPSEND_SEGMENT_REEVALUATE_SECS",
        "3600",
        Both,
        "a managed segment with criteria is re-evaluated at least this often",
    ),
    var(
        "SHARPSEND_SEGMENT_FULL_CHECK_SECS",
        "86400",
        Both,
        "segments are evaluated incrementally; one not fully evaluated for this long gets a full evaluation that checks for drift",
    ),
    var(
        "SHARPSEND_OUTBOX_CLAIM_LIMIT",
        "5000",
        Jobs,
        "outbox rows claimed per delivery step",
    ),
    var(
        "SHARPSEND_OUTBOX_MAX_ATTEMPTS",
        "10",
        Jobs,
        "delivery attempts before an outbox row is dead-lettered",
    ),
    var(
        "SHARPSEND_OUTBOX_CONCURRENCY",
        "4",
        Jobs,
        "Customer.io requests in flight per outbox worker",
    ),
    var(
        "SHARPSEND_OUTBOX_POLL_MS",
        "500",
        Jobs,
        "how often an idle outbox worker looks for writes from other processes",
    ),
    var(
        "SHARPSEND_OUTBOX_CLAIM_TTL_SECS",
        "120",
        Jobs,
        "how long an outbox claim holds before another worker may take the rows",
    ),
    var(
        "SHARPSEND_TRIGGER_SPACING_MS",
        "11000",
        Both,
        "time between two broadcast triggers (Customer.io allows one per 10 s)",
    ),
    var(
        "SHARPSEND_TRIGGER_SCOPE",
        "workspace",
        Both,
        "`workspace`: the trigger spacing holds across all broadcasts of the workspace; `broadcast`: per broadcast",
    ),
    var(
        "SHARPSEND_MAX_CLOCK_SKEW_MS",
        "2000",
        Both,
        "largest difference tolerated between this process's clock and the database's: start-up refuses beyond it; send fences allow twice it",
    ),
    var(
        "SHARPSEND_SEND_CLAIM_TTL_SECS",
        "120",
        Both,
        "a submission whose dispatcher recorded no outcome by then becomes uncertain",
    ),
    var(
        "SHARPSEND_SEND_RECONCILE_GRACE_SECS",
        "60",
        Both,
        "an uncertain submission not found this long after its attempt is settled as not sent",
    ),
    var(
        "SHARPSEND_SEND_MAX_ATTEMPTS",
        "3",
        Both,
        "attempts that may have reached Customer.io before a submission is failed",
    ),
    var(
        "SHARPSEND_SEGMENT_SYNC_CRON",
        "0 */5 * * * *",
        Jobs,
        "schedule of segment-sync (six fields, seconds first)",
    ),
    var(
        "SHARPSEND_OUTBOX_DELIVERY_CRON",
        "*/30 * * * * *",
        Jobs,
        "schedule of outbox-delivery, the safety net beside the continuous worker",
    ),
    var(
        "SHARPSEND_SEGMENT_EVALUATION_CRON",
        "0 * * * * *",
        Jobs,
        "schedule of segment-evaluation",
    ),
    var(
        "SHARPSEND_CAMPAIGN_SYNC_CRON",
        "30 */5 * * * *",
        Jobs,
        "schedule of campaign-sync",
    ),
    var(
        "SHARPSEND_METRICS_POLL_CRON",
        "15 * * * * *",
        Jobs,
        "schedule of metrics-poll",
    ),
    var(
        "SHARPSEND_SEND_DISPATCH_CRON",
        "*/10 * * * * *",
        Jobs,
        "schedule of send-dispatch",
    ),
    var(
        "SHARPSEND_SEND_RECONCILE_CRON",
        "*/30 * * * * *",
        Jobs,
        "schedule of send-reconcile",
    ),
    // Engagement flowing back (issue #13): reporting webhooks, delivery polling, scoring.
    var(
        "SHARPSEND_WEBHOOK_LISTEN",
        "",
        Server,
        "host:port of the HTTP listener for Customer.io reporting webhooks (POST /webhooks/customerio); unset: off (in --dev: on, on a free port, wired to the simulator)",
    ),
    secret(
        "CIO_WEBHOOK_SIGNING_KEY",
        Server,
        "the reporting webhook's signing key (X-CIO-Signature); required when SHARPSEND_WEBHOOK_LISTEN is set",
    ),
    var(
        "SHARPSEND_WEBHOOK_TOLERANCE_SECS",
        "300",
        Server,
        "how far a webhook's X-CIO-Timestamp may be from the server's clock, either way, in seconds",
    ),
    var(
        "SHARPSEND_DELIVERY_POLL_DAYS",
        "3",
        Jobs,
        "delivery-poll reads the per-delivery records of sends submitted within this many days",
    ),
    var(
        "SHARPSEND_DELIVERY_POLL_CRON",
        "0 */5 * * * *",
        Jobs,
        "schedule of delivery-poll",
    ),
    var(
        "SHARPSEND_ENGAGEMENT_SCORING_CRON",
        "30 */10 * * * *",
        Jobs,
        "schedule of engagement-scoring",
    ),
    var(
        "SHARPSEND_PROFILE_SYNC_CRON",
        "45 * * * * *",
        Jobs,
        "schedule of profile-sync (Customer.io changes into the profile mirror)",
    ),
    var(
        "SHARPSEND_ABTEST_EVALUATION_CRON",
        "15 */5 * * * *",
        Jobs,
        "schedule of abtest-evaluation (each run is one look of every running A/B test)",
    ),
    var(
        "SHARPSEND_SECRETS_REKEY_CRON",
        "0 40 * * * *",
        Jobs,
        "schedule of secrets-rekey (re-seals stored workspace credentials under the current master key)",
    ),
    var(
        "SHARPSEND_PROFILE_SYNC_SEGMENTS",
        "",
        Jobs,
        "comma-separated Customer.io segment ids whose people profile-sync backfills; unset: every mirrored segment",
    ),
    var(
        "SHARPSEND_PROFILE_SYNC_ATTRIBUTES",
        "",
        Jobs,
        "comma-separated attributes a profile backfill reads; unset: those the mirror holds and managed criteria read",
    ),
    var(
        "SHARPSEND_PROFILE_SYNC_MAX_FEED_PAGES",
        "50",
        Jobs,
        "most activity-feed pages (100 changes each) one profile-sync run reads; more waiting: a backfill instead",
    ),
    var(
        "SHARPSEND_PROFILE_SYNC_PAGING_MAX",
        "1000",
        Jobs,
        "audiences of at most this many people are backfilled by membership pages and attribute lookups, larger ones by an export",
    ),
    var(
        "SHARPSEND_PROFILE_SYNC_EXPORT_WAIT_SECS",
        "60",
        Jobs,
        "how long one profile-sync run waits for Customer.io to build an export before leaving it to the next run",
    ),
    var(
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "",
        Both,
        "OTLP/gRPC collector (http://host:4317); unset: nothing exported",
    ),
    var(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "",
        Both,
        "collector for traces only",
    ),
    var(
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
        "",
        Both,
        "collector for metrics only",
    ),
    var(
        "OTEL_EXPORTER_OTLP_PROTOCOL",
        "grpc",
        Both,
        "only grpc is supported (also the _TRACES_ and _METRICS_ variants)",
    ),
    var(
        "OTEL_SERVICE_NAME",
        "",
        Both,
        "service.name of traces and metrics (unset: sharpsend-server / sharpsend-scheduler)",
    ),
    var(
        "OTEL_RESOURCE_ATTRIBUTES",
        "",
        Both,
        "extra resource attributes, key=value,…",
    ),
    var(
        "OTEL_TRACES_EXPORTER",
        "otlp",
        Both,
        "`none` turns traces off",
    ),
    var(
        "OTEL_METRICS_EXPORTER",
        "otlp",
        Both,
        "`none` turns metrics off",
    ),
    var("OTEL_SDK_DISABLED", "false", Both, "true: export nothing"),
    var(
        "SHARPSEND_TRACE_FILTER",
        crate::telemetry::DEFAULT_FILTER,
        Both,
        "which spans are exported (EnvFilter syntax)",
    ),
];

/// The `--help` text listing `binary`'s variables with their defaults (secrets never shown).
pub fn help(binary: Binary) -> String {
    let mut text = String::from("Environment variables (a malformed value stops start-up):\n");
    for v in VARIABLES.iter().filter(|v| v.readers.includes(binary)) {
        let default = match (v.secret, v.default) {
            (true, _) => "secret".to_string(),
            (false, "") => "unset".to_string(),
            (false, d) => format!("default {d}"),
        };
        text.push_str(&format!(
            "  {:<38} [{default}]\n      {}\n",
            v.name, v.meaning
        ));
    }
    text.push_str(
        "\nThe OpenTelemetry exporter also honours the other standard OTEL_* variables \
         (headers, timeout, sampler, export interval).",
    );
    text
}

/// How the binary runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Serving or running jobs: Customer.io credentials (and the server's API keys) required.
    Production,
    /// `--dev`: the built-in simulator, the dev key, a SQLite file; nothing required.
    Dev,
    /// A one-shot command (`migrate`, `health`, `--list`): nothing required.
    Maintenance,
}

/// One accepted API key and the name of the caller holding it. `Debug` shows the name only.
#[derive(Clone)]
pub struct ApiKeySetting {
    pub name: String,
    pub key: SecretString,
}

impl fmt::Debug for ApiKeySetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKeySetting")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// The gRPC server's own settings.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub listen: SocketAddr,
    pub api_keys: Vec<ApiKeySetting>,
    /// The keys are dev mode's well-known `dev-key` (`SHARPSEND_API_KEYS` unset in `--dev`).
    pub dev_api_key: bool,
    pub request_timeout: Duration,
    /// HTTP/2 `SETTINGS_MAX_CONCURRENT_STREAMS`: calls a connection may have open at once; a
    /// client queues its further calls (HTTP/2 flow control) instead of having them refused.
    pub max_concurrent_streams: u32,
    /// Calls handled at once across all connections; beyond it a call is shed at once with
    /// `UNAVAILABLE` + `RetryInfo` (health checks are never shed).
    pub max_in_flight: usize,
    /// TLS for the gRPC listener; `None`: plaintext.
    pub tls: Option<TlsSettings>,
}

/// The files of the gRPC listener's TLS (`SHARPSEND_TLS_*`), read when connections arrive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// PEM certificate chain, leaf first.
    pub cert: std::path::PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: std::path::PathBuf,
    /// PEM CA certificates client certificates must chain to (mTLS); `None`: no client auth.
    pub client_ca: Option<std::path::PathBuf>,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            api_keys: Vec::new(),
            dev_api_key: false,
            request_timeout: Duration::from_secs(30),
            max_concurrent_streams: 256,
            max_in_flight: 1024,
            tls: None,
        }
    }
}

/// Reporting webhooks and delivery polling (issue #13).
#[derive(Clone)]
pub struct EngagementSettings {
    /// Where the webhook listener binds; `None`: no listener (dev mode picks one).
    pub webhook_listen: Option<SocketAddr>,
    /// The reporting webhook's signing key; set whenever `webhook_listen` is.
    pub webhook_signing_key: Option<SecretString>,
    /// How far `X-CIO-Timestamp` may be from the clock, either way.
    pub webhook_tolerance: Duration,
    /// `delivery-poll` reads sends submitted within this.
    pub poll_window: Duration,
}

impl Default for EngagementSettings {
    fn default() -> Self {
        Self {
            webhook_listen: None,
            webhook_signing_key: None,
            webhook_tolerance: Duration::from_secs(300),
            poll_window: Duration::from_secs(3 * 24 * 3600),
        }
    }
}

impl std::fmt::Debug for EngagementSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngagementSettings")
            .field("webhook_listen", &self.webhook_listen)
            .field(
                "webhook_signing_key",
                &self.webhook_signing_key.as_ref().map(|_| "<redacted>"),
            )
            .field("webhook_tolerance", &self.webhook_tolerance)
            .field("poll_window", &self.poll_window)
            .finish()
    }
}

impl EngagementSettings {
    fn read(r: &Reader<'_>, binary: Binary) -> Result<Self, ConfigError> {
        let poll_window = Duration::from_secs(
            r.positive("SHARPSEND_DELIVERY_POLL_DAYS")?
                .saturating_mul(86_400),
        );
        if binary != Binary::Server {
            return Ok(Self {
                poll_window,
                ..Self::default()
            });
        }
        let webhook_listen = r.parsed::<SocketAddr>(
            "SHARPSEND_WEBHOOK_LISTEN",
            "a socket address such as 0.0.0.0:8080",
        )?;
        let webhook_signing_key = r
            .value("CIO_WEBHOOK_SIGNING_KEY")?
            .filter(|k| !k.is_empty())
            .map(SecretString::from);
        if webhook_listen.is_some() && webhook_signing_key.is_none() {
            return Err(ConfigError::new(
                "CIO_WEBHOOK_SIGNING_KEY",
                "is required when SHARPSEND_WEBHOOK_LISTEN is set",
            ));
        }
        Ok(Self {
            webhook_listen,
            webhook_signing_key,
            webhook_tolerance: Duration::from_secs(r.positive("SHARPSEND_WEBHOOK_TOLERANCE_SECS")?),
            poll_window,
        })
    }
}

/// A job and when it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    pub job: Job,
    pub cron: String,
}

/// Every setting, validated.
#[derive(Debug, Clone)]
pub struct Settings {
    pub database_url: String,
    /// The Customer.io workspace; `None` in `--dev` (the simulator provides it) and for one-shot
    /// commands.
    pub cio: Option<CioSettings>,
    /// `SHARPSEND_MASTER_KEY` or `SHARPSEND_MASTER_KEY_FILE`: the keys sealing stored workspace
    /// credentials ([`crate::secrets`]); `None`: unset (workspaces with stored credentials cannot
    /// be created or opened).
    pub master_keys: Option<MasterKeyring>,
    pub server: ServerSettings,
    pub delivery: DeliveryConfig,
    pub sends: SendConfig,
    pub evaluation: EvaluationConfig,
    /// Reporting webhooks and delivery polling (issue #13).
    pub engagement: EngagementSettings,
    pub profile_sync: crate::profile_sync::ProfileSyncConfig,
    /// Each job's cron schedule (six fields, seconds first), in [`Job::ALL`] order.
    pub schedules: Vec<Schedule>,
    pub telemetry: TelemetryConfig,
    /// This machine's name, for job holders.
    pub host: String,
}

impl Default for Settings {
    /// The defaults of [`VARIABLES`] with no Customer.io workspace and no keys (tests start
    /// here and set what they need).
    fn default() -> Self {
        Self {
            database_url: DEFAULT_DATABASE_URL.to_string(),
            cio: None,
            master_keys: None,
            server: ServerSettings::default(),
            delivery: DeliveryConfig::default(),
            sends: SendConfig::default(),
            evaluation: EvaluationConfig::default(),
            engagement: EngagementSettings::default(),
            profile_sync: crate::profile_sync::ProfileSyncConfig::default(),
            schedules: Job::ALL
                .iter()
                .map(|&job| Schedule {
                    job,
                    cron: Reader::declared(job.schedule_variable())
                        .map(|v| v.default.to_string())
                        .unwrap_or_default(),
                })
                .collect(),
            telemetry: TelemetryConfig::logs_only("sharpsend", false),
            host: "localhost".to_string(),
        }
    }
}

impl Settings {
    /// Reads and validates every setting `binary` uses. In [`Mode::Dev`] nothing is required.
    pub fn from_env(env: &dyn Env, binary: Binary, mode: Mode) -> Result<Self, ConfigError> {
        let r = Reader { env };
        let dev = mode == Mode::Dev;
        let required = mode == Mode::Production;
        let database_url = match env.var("DATABASE_URL") {
            Some(url) => url,
            None if dev => DEFAULT_DEV_DATABASE_URL.to_string(),
            None => DEFAULT_DATABASE_URL.to_string(),
        };
        // Dev mode always talks to the built-in simulator; one-shot commands need no workspace.
        let cio = if required {
            Some(CioSettings::read(&r)?)
        } else {
            None
        };
        let server = if binary == Binary::Server {
            ServerSettings::read(&r, mode)?
        } else {
            ServerSettings::default()
        };
        let service_name = match binary {
            Binary::Server => "sharpsend-server",
            Binary::Scheduler => "sharpsend-scheduler",
        };
        let mut telemetry =
            TelemetryConfig::from_env(env, service_name, r.flag("SHARPSEND_LOG_JSON")?)?;
        let log_filter = r.text("RUST_LOG")?;
        if tracing_subscriber::EnvFilter::try_new(&log_filter).is_err() {
            return Err(ConfigError::new(
                "RUST_LOG",
                "is not a valid filter (tracing EnvFilter syntax, e.g. `info,sqlx=warn`)",
            ));
        }
        telemetry.log_filter = Some(log_filter);
        let key_file = r
            .value(crate::secrets::MASTER_KEY_FILE_VARIABLE)?
            .filter(|v| !v.trim().is_empty());
        let master_keys = match (env.var(crate::secrets::MASTER_KEY_VARIABLE), key_file) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::new(
                    crate::secrets::MASTER_KEY_FILE_VARIABLE,
                    "is set together with SHARPSEND_MASTER_KEY: set one of them",
                ));
            }
            (Some(raw), None) => Some(
                MasterKeys::parse(&raw)
                    .map_err(|e| ConfigError::new("SHARPSEND_MASTER_KEY", e.0))?
                    .into(),
            ),
            (None, Some(path)) => Some(
                MasterKeyring::from_file(std::path::Path::new(&path))
                    .map_err(|e| ConfigError::new(crate::secrets::MASTER_KEY_FILE_VARIABLE, e.0))?,
            ),
            (None, None) => None,
        };
        let settings = Self {
            database_url,
            cio,
            master_keys,
            server,
            delivery: DeliveryConfig {
                claim_limit: r.positive("SHARPSEND_OUTBOX_CLAIM_LIMIT")?,
                max_attempts: r.positive_as("SHARPSEND_OUTBOX_MAX_ATTEMPTS")?,
                concurrency: r.positive_as("SHARPSEND_OUTBOX_CONCURRENCY")?,
                claim_ttl: Duration::from_secs(r.positive("SHARPSEND_OUTBOX_CLAIM_TTL_SECS")?),
                poll_interval: Duration::from_millis(r.positive("SHARPSEND_OUTBOX_POLL_MS")?),
                ..DeliveryConfig::default()
            },
            sends: SendConfig {
                trigger_spacing: Duration::from_millis(r.positive("SHARPSEND_TRIGGER_SPACING_MS")?),
                claim_ttl: Duration::from_secs(r.positive("SHARPSEND_SEND_CLAIM_TTL_SECS")?),
                reconcile_grace: Duration::from_secs(
                    r.positive("SHARPSEND_SEND_RECONCILE_GRACE_SECS")?,
                ),
                max_attempts: r.positive_as("SHARPSEND_SEND_MAX_ATTEMPTS")?,
                trigger_scope: r
                    .parsed::<crate::sends::TriggerScope>(
                        "SHARPSEND_TRIGGER_SCOPE",
                        "`workspace` or `broadcast`",
                    )?
                    .unwrap_or_default(),
                max_clock_skew: Duration::from_millis(r.positive("SHARPSEND_MAX_CLOCK_SKEW_MS")?),
            },
            evaluation: EvaluationConfig {
                max_age: Duration::from_secs(r.positive("SHARPSEND_SEGMENT_REEVALUATE_SECS")?),
                full_check_every: Duration::from_secs(
                    r.positive("SHARPSEND_SEGMENT_FULL_CHECK_SECS")?,
                ),
            },
            engagement: EngagementSettings::read(&r, binary)?,
            profile_sync: crate::profile_sync::ProfileSyncConfig {
                segments: r.list("SHARPSEND_PROFILE_SYNC_SEGMENTS", |id: &str| {
                    id.parse::<i64>().ok().filter(|n| *n > 0)
                })?,
                attributes: r.list("SHARPSEND_PROFILE_SYNC_ATTRIBUTES", |name: &str| {
                    Some(name.to_string())
                })?,
                max_feed_pages: r.positive_as("SHARPSEND_PROFILE_SYNC_MAX_FEED_PAGES")?,
                paging_max: r.number("SHARPSEND_PROFILE_SYNC_PAGING_MAX")?,
                export_wait: Duration::from_secs(
                    r.number("SHARPSEND_PROFILE_SYNC_EXPORT_WAIT_SECS")?,
                ),
            },
            schedules: Job::ALL
                .iter()
                .map(|&job| r.cron(job))
                .collect::<Result<_, _>>()?,
            telemetry,
            host: match env.var("HOSTNAME") {
                Some(host) => host.trim().to_string(),
                None => std::fs::read_to_string("/etc/hostname")
                    .map(|h| h.trim().to_string())
                    .ok()
                    .filter(|h| !h.is_empty())
                    .unwrap_or_else(|| "localhost".to_string()),
            },
        };
        settings.check()?;
        Ok(settings)
    }

    /// The checks across settings: a sending request must be able to start and end inside its
    /// claim ([`SendConfig::check_fence`], with the Customer.io timeout when a workspace is set).
    pub fn check(&self) -> Result<(), ConfigError> {
        if let Some(cio) = &self.cio {
            self.sends.check_fence(cio.timeout)?;
        }
        Ok(())
    }

    /// The Customer.io workspace, required outside `--dev`.
    pub fn cio(&self) -> Result<&CioSettings, ConfigError> {
        self.cio
            .as_ref()
            .ok_or_else(|| ConfigError::new("CIO_SITE_ID", "is required but not set"))
    }
}

/// The declared default of `name` (`None` when it has none or is not declared).
pub fn declared_default(name: &str) -> Option<&'static str> {
    VARIABLES
        .iter()
        .find(|v| v.name == name)
        .map(|v| v.default)
        .filter(|d| !d.is_empty())
}

/// Reads declared variables: the environment's value, else the table's default.
struct Reader<'a> {
    env: &'a dyn Env,
}

impl Reader<'_> {
    fn declared(name: &'static str) -> Result<&'static Variable, ConfigError> {
        VARIABLES
            .iter()
            .find(|v| v.name == name)
            .ok_or_else(|| ConfigError::new(name, "is read but not declared in VARIABLES"))
    }

    /// The value, or the default; `None` when neither is set.
    fn value(&self, name: &'static str) -> Result<Option<String>, ConfigError> {
        let declared = Self::declared(name)?;
        Ok(self
            .env
            .var(name)
            .or_else(|| (!declared.default.is_empty()).then(|| declared.default.to_string())))
    }

    fn required(&self, name: &'static str) -> Result<String, ConfigError> {
        self.value(name)?
            .ok_or_else(|| ConfigError::new(name, "is required but not set"))
    }

    fn text(&self, name: &'static str) -> Result<String, ConfigError> {
        self.required(name)
    }

    fn parsed<T: FromStr>(
        &self,
        name: &'static str,
        expected: &str,
    ) -> Result<Option<T>, ConfigError> {
        match self.value(name)? {
            None => Ok(None),
            Some(raw) => raw
                .trim()
                .parse()
                .map(Some)
                .map_err(|_| ConfigError::new(name, format!("expected {expected}"))),
        }
    }

    fn flag(&self, name: &'static str) -> Result<bool, ConfigError> {
        Ok(self
            .parsed::<bool>(name, "`true` or `false`")?
            .unwrap_or(false))
    }

    /// A whole number greater than 0 (declared with a default).
    fn positive(&self, name: &'static str) -> Result<u64, ConfigError> {
        match self.parsed::<u64>(name, "a positive whole number")? {
            Some(0) => Err(ConfigError::new(name, "must be greater than 0")),
            Some(n) => Ok(n),
            None => Err(ConfigError::new(name, "is required but not set")),
        }
    }

    /// A whole number, 0 allowed (declared with a default).
    fn number(&self, name: &'static str) -> Result<u64, ConfigError> {
        self.parsed::<u64>(name, "a whole number")?
            .ok_or_else(|| ConfigError::new(name, "is required but not set"))
    }

    /// A comma-separated list (empty when unset); `item` parses one entry (`None`: invalid).
    fn list<T>(
        &self,
        name: &'static str,
        item: impl Fn(&str) -> Option<T>,
    ) -> Result<Vec<T>, ConfigError> {
        let raw = self.value(name)?.unwrap_or_default();
        raw.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                item(s).ok_or_else(|| ConfigError::new(name, format!("`{s}` is not valid here")))
            })
            .collect()
    }

    fn positive_as<T: TryFrom<u64>>(&self, name: &'static str) -> Result<T, ConfigError> {
        let n = self.positive(name)?;
        T::try_from(n).map_err(|_| ConfigError::new(name, "is too large"))
    }

    /// An IANA time zone name (`Europe/Paris`), as Customer.io's `tz` takes it.
    fn time_zone(&self, name: &'static str) -> Result<String, ConfigError> {
        let tz = self.required(name)?.trim().to_string();
        tz.parse::<chrono_tz::Tz>().map_err(|_| {
            ConfigError::new(name, "expected an IANA time zone such as America/New_York")
        })?;
        Ok(tz)
    }

    fn url(&self, name: &'static str) -> Result<Option<Url>, ConfigError> {
        match self.parsed::<Url>(name, "an absolute URL such as https://host:port")? {
            Some(u) if !matches!(u.scheme(), "http" | "https") => Err(ConfigError::new(
                name,
                "expected an http:// or https:// URL",
            )),
            other => Ok(other),
        }
    }

    fn cron(&self, job: Job) -> Result<Schedule, ConfigError> {
        let name = job.schedule_variable();
        let cron = self.required(name)?;
        croner::parser::CronParser::builder()
            .seconds(croner::parser::Seconds::Required)
            .dom_and_dow(true)
            .build()
            .parse(&cron)
            .map_err(|_| {
                ConfigError::new(name, "not a valid six-field cron schedule (seconds first)")
            })?;
        Ok(Schedule { job, cron })
    }
}

impl ServerSettings {
    fn read(r: &Reader<'_>, mode: Mode) -> Result<Self, ConfigError> {
        let (api_keys, dev_api_key) = match r.env.var("SHARPSEND_API_KEYS") {
            Some(raw) => (parse_api_keys(&raw)?, false),
            None if mode == Mode::Maintenance => (Vec::new(), false),
            None if mode == Mode::Dev => (
                vec![ApiKeySetting {
                    name: "dev".into(),
                    key: SecretString::from(DEV_API_KEY.to_string()),
                }],
                true,
            ),
            None => {
                return Err(ConfigError::new(
                    "SHARPSEND_API_KEYS",
                    "is required outside --dev mode (comma-separated keys, each `key` or `name=key`)",
                ));
            }
        };
        Ok(Self {
            listen: r
                .parsed::<SocketAddr>(
                    "SHARPSEND_LISTEN",
                    "a socket address such as 127.0.0.1:50051",
                )?
                .unwrap_or(Self::default().listen),
            api_keys,
            dev_api_key,
            request_timeout: Duration::from_secs(r.positive("SHARPSEND_REQUEST_TIMEOUT_SECS")?),
            max_concurrent_streams: r.positive_as("SHARPSEND_MAX_CONCURRENT_STREAMS")?,
            max_in_flight: r.positive_as("SHARPSEND_MAX_IN_FLIGHT")?,
            tls: read_tls(r)?,
        })
    }
}

/// `SHARPSEND_TLS_CERT` and `SHARPSEND_TLS_KEY` (both or neither), `SHARPSEND_TLS_CLIENT_CA`.
fn read_tls(r: &Reader<'_>) -> Result<Option<TlsSettings>, ConfigError> {
    let path = |name: &'static str| -> Result<Option<std::path::PathBuf>, ConfigError> {
        Ok(r.value(name)?
            .filter(|v| !v.trim().is_empty())
            .map(std::path::PathBuf::from))
    };
    let (cert, key, client_ca) = (
        path("SHARPSEND_TLS_CERT")?,
        path("SHARPSEND_TLS_KEY")?,
        path("SHARPSEND_TLS_CLIENT_CA")?,
    );
    match (cert, key) {
        (Some(cert), Some(key)) => Ok(Some(TlsSettings {
            cert,
            key,
            client_ca,
        })),
        (None, None) if client_ca.is_none() => Ok(None),
        (None, None) => Err(ConfigError::new(
            "SHARPSEND_TLS_CLIENT_CA",
            "needs SHARPSEND_TLS_CERT and SHARPSEND_TLS_KEY (client certificates are asked for over TLS)",
        )),
        (Some(_), None) => Err(ConfigError::new(
            "SHARPSEND_TLS_KEY",
            "is required with SHARPSEND_TLS_CERT",
        )),
        (None, Some(_)) => Err(ConfigError::new(
            "SHARPSEND_TLS_CERT",
            "is required with SHARPSEND_TLS_KEY",
        )),
    }
}

/// Parses `key,name=key,...`. Errors say what is wrong without echoing any key.
pub fn parse_api_keys(raw: &str) -> Result<Vec<ApiKeySetting>, ConfigError> {
    let problem = |p: String| ConfigError::new("SHARPSEND_API_KEYS", p);
    let mut keys = Vec::new();
    for (i, entry) in raw.split(',').map(str::trim).enumerate() {
        if entry.is_empty() {
            continue;
        }
        let (name, key) = match entry.split_once('=') {
            Some((name, key)) => (name.trim().to_string(), key.trim()),
            None => (format!("key-{}", i + 1), entry),
        };
        if name.is_empty() || key.is_empty() {
            return Err(problem(format!("entry {} has an empty name or key", i + 1)));
        }
        keys.push(ApiKeySetting {
            name,
            key: SecretString::from(key.to_string()),
        });
    }
    if keys.is_empty() {
        return Err(problem("lists no keys".into()));
    }
    Ok(keys)
}

/// How to reach one Customer.io workspace.
#[derive(Clone)]
pub struct CioSettings {
    pub site_id: String,
    pub track_api_key: SecretString,
    pub app_api_key: SecretString,
    pub region: Region,
    pub track_base_url: Option<Url>,
    pub app_base_url: Option<Url>,
    pub app_requests_per_sec: u32,
    pub track_requests_per_sec: u32,
    pub timeout: Duration,
    /// IANA time zone of metrics buckets (sent as `tz`; checked when read).
    pub metrics_tz: String,
    /// Subscription topic of newsletter sends that name none themselves.
    pub subscription_topic_id: Option<i64>,
}

impl fmt::Debug for CioSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CioSettings")
            .field("site_id", &self.site_id)
            .field("region", &self.region)
            .field(
                "track_base_url",
                &self.track_base_url.as_ref().map(Url::as_str),
            )
            .field("app_base_url", &self.app_base_url.as_ref().map(Url::as_str))
            .field("app_requests_per_sec", &self.app_requests_per_sec)
            .field("track_requests_per_sec", &self.track_requests_per_sec)
            .field("timeout", &self.timeout)
            .field("metrics_tz", &self.metrics_tz)
            .field("subscription_topic_id", &self.subscription_topic_id)
            .finish_non_exhaustive()
    }
}

impl CioSettings {
    fn read(r: &Reader<'_>) -> Result<Self, ConfigError> {
        Ok(Self {
            site_id: r.required("CIO_SITE_ID")?,
            track_api_key: SecretString::from(r.required("CIO_TRACK_API_KEY")?),
            app_api_key: SecretString::from(r.required("CIO_APP_API_KEY")?),
            region: r
                .parsed::<Region>("CIO_REGION", "`us` or `eu`")?
                .unwrap_or(Region::Us),
            track_base_url: r.url("CIO_TRACK_BASE_URL")?,
            app_base_url: r.url("CIO_APP_BASE_URL")?,
            app_requests_per_sec: r.positive_as("CIO_APP_RATE_LIMIT")?,
            track_requests_per_sec: r.positive_as("CIO_TRACK_RATE_LIMIT")?,
            timeout: Duration::from_secs(r.positive("CIO_TIMEOUT_SECS")?),
            metrics_tz: r.time_zone("SHARPSEND_METRICS_TZ")?,
            subscription_topic_id: match r.parsed::<i64>(
                "CIO_SUBSCRIPTION_TOPIC_ID",
                "a positive whole number (a Customer.io subscription topic id)",
            )? {
                Some(id) if id <= 0 => {
                    return Err(ConfigError::new(
                        "CIO_SUBSCRIPTION_TOPIC_ID",
                        "must be greater than 0",
                    ));
                }
                other => other,
            },
        })
    }

    /// The client configuration for these settings.
    pub fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new(
            Credentials {
                site_id: self.site_id.clone(),
                track_api_key: self.track_api_key.clone(),
                app_api_key: self.app_api_key.clone(),
            },
            self.region,
        );
        config.track_base_url = self.track_base_url.clone();
        config.app_base_url = self.app_base_url.clone();
        config.app_requests_per_sec = self.app_requests_per_sec;
        config.track_requests_per_sec = self.track_requests_per_sec;
        config.timeout = self.timeout;
        config.metrics_tz = self.metrics_tz.clone();
        config
    }

    /// Settings for a simulator listening at `base_url` with its well-known dev credentials.
    pub fn for_simulator(
        base_url: Url,
        site_id: &str,
        track_api_key: &str,
        app_api_key: &str,
    ) -> Self {
        Self {
            site_id: site_id.to_string(),
            track_api_key: SecretString::from(track_api_key.to_string()),
            app_api_key: SecretString::from(app_api_key.to_string()),
            region: Region::Us,
            track_base_url: Some(base_url.clone()),
            app_base_url: Some(base_url),
            app_requests_per_sec: 10,
            track_requests_per_sec: 100,
            timeout: Duration::from_secs(10),
            metrics_tz: ClientConfig::DEFAULT_METRICS_TZ.to_string(),
            subscription_topic_id: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const BASE: &[(&str, &str)] = &[
        ("CIO_SITE_ID", "site"),
        ("CIO_TRACK_API_KEY", "track-secret-123"),
        ("CIO_APP_API_KEY", "app-secret-456"),
        ("SHARPSEND_API_KEYS", "ops=key-secret-789"),
    ];

    fn production(vars: &HashMap<String, String>) -> Result<Settings, ConfigError> {
        Settings::from_env(vars, Binary::Server, Mode::Production)
    }

    #[test]
    fn production_requires_keys_and_customer_io() {
        for missing in [
            "CIO_SITE_ID",
            "CIO_TRACK_API_KEY",
            "CIO_APP_API_KEY",
            "SHARPSEND_API_KEYS",
        ] {
            let vars: Vec<_> = BASE
                .iter()
                .copied()
                .filter(|(k, _)| *k != missing)
                .collect();
            let err = production(&env(&vars)).err();
            assert_eq!(err.map(|e| e.variable), Some(missing));
        }
        // The scheduler needs no API keys.
        let vars: Vec<_> = BASE
            .iter()
            .copied()
            .filter(|(k, _)| !k.starts_with("SHARPSEND"))
            .collect();
        assert!(Settings::from_env(&env(&vars), Binary::Scheduler, Mode::Production).is_ok());
    }

    #[test]
    fn dev_needs_nothing_and_the_defaults_are_the_declared_ones() {
        let settings = Settings::from_env(&env(&[]), Binary::Server, Mode::Dev)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(settings.cio.is_none());
        assert!(settings.server.dev_api_key && settings.server.api_keys.len() == 1);
        assert_eq!(settings.database_url, DEFAULT_DEV_DATABASE_URL);
        // Parsing the declared defaults gives the same values as the types' own defaults.
        let defaults = Settings::default();
        assert_eq!(settings.sends, defaults.sends);
        assert_eq!(settings.evaluation, defaults.evaluation);
        assert_eq!(settings.schedules, defaults.schedules);
        assert_eq!(
            format!("{:?}", settings.delivery),
            format!("{:?}", defaults.delivery)
        );
        assert_eq!(settings.server.listen, defaults.server.listen);
        assert_eq!(
            settings.server.request_timeout,
            defaults.server.request_timeout
        );
        assert_eq!(
            settings.server.max_concurrent_streams,
            defaults.server.max_concurrent_streams
        );
        assert_eq!(settings.server.max_in_flight, defaults.server.max_in_flight);
    }

    #[test]
    fn malformed_values_are_named_and_not_echoed() {
        let cases = [
            ("CIO_REGION", "mars"),
            ("CIO_TRACK_BASE_URL", "not a url"),
            ("CIO_APP_BASE_URL", "ftp://example.com"),
            ("CIO_APP_RATE_LIMIT", "0"),
            ("CIO_TRACK_RATE_LIMIT", "-3"),
            ("CIO_TIMEOUT_SECS", "soon"),
            ("SHARPSEND_LISTEN", "localhost"),
            ("SHARPSEND_REQUEST_TIMEOUT_SECS", "0"),
            ("SHARPSEND_MAX_CONCURRENT_STREAMS", "many"),
            ("SHARPSEND_MAX_IN_FLIGHT", "0"),
            ("SHARPSEND_API_KEYS", " , "),
            ("SHARPSEND_OUTBOX_CLAIM_LIMIT", "lots"),
            ("SHARPSEND_SEND_CLAIM_TTL_SECS", "0"),
            ("SHARPSEND_SEGMENT_REEVALUATE_SECS", "hourly"),
            ("SHARPSEND_SEGMENT_FULL_CHECK_SECS", "0"),
            ("SHARPSEND_SEGMENT_SYNC_CRON", "every five minutes"),
            ("SHARPSEND_LOG_JSON", "yes please"),
            ("RUST_LOG", "info,[[["),
        ];
        for (variable, value) in cases {
            let mut vars = env(BASE);
            vars.insert(variable.to_string(), value.to_string());
            let err = production(&vars).err();
            let err = err.unwrap_or_else(|| panic!("{variable}={value} was accepted"));
            assert_eq!(err.variable, variable);
            assert!(
                !err.to_string().contains(value) || value == "0",
                "{err} echoes the value"
            );
        }
    }

    #[test]
    fn master_keys_come_from_the_variable_or_a_file_not_both() {
        let entry = "k1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
        let file = std::env::temp_dir().join(format!(
            "sharpsend-master-keys-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::write(&file, format!("{entry}\n")).unwrap_or_else(|e| panic!("{e}"));
        let file = file.to_string_lossy().into_owned();
        let with = |pairs: &[(&str, &str)]| {
            let mut vars = env(BASE);
            for (k, v) in pairs {
                vars.insert((*k).into(), (*v).into());
            }
            production(&vars)
        };
        let from_file = with(&[("SHARPSEND_MASTER_KEY_FILE", &file)])
            .unwrap_or_else(|e| panic!("{e}"))
            .master_keys
            .unwrap_or_else(|| panic!("no keys"));
        assert_eq!(from_file.keys().current_id(), "k1");
        for (pairs, named) in [
            (
                &[
                    ("SHARPSEND_MASTER_KEY_FILE", file.as_str()),
                    ("SHARPSEND_MASTER_KEY", entry),
                ][..],
                "SHARPSEND_MASTER_KEY_FILE",
            ),
            (
                &[("SHARPSEND_MASTER_KEY_FILE", "/no/such/file")][..],
                "SHARPSEND_MASTER_KEY_FILE",
            ),
        ] {
            let err = with(pairs)
                .err()
                .unwrap_or_else(|| panic!("{pairs:?} accepted"));
            assert_eq!(err.variable, named);
            assert!(!err.to_string().contains("AAAA"), "{err} shows a key");
        }
        let _ = std::fs::remove_file(&file);
    }

    #[test]
    fn tls_needs_certificate_and_key_together() {
        let with = |pairs: &[(&str, &str)]| {
            let mut vars = env(BASE);
            for (k, v) in pairs {
                vars.insert((*k).into(), (*v).into());
            }
            production(&vars)
        };
        let plain = with(&[]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(plain.server.tls, None);
        let tls = with(&[
            ("SHARPSEND_TLS_CERT", "/etc/tls/server.pem"),
            ("SHARPSEND_TLS_KEY", "/etc/tls/server.key"),
            ("SHARPSEND_TLS_CLIENT_CA", "/etc/tls/clients.pem"),
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            tls.server.tls,
            Some(TlsSettings {
                cert: "/etc/tls/server.pem".into(),
                key: "/etc/tls/server.key".into(),
                client_ca: Some("/etc/tls/clients.pem".into()),
            })
        );
        for (pairs, named) in [
            (&[("SHARPSEND_TLS_CERT", "/c.pem")][..], "SHARPSEND_TLS_KEY"),
            (&[("SHARPSEND_TLS_KEY", "/k.pem")][..], "SHARPSEND_TLS_CERT"),
            (
                &[("SHARPSEND_TLS_CLIENT_CA", "/ca.pem")][..],
                "SHARPSEND_TLS_CLIENT_CA",
            ),
        ] {
            let err = with(pairs)
                .err()
                .unwrap_or_else(|| panic!("{pairs:?} accepted"));
            assert_eq!(err.variable, named);
        }
    }

    #[test]
    fn overrides_apply() {
        let mut vars = env(BASE);
        for (k, v) in [
            ("CIO_REGION", "EU"),
            ("CIO_APP_BASE_URL", "http://127.0.0.1:4010"),
            ("SHARPSEND_OUTBOX_CLAIM_LIMIT", "7"),
            ("SHARPSEND_TRIGGER_SPACING_MS", "300"),
            ("SHARPSEND_SEGMENT_SYNC_CRON", "*/7 * * * * *"),
        ] {
            vars.insert(k.into(), v.into());
        }
        let settings = production(&vars).unwrap_or_else(|e| panic!("{e}"));
        let cio = settings.cio().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cio.region, Region::Eu);
        assert_eq!(
            cio.app_base_url.as_ref().map(|u| u.to_string()).as_deref(),
            Some("http://127.0.0.1:4010/")
        );
        assert_eq!(settings.delivery.claim_limit, 7);
        assert_eq!(settings.sends.trigger_spacing, Duration::from_millis(300));
        assert_eq!(settings.schedules[0].cron, "*/7 * * * * *");
        assert_eq!(settings.server.api_keys[0].name, "ops");
    }

    #[test]
    fn send_fidelity_settings_are_read_and_checked() {
        let settings = production(&env(BASE)).unwrap_or_else(|e| panic!("{e}"));
        let cio = settings.cio().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cio.metrics_tz, "America/New_York");
        assert_eq!(cio.client_config().metrics_tz, "America/New_York");
        assert_eq!(cio.subscription_topic_id, None);
        assert_eq!(
            settings.sends.trigger_scope,
            crate::sends::TriggerScope::Workspace
        );
        assert_eq!(settings.sends.max_clock_skew, Duration::from_secs(2));

        let mut vars = env(BASE);
        for (k, v) in [
            ("SHARPSEND_METRICS_TZ", "Europe/Paris"),
            ("CIO_SUBSCRIPTION_TOPIC_ID", "4"),
            ("SHARPSEND_TRIGGER_SCOPE", "broadcast"),
            ("SHARPSEND_MAX_CLOCK_SKEW_MS", "500"),
        ] {
            vars.insert(k.into(), v.into());
        }
        let settings = production(&vars).unwrap_or_else(|e| panic!("{e}"));
        let cio = settings.cio().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cio.client_config().metrics_tz, "Europe/Paris");
        assert_eq!(cio.subscription_topic_id, Some(4));
        assert_eq!(
            settings.sends.trigger_scope,
            crate::sends::TriggerScope::Broadcast
        );
        assert_eq!(settings.sends.max_clock_skew, Duration::from_millis(500));

        for (variable, value) in [
            ("SHARPSEND_METRICS_TZ", "Mars/Olympus_Mons"),
            ("SHARPSEND_METRICS_TZ", "EST5EDT6"),
            ("CIO_SUBSCRIPTION_TOPIC_ID", "0"),
            ("CIO_SUBSCRIPTION_TOPIC_ID", "newsletter"),
            ("SHARPSEND_TRIGGER_SCOPE", "campaign"),
            ("SHARPSEND_MAX_CLOCK_SKEW_MS", "0"),
        ] {
            let mut vars = env(BASE);
            vars.insert(variable.into(), value.into());
            let err = production(&vars).err();
            assert_eq!(
                err.map(|e| e.variable),
                Some(variable),
                "{variable}={value}"
            );
        }
    }

    #[test]
    fn a_claim_too_short_for_a_request_and_the_skew_refuses_to_start() {
        // 10 s timeout + 2 × 2 s skew + 1 s of room: 15 s is the shortest claim.
        let mut vars = env(BASE);
        vars.insert("SHARPSEND_SEND_CLAIM_TTL_SECS".into(), "14".into());
        let err = production(&vars).err();
        assert_eq!(
            err.as_ref().map(|e| e.variable),
            Some("SHARPSEND_SEND_CLAIM_TTL_SECS"),
            "{err:?}"
        );
        assert!(err.is_some_and(|e| e.problem.contains("CIO_TIMEOUT_SECS")));
        vars.insert("SHARPSEND_SEND_CLAIM_TTL_SECS".into(), "15".into());
        assert!(production(&vars).is_ok());
        vars.insert("CIO_TIMEOUT_SECS".into(), "30".into());
        assert!(production(&vars).is_err());
    }

    #[test]
    fn secrets_never_show() {
        let settings = production(&env(BASE)).unwrap_or_else(|e| panic!("{e}"));
        let shown = format!("{settings:?}");
        for secret in ["track-secret-123", "app-secret-456", "key-secret-789"] {
            assert!(!shown.contains(secret), "{shown}");
        }
        for binary in [Binary::Server, Binary::Scheduler] {
            let help = help(binary);
            assert!(
                help.contains("CIO_APP_API_KEY") && help.contains("[secret]"),
                "{help}"
            );
        }
        assert!(help(Binary::Server).contains("SHARPSEND_API_KEYS"));
        assert!(!help(Binary::Scheduler).contains("SHARPSEND_API_KEYS"));
    }

    #[test]
    fn every_variable_is_declared_once() {
        let mut names: Vec<_> = VARIABLES.iter().map(|v| v.name).collect();
        names.sort_unstable();
        let before = names.len();
        names.dedup();
        assert_eq!(before, names.len(), "a variable is declared twice");
        for job in Job::ALL {
            let declared = Reader::declared(job.schedule_variable()).map(|v| v.default);
            assert!(
                declared
                    .as_ref()
                    .is_ok_and(|d| d.split_whitespace().count() == 6),
                "{job}: {declared:?}"
            );
        }
    }
}
