//! Credential checks for both APIs (constant-time comparisons), as route layers, and the
//! wrong-region answers (see `SimConfig::endpoint_region`).

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use subtle::ConstantTimeEq as _;

use crate::Simulator;
use crate::config::track_host;
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

/// The region check, which answers on either region's Track host.
const REGION_PATH: &str = "/api/v1/accounts/region";

fn track_unauthorized() -> Response {
    track_error(
        StatusCode::UNAUTHORIZED,
        vec!["Unauthorized request: check your site id and API key".to_owned()],
    )
}

/// Track auth, then the region: a workspace of the other region is redirected from the US
/// host (307 to the same path on the EU host, which a client must not follow blindly: the
/// request would carry its data to another host) and refused on the EU host (401); the region
/// check answers on both.
pub(crate) async fn require_track(
    State(sim): State<Simulator>,
    req: Request,
    next: Next,
) -> Response {
    let config = sim.config();
    if !track_ok(req.headers(), &config.site_id, &config.track_api_key) {
        return track_unauthorized();
    }
    if !sim.wrong_region() || req.uri().path() == REGION_PATH {
        return next.run(req).await;
    }
    if sim.endpoint_region() == "eu" {
        return track_unauthorized();
    }
    let target = req
        .uri()
        .path_and_query()
        .map_or_else(|| req.uri().path(), |pq| pq.as_str());
    let location = format!("{}{target}", track_host(&config.region));
    let mut response = StatusCode::TEMPORARY_REDIRECT.into_response();
    if let Ok(value) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}

/// App auth; an App API key is only known in its workspace's region, so on the other region's
/// host even a valid key is refused, as a wrong one would be.
pub(crate) async fn require_app(
    State(sim): State<Simulator>,
    req: Request,
    next: Next,
) -> Response {
    if app_ok(req.headers(), &sim.config().app_api_key) && !sim.wrong_region() {
        next.run(req).await
    } else {
        app_error(
            StatusCode::UNAUTHORIZED,
            "Unauthorized request: make sure that you provided a valid App API key",
            None,
        )
    }
}
