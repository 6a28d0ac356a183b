//! Settings both binaries read from the environment. Every error names its variable; secret values
//! are held as [`SecretString`] and never printed.

use std::{fmt, time::Duration};

use cio_client::{ClientConfig, Credentials, Region};
use secrecy::SecretString;
use url::Url;

/// Where settings come from: the process environment, or a map in tests.
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;
}

/// The process environment. Empty values count as unset.
pub struct ProcessEnv;

impl Env for ProcessEnv {
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

/// Reads a required variable.
pub fn required(env: &dyn Env, variable: &'static str) -> Result<String, ConfigError> {
    env.var(variable).ok_or_else(|| ConfigError {
        variable,
        problem: "is required but not set".into(),
    })
}

/// Reads an optional variable and parses it; a value that does not parse is an error, with
/// `expected` saying what would.
pub fn parsed<T: std::str::FromStr>(
    env: &dyn Env,
    variable: &'static str,
    expected: &str,
) -> Result<Option<T>, ConfigError> {
    match env.var(variable) {
        None => Ok(None),
        Some(raw) => raw.trim().parse().map(Some).map_err(|_| ConfigError {
            variable,
            problem: format!("expected {expected}"),
        }),
    }
}

/// `variable` as a whole number greater than 0, if set.
pub fn positive(env: &dyn Env, variable: &'static str) -> Result<Option<u64>, ConfigError> {
    match parsed::<u64>(env, variable, "a positive whole number")? {
        Some(0) => Err(ConfigError {
            variable,
            problem: "must be greater than 0".into(),
        }),
        other => Ok(other),
    }
}

/// Default database: a SQLite file in the working directory.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://sharpsend.db?mode=rwc";

/// `DATABASE_URL`, or the SQLite default.
pub fn database_url(env: &dyn Env) -> String {
    env.var("DATABASE_URL")
        .unwrap_or_else(|| DEFAULT_DATABASE_URL.to_string())
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
            .finish_non_exhaustive()
    }
}

impl CioSettings {
    /// Reads `CIO_SITE_ID`, `CIO_TRACK_API_KEY`, `CIO_APP_API_KEY` (required), `CIO_REGION`,
    /// `CIO_TRACK_BASE_URL`, `CIO_APP_BASE_URL`, `CIO_APP_RATE_LIMIT`, `CIO_TRACK_RATE_LIMIT`,
    /// `CIO_TIMEOUT_SECS`.
    pub fn from_env(env: &dyn Env) -> Result<Self, ConfigError> {
        let site_id = required(env, "CIO_SITE_ID")?;
        let track_api_key = SecretString::from(required(env, "CIO_TRACK_API_KEY")?);
        let app_api_key = SecretString::from(required(env, "CIO_APP_API_KEY")?);
        let region = parsed::<Region>(env, "CIO_REGION", "`us` or `eu`")?.unwrap_or(Region::Us);
        let url = |variable: &'static str| -> Result<Option<Url>, ConfigError> {
            let value = parsed::<Url>(env, variable, "an absolute URL such as https://host:port")?;
            match value {
                Some(u) if !matches!(u.scheme(), "http" | "https") => Err(ConfigError {
                    variable,
                    problem: "expected an http:// or https:// URL".into(),
                }),
                other => Ok(other),
            }
        };
        let positive = |variable: &'static str, default: u32| -> Result<u32, ConfigError> {
            match positive(env, variable)? {
                Some(n) => u32::try_from(n).map_err(|_| ConfigError {
                    variable,
                    problem: format!("at most {}", u32::MAX),
                }),
                None => Ok(default),
            }
        };
        Ok(Self {
            site_id,
            track_api_key,
            app_api_key,
            region,
            track_base_url: url("CIO_TRACK_BASE_URL")?,
            app_base_url: url("CIO_APP_BASE_URL")?,
            app_requests_per_sec: positive("CIO_APP_RATE_LIMIT", 10)?,
            track_requests_per_sec: positive("CIO_TRACK_RATE_LIMIT", 100)?,
            timeout: Duration::from_secs(u64::from(positive("CIO_TIMEOUT_SECS", 10)?)),
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
    ];

    #[test]
    fn missing_required_variable_is_named() {
        for missing in ["CIO_SITE_ID", "CIO_TRACK_API_KEY", "CIO_APP_API_KEY"] {
            let vars: Vec<_> = BASE
                .iter()
                .copied()
                .filter(|(k, _)| *k != missing)
                .collect();
            let err = CioSettings::from_env(&env(&vars)).err();
            assert_eq!(err.map(|e| e.variable), Some(missing));
        }
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
        ];
        for (variable, value) in cases {
            let mut vars = env(BASE);
            vars.insert(variable.to_string(), value.to_string());
            let err = CioSettings::from_env(&vars).err();
            let err = err.unwrap_or_else(|| panic!("{variable}={value} was accepted"));
            assert_eq!(err.variable, variable);
            assert!(
                !err.to_string().contains(value) || value == "0",
                "{err} echoes the value"
            );
        }
    }

    #[test]
    fn defaults_and_overrides() {
        let settings = CioSettings::from_env(&env(BASE)).map_err(|e| e.to_string());
        let settings = settings.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(settings.region, Region::Us);
        assert_eq!(settings.app_requests_per_sec, 10);
        assert!(settings.app_base_url.is_none());

        let mut vars = env(BASE);
        vars.insert("CIO_REGION".into(), "EU".into());
        vars.insert("CIO_APP_BASE_URL".into(), "http://127.0.0.1:4010".into());
        let settings = CioSettings::from_env(&vars).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(settings.region, Region::Eu);
        assert_eq!(
            settings.app_base_url.map(|u| u.to_string()).as_deref(),
            Some("http://127.0.0.1:4010/")
        );
    }

    #[test]
    fn debug_never_shows_keys() {
        let settings = CioSettings::from_env(&env(BASE)).unwrap_or_else(|e| panic!("{e}"));
        let shown = format!("{settings:?}");
        assert!(
            !shown.contains("track-secret-123") && !shown.contains("app-secret-456"),
            "{shown}"
        );
    }
}
