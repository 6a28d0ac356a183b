//! Shared test helpers: a simulator on port 0 and an HTTP client with both APIs' credentials.

use cio_sim::{RunningSim, SimConfig, Simulator};
use reqwest::{Client, Method, RequestBuilder};
use serde_json::Value;

pub struct TestSim {
    pub running: RunningSim,
    pub client: Client,
    pub base: String,
}

/// Demo data, no rate limits (so tests that page a lot are not throttled).
pub fn demo_unlimited() -> SimConfig {
    SimConfig {
        app_rate_limit_per_sec: 0,
        track_rate_limit_per_sec: 0,
        ..SimConfig::demo()
    }
}

pub fn empty_unlimited() -> SimConfig {
    SimConfig {
        app_rate_limit_per_sec: 0,
        track_rate_limit_per_sec: 0,
        ..SimConfig::empty()
    }
}

pub async fn spawn(config: SimConfig) -> anyhow::Result<TestSim> {
    // reqwest is built with `rustls-no-provider`; plain http needs no TLS but install one anyway.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let running = Simulator::spawn(config).await?;
    let base = running.base_url();
    let client = Client::builder()
        .timeout(std::time::Duration::from_secs(10))
        .build()?;
    Ok(TestSim {
        running,
        client,
        base,
    })
}

impl TestSim {
    pub fn sim(&self) -> &Simulator {
        &self.running.sim
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub fn app(&self, method: Method, path: &str) -> RequestBuilder {
        self.client
            .request(method, self.url(path))
            .header("Authorization", self.sim().config().app_authorization())
    }

    pub fn track(&self, method: Method, path: &str) -> RequestBuilder {
        let config = self.sim().config();
        self.client
            .request(method, self.url(path))
            .basic_auth(&config.site_id, Some(&config.track_api_key))
    }

    pub fn control(&self, method: Method, path: &str) -> RequestBuilder {
        self.client.request(method, self.url(path))
    }
}

/// Sends and returns (status, JSON body or Null).
pub async fn send(req: RequestBuilder) -> anyhow::Result<(u16, Value)> {
    let response = req.send().await?;
    let status = response.status().as_u16();
    let text = response.text().await?;
    let body = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text)?
    };
    Ok((status, body))
}

pub async fn status_of(req: RequestBuilder) -> anyhow::Result<u16> {
    Ok(req.send().await?.status().as_u16())
}

/// Ids of the people an email send reaches among `ids`: those with an email and without a truthy
/// `unsubscribed` attribute, sorted.
pub fn eligible(sim: &Simulator, ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = ids
        .iter()
        .filter(|id| {
            sim.person(id).is_some_and(|p| {
                p.email.is_some() && p.attributes.get("unsubscribed") != Some(&Value::Bool(true))
            })
        })
        .cloned()
        .collect();
    out.sort();
    out
}

/// The `Retry-After` header in seconds.
pub fn retry_after(response: &reqwest::Response) -> Option<u64> {
    response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// Current unix time (seconds).
pub fn unix_now() -> i64 {
    chrono::Utc::now().timestamp()
}
