//! Transitional: the settings moved to [`crate::settings`]; this keeps `SendConfig`'s reader
//! compiling until it moves there too.

pub use crate::settings::{ConfigError, Env};

/// `variable` as a whole number greater than 0, if set.
pub fn positive(env: &dyn Env, variable: &'static str) -> Result<Option<u64>, ConfigError> {
    match env.var(variable) {
        None => Ok(None),
        Some(raw) => match raw.trim().parse::<u64>() {
            Ok(0) => Err(ConfigError::new(variable, "must be greater than 0")),
            Ok(n) => Ok(Some(n)),
            Err(_) => Err(ConfigError::new(variable, "expected a positive whole number")),
        },
    }
}
