//! [`Simulator`], the shared handle to one simulated workspace: construction, the router and
//! serving. Its control methods are grouped by concern in the submodules (`people`: people and
//! segments; `sending`: campaigns, broadcasts, triggers, newsletters, deliveries, rates,
//! engagement and the clock; `traffic`: rate limits and faults; `records`: recorded events, the
//! request log and counters; `activity`: the activity feed and attribute changes from outside
//! the Track API; `exporting`: customer exports; `reporting`: reporting webhooks and their
//! sender task); [`RunningSim`] (`running`) is a simulator serving on a local port.

mod activity;
mod exporting;
mod people;
mod records;
mod reporting;
mod running;
mod sending;
mod traffic;

use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use axum::Router;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::from_fn_with_state;
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tower::ServiceExt as _;

pub use running::RunningSim;

use crate::config::{SimConfig, normal_region};
use crate::conn::{ConnCtl, SimListener};
use crate::error::SimError;
use crate::error_bodies;
use crate::faults::Traffic;
use crate::gateway::{self, RequestLog};
use crate::state::World;
use crate::webhooks::WebhookState;
use crate::{
    activities, app_api, campaigns_api, control, demo, exports, messages_api, newsletters_api,
    track_api,
};

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

struct Inner {
    config: SimConfig,
    /// Reporting webhooks: the sender's state (locked after `world`, never before), its wake-up
    /// and whether its task was started.
    webhooks: Mutex<WebhookState>,
    webhook_wake: Arc<tokio::sync::Notify>,
    webhook_sender: std::sync::atomic::AtomicBool,
    /// The regional endpoint played (`"us"`/`"eu"`), see [`SimConfig::endpoint_region`].
    endpoint_region: Mutex<&'static str>,
    world: Mutex<World>,
    traffic: Mutex<Traffic>,
    log: Mutex<RequestLog>,
}

/// Shared handle to one simulated Customer.io workspace. Cheap to clone; every clone, the HTTP
/// API and the control API see the same state.
#[derive(Clone)]
pub struct Simulator {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Simulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Simulator")
            .field("site_id", &self.inner.config.site_id)
            .field("region", &self.inner.config.region)
            .field("endpoint_region", &self.endpoint_region())
            .finish_non_exhaustive()
    }
}

impl Simulator {
    /// Builds the workspace (demo data when `config.demo_people > 0`).
    pub fn new(config: SimConfig) -> Self {
        let mut world = World::new();
        world.sends.configure(&config);
        world.exports.set_delay(config.export_delay);
        // The demo people existed before: their attributes are no recent activity.
        world.activities.set_recording(false);
        demo::populate(&mut world, config.seed, config.demo_people);
        world.activities.set_recording(true);
        let mut webhooks = WebhookState::default();
        if config.reporting_webhook.is_some() {
            webhooks.configure(&mut world, config.reporting_webhook.clone());
        }
        let traffic = Traffic::new(&config);
        let log = RequestLog::new(config.request_log_capacity);
        let endpoint_region = Mutex::new(normal_region(
            config.endpoint_region.as_deref().unwrap_or(&config.region),
        ));
        let sim = Self {
            inner: Arc::new(Inner {
                webhooks: Mutex::new(webhooks),
                webhook_wake: Arc::new(tokio::sync::Notify::new()),
                webhook_sender: std::sync::atomic::AtomicBool::new(false),
                endpoint_region,
                config,
                world: Mutex::new(world),
                traffic: Mutex::new(traffic),
                log: Mutex::new(log),
            }),
        };
        if sim.inner.config.reporting_webhook.is_some() {
            sim.ensure_webhook_sender();
        }
        sim
    }

    /// The configuration it was created with (rate limits: initial values).
    pub fn config(&self) -> &SimConfig {
        &self.inner.config
    }

