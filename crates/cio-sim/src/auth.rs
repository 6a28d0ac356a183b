//! Credential checks for both APIs (constant-time comparisons), as route layers.

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;
use base64::Engine as _;
use subtle::ConstantTimeEq as _;

use crate::Simulator;
use crate::error_bodies::{app_error, track_error};

fn same(a: &str, b: &str) -> bool {
    a.as_bytes().ct_eq(b.as_bytes()).into()
}

/// The credentials after `scheme ` in the `Authorization` header (scheme case-insensitive).
fn credentials<'a>(headers: &'a HeaderMap, scheme: &str) -> Option<&'a str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (given, rest) = value.split_once(' ')?;
    given.eq_ignore_ascii_case(scheme).then(|| rest.trim())
}

pub(crate) fn track_ok(headers: &HeaderMap, site_id: &str, api_key: &str) -> bool {
    let Some(encoded) = credentials(headers, "Basic") else {
        return false;
    };
    let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded) else {
        return false;
    };
    let Ok(decoded) = String::from_utf8(decoded) else {
        return false;
    };
    let Some((user, password)) = decoded.split_once(':') else {
        return false;
    };
    // Evaluate both so timing does not reveal which half was wrong.
    let user_ok = same(user, site_id);
    let password_ok = same(password, api_key);
    user_ok & password_ok
}

pub(crate) fn app_ok(headers: &HeaderMap, api_key: &str) -> bool {
    credentials(headers, "Bearer").is_some_and(|token| same(token, api_key))
}

pub(crate) async fn require_track(
    State(sim): State<Simulator>,
    req: Request,
    next: Next,
) -> Response {
    let config = sim.config();
    if track_ok(req.headers(), &config.site_id, &config.track_api_key) {
        next.run(req).await
    } else {
        track_error(
            StatusCode::UNAUTHORIZED,
            vec!["Unauthorized request: check your site id and API key".to_owned()],
        )
    }
}

pub(crate) async fn require_app(
    State(sim): State<Simulator>,
    req: Request,
    next: Next,
) -> Response {
    if app_ok(req.headers(), &sim.config().app_api_key) {
        next.run(req).await
    } else {
        app_error(
            StatusCode::UNAUTHORIZED,
            "Unauthorized request: make sure that you provided a valid App API key",
            None,
        )
    }
}
