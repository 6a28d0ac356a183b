//! Shared set-up: a simulator on port 0 and clients pointed at it.

use std::sync::Once;
use std::time::Duration;

use cio_client::{CioClient, ClientConfig, Credentials, Region, RetryConfig};
use cio_sim::{LoggedRequest, RunningSim, SimConfig, Simulator};
use url::Url;

/// Logs to stderr when `TEST_LOG` is set; silent otherwise.
pub fn init_tracing() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        if std::env::var_os("TEST_LOG").is_some() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_env("TEST_LOG")
                        .unwrap_or_else(|_| "cio_client=debug".into()),
                )
                .with_test_writer()
                .try_init();
        }
    });
}

/// A simulator with the demo workspace.
pub async fn spawn_sim() -> RunningSim {
    init_tracing();
    Simulator::spawn(SimConfig::demo()).await.unwrap()
}

/// A simulator with an empty workspace.
pub async fn spawn_empty_sim() -> RunningSim {
    init_tracing();
    Simulator::spawn(SimConfig::empty()).await.unwrap()
}

/// Client configuration for `running`: its credentials and base URL, short backoff.
pub fn config(running: &RunningSim) -> ClientConfig {
    let sim = running.sim.config();
    let credentials = Credentials::new(&sim.site_id, &sim.track_api_key, &sim.app_api_key);
    let mut config = ClientConfig::new(credentials, Region::Us)
        .with_base_url(Url::parse(&running.base_url()).unwrap());
    config.timeout = Duration::from_secs(5);
    config.retry = RetryConfig {
        max_retries: 3,
        base_delay: Duration::from_millis(20),
        max_delay: Duration::from_millis(100),
        max_throttle_wait: Duration::from_secs(5),
    };
    config
}

pub fn client(running: &RunningSim) -> CioClient {
    CioClient::new(config(running)).unwrap()
}

/// Requests logged by the simulator for paths starting with `prefix`.
pub fn requests_to(running: &RunningSim, prefix: &str) -> Vec<LoggedRequest> {
    running
        .sim
        .requests()
        .into_iter()
        .filter(|r| r.path.starts_with(prefix))
        .collect()
}

/// Milliseconds between two logged requests.
pub fn gap_ms(a: &LoggedRequest, b: &LoggedRequest) -> i64 {
    (b.at - a.at).num_milliseconds()
}