    /// Router serving both APIs and `/_sim/`. [`Simulator::serve`] adds a per-connection kill
    /// switch that makes `Fault::Drop` certain; under a plain `axum::serve` a drop relies on the
    /// response body failing before hyper writes the head (what hyper 1.x does today).
    ///
    /// Like any HTTP server, it resolves literal `.` and `..` path segments before routing
    /// (`/api/v1/customers/..` is `/api/v1/`); percent-encoded ones (`%2E`, `%2E%2E`) are data,
    /// so `/api/v1/customers/%2E%2E` addresses the person whose id is `..`.
    pub fn router(&self) -> Router {
        let routes = Router::new()
            .merge(track_api::routes(self))
            .merge(app_api::routes(self))
            .merge(campaigns_api::routes(self))
            .merge(newsletters_api::routes(self))
            .merge(exports::routes(self))
            .merge(activities::routes(self))
            .merge(messages_api::routes(self))
            .merge(control::routes())
            .fallback(fallback)
            .layer(from_fn_with_state(self.clone(), gateway::gateway))
            .with_state(self.clone());
        // Layers on a Router run after routing: the path is rewritten outside it.
        Router::new().fallback_service(routes.map_request(gateway::resolve_dot_segments))
    }

    /// Serves on `listener` until `shutdown` completes (then drains open connections).
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        if self.reporting_webhook().is_some() {
            self.ensure_webhook_sender();
        }
        let app = self
            .router()
            .into_make_service_with_connect_info::<ConnCtl>();
        axum::serve(SimListener::new(listener), app)
            .with_graceful_shutdown(shutdown)
            .await
    }

    /// Binds `127.0.0.1:0` and serves in a tokio task. Dropping the [`RunningSim`] leaves the
    /// server running until the runtime ends; call [`RunningSim::shutdown`] to stop it.
    pub async fn spawn(config: SimConfig) -> std::io::Result<RunningSim> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let sim = Simulator::new(config);
        let (tx, rx) = oneshot::channel::<()>();
        let shutdown = async move {
            if rx.await.is_err() {
                // Handle dropped without shutdown(): keep serving.
                std::future::pending::<()>().await;
            }
        };
        let task = tokio::spawn(sim.clone().serve(listener, shutdown));
        Ok(RunningSim {
            addr,
            sim,
            shutdown: Some(tx),
            task: Some(task),
        })
    }

    /// The workspace's region (`"us"` or `"eu"`).
    pub fn region(&self) -> &'static str {
        normal_region(&self.inner.config.region)
    }

    /// The regional endpoint the simulator plays (`"us"` or `"eu"`; see
    /// [`SimConfig::endpoint_region`]).
    pub fn endpoint_region(&self) -> &'static str {
        *lock(&self.inner.endpoint_region)
    }

    /// Plays the `region` endpoint (`"us"` or `"eu"`, any case; `None`: the workspace's own),
    /// e.g. to see how a client configured for the wrong region fails.
    pub fn set_endpoint_region(&self, region: Option<&str>) -> Result<(), SimError> {
        let region = match region {
            None => self.region(),
            Some(r) if ["us", "eu"].contains(&r.trim().to_ascii_lowercase().as_str()) => {
                normal_region(r)
            }
            Some(other) => return Err(SimError::InvalidRegion(other.to_owned())),
        };
        *lock(&self.inner.endpoint_region) = region;
        Ok(())
    }

    /// Whether clients are calling the other region's endpoint.
    pub(crate) fn wrong_region(&self) -> bool {
        self.endpoint_region() != self.region()
    }

    pub(crate) fn with_world<R>(&self, f: impl FnOnce(&mut World) -> R) -> R {
        f(&mut lock(&self.inner.world))
    }

    pub(crate) fn environment_id(&self) -> u64 {
        // Stable per site id, like a real workspace id.
        let hash = self
            .inner
            .config
            .site_id
            .bytes()
            .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
            });
        1 + hash % 99_999
    }
}

async fn fallback(req: Request) -> Response {
    let detail = format!("no route for {} {}", req.method(), req.uri().path());
    match gateway::classify(req.uri().path()) {
        Some(api) => error_bodies::api_error(api, StatusCode::NOT_FOUND, detail),
        None => (
            StatusCode::NOT_FOUND,
            axum::Json(json!({ "error": detail })),
        )
            .into_response(),
    }
}
