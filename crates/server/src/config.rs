//! The server's settings. Shared ones (database, Customer.io) come from `sharpsend_core::config`.

use std::{net::SocketAddr, time::Duration};

use sharpsend_core::config::{self, CioSettings, ConfigError, Env, parsed};

use crate::auth::ApiKeys;

/// Default gRPC listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";

/// Settings of `sharpsend-server`.
#[derive(Debug)]
pub struct ServerConfig {
    /// `SHARPSEND_LISTEN` (default 127.0.0.1:50051).
    pub listen: SocketAddr,
    /// `SHARPSEND_API_KEYS`; required outside dev mode.
    pub api_keys: ApiKeys,
    /// `DATABASE_URL` (default: a SQLite file).
    pub database_url: String,
    /// `CIO_*`; required outside dev mode.
    pub cio: Option<CioSettings>,
    /// `SHARPSEND_REQUEST_TIMEOUT_SECS` (default 30).
    pub request_timeout: Duration,
    /// `SHARPSEND_CONCURRENCY_PER_CONNECTION` (default 64).
    pub concurrency_per_connection: usize,
}

impl ServerConfig {
    /// Reads the settings. Outside dev mode Customer.io settings and API keys are required.
    pub fn from_env(env: &dyn Env, dev: bool) -> Result<Self, ConfigError> {
        let listen = parsed::<SocketAddr>(
            env,
            "SHARPSEND_LISTEN",
            "a socket address such as 127.0.0.1:50051",
        )?
        .unwrap_or_else(|| {
            DEFAULT_LISTEN
                .parse()
                .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 50051)))
        });
        let api_keys = match env.var("SHARPSEND_API_KEYS") {
            Some(raw) => ApiKeys::parse(&raw).map_err(|problem| ConfigError {
                variable: "SHARPSEND_API_KEYS",
                problem,
            })?,
            None if dev => ApiKeys::dev(),
            None => {
                return Err(ConfigError {
                    variable: "SHARPSEND_API_KEYS",
                    problem: "is required outside --dev mode (comma-separated keys, each `key` or `name=key`)".into(),
                });
            }
        };
        let cio = if dev {
            None
        } else {
            Some(CioSettings::from_env(env)?)
        };
        let request_timeout = parsed::<u64>(
            env,
            "SHARPSEND_REQUEST_TIMEOUT_SECS",
            "a whole number of seconds",
        )?
        .unwrap_or(30);
        if request_timeout == 0 {
            return Err(ConfigError {
                variable: "SHARPSEND_REQUEST_TIMEOUT_SECS",
                problem: "must be greater than 0".into(),
            });
        }
        let concurrency = parsed::<usize>(
            env,
            "SHARPSEND_CONCURRENCY_PER_CONNECTION",
            "a positive whole number",
        )?
        .unwrap_or(64);
        if concurrency == 0 {
            return Err(ConfigError {
                variable: "SHARPSEND_CONCURRENCY_PER_CONNECTION",
                problem: "must be greater than 0".into(),
            });
        }
        let database_url = if dev {
            env.var("DATABASE_URL")
                .unwrap_or_else(|| crate::dev::DEFAULT_DEV_DATABASE_URL.to_string())
        } else {
            config::database_url(env)
        };
        Ok(Self {
            listen,
            api_keys,
            database_url,
            cio,
            request_timeout: Duration::from_secs(request_timeout),
            concurrency_per_connection: concurrency,
        })
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

    #[test]
    fn production_requires_keys_and_customer_io() {
        let err = ServerConfig::from_env(&env(&[]), false).err();
        assert_eq!(err.map(|e| e.variable), Some("SHARPSEND_API_KEYS"));
        let err = ServerConfig::from_env(&env(&[("SHARPSEND_API_KEYS", "k1")]), false).err();
        assert_eq!(err.map(|e| e.variable), Some("CIO_SITE_ID"));
    }

    #[test]
    fn dev_needs_nothing() {
        let config = ServerConfig::from_env(&env(&[]), true).map_err(|e| e.to_string());
        let config = config.unwrap_or_else(|e| panic!("{e}"));
        assert!(config.cio.is_none());
        assert_eq!(config.api_keys.len(), 1);
        assert!(config.database_url.starts_with("sqlite:"));
    }

    #[test]
    fn malformed_values_name_their_variable() {
        for (variable, value) in [
            ("SHARPSEND_LISTEN", "localhost"),
            ("SHARPSEND_REQUEST_TIMEOUT_SECS", "0"),
            ("SHARPSEND_CONCURRENCY_PER_CONNECTION", "many"),
            ("SHARPSEND_API_KEYS", " , "),
        ] {
            let err = ServerConfig::from_env(&env(&[(variable, value)]), true).err();
            assert_eq!(
                err.map(|e| e.variable),
                Some(variable),
                "{variable}={value}"
            );
        }
    }
}
